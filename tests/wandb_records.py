"""Reads the records of an offline wandb run (``run-*.wandb``) without the network.

The file is a LevelDB-style log: a 7-byte header (":W&B", magic, version), then 32 KiB
blocks of chunks, each with a 7-byte header (crc32c, length, type: 1 full, 2 first,
3 middle, 4 last); a record is one full chunk or a first..last sequence of protobufs.
"""

from __future__ import annotations

import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    position, pending, payloads = HEADER, b"", []
    while position + HEADER <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < HEADER:  # block trailer padding
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + HEADER])
        position += HEADER
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


def logged_keys(path: Path) -> tuple[set[str], set[str]]:
    """(keys of history rows, keys of summary updates) of an offline run file."""
    history, summary = set(), set()
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history |= {item.key or "/".join(item.nested_key) for item in record.history.item}
        elif kind == "summary":
            summary |= {item.key or "/".join(item.nested_key) for item in record.summary.update}
    return history, summary
