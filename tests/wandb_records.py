"""Reads the records of an offline wandb run (``run-*.wandb``) without the network.

The file is a LevelDB-style log: a 7-byte header (":W&B", magic, version), then 32 KiB
blocks of chunks, each with a 7-byte header (crc32c, length, type: 1 full, 2 first,
3 middle, 4 last); a record is one full chunk or a first..last sequence of protobufs.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    if len(data) < HEADER:
        return []  # not written yet
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    position, pending, payloads = HEADER, b"", []
    while position + HEADER <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < HEADER:  # block trailer padding
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + HEADER])
        position += HEADER
        if position + length > len(data):
            break  # a chunk still being written
        chunk = data[position : position + length]
        position += length
        if kind == 1:
            payloads.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            payloads.append(pending + chunk)
    return [wandb_internal_pb2.Record.FromString(p) for p in payloads]


def wait_until_written(path: Path, timeout: float = 60.0) -> list[wandb_internal_pb2.Record]:
    """The records of a finished run, once its ``exit`` record is on disk.

    ``wandb.finish()`` can return before wandb's service has flushed the run file (seen on
    a loaded machine: a file holding only its first records), so the file is read again
    until it is complete.
    """
    deadline = time.monotonic() + timeout
    while True:
        records = read_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            kinds = [r.WhichOneof("record_type") for r in records]
            raise AssertionError(f"{path} has no exit record after {timeout} s: {kinds}")
        time.sleep(0.2)


def logged_keys(path: Path) -> tuple[set[str], set[str]]:
    """(keys of history rows, keys of summary updates) of an offline run file."""
    history, summary = set(), set()
    for record in wait_until_written(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history |= {item.key or "/".join(item.nested_key) for item in record.history.item}
        elif kind == "summary":
            summary |= {item.key or "/".join(item.nested_key) for item in record.summary.update}
    return history, summary
