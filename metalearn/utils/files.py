"""Atomic file writes: every report, figure and checkpoint of metalearn goes through here."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from metalearn.errors import MetalearnError

__all__ = ["DiskFull", "atomic_write", "write_text", "save_figure"]


class DiskFull(MetalearnError, OSError):
    """No space left on the device that holds a run folder or the cache."""


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> Path:
    """Write a file through a temporary file in the same folder, then rename it.

    ``write(handle)`` fills the binary handle. A process killed or a disk filled while
    writing leaves the previous file intact, never a truncated one under the final name,
    and no temporary file behind.

    Raises:
        DiskFull: the device is full (one line naming the file).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise DiskFull(
                f"no space left on device: cannot write {path}; free space there or write "
                f"elsewhere (hydra.run.dir for a run, paths.cache_dir for the cache)"
            ) from None
        raise
    return path


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) atomically."""
    return atomic_write(path, lambda handle: handle.write(text.encode()))


def save_figure(figure: Any, path: str | os.PathLike[str]) -> Path:
    """Save a matplotlib figure atomically (the format from ``path``'s suffix) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    figure.tight_layout()
    try:
        return atomic_write(
            path, lambda handle: figure.savefig(handle, dpi=120, format=path.suffix.lstrip("."))
        )
    finally:
        plt.close(figure)
