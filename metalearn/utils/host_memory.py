"""Host memory: keep the memory PyTorch frees on the CPU for its next allocations.

PyTorch's CPU allocator is the C library's ``malloc``. glibc maps blocks of 32 MiB and more
(and smaller ones until its dynamic threshold has risen) afresh at every allocation, unmaps
them at ``free``, and gives the top of its heap back to the system once more than a few MiB
are free there. A training step frees and re-allocates its activations at every step, so
it can fault them in again page by page: a conv4 meta-step on 84 x 84 images (5-way 1-shot,
meta-batch 4) faulted 530,944 pages per step and ran 1.54x slower than with the memory
kept (``bench/host_memory.py``, docs/benchmarks.md). :func:`keep_freed_host_memory` sets
glibc's thresholds so that blocks below :data:`MMAP_THRESHOLD` come from the heap and up
to :data:`TRIM_THRESHOLD` of free heap stays mapped: the process's resident memory stays
at its peak working set (plus at most that much), as with a caching allocator.

Processes started afresh from this one (``ddp_spawn`` ranks, spawned workers, subprocesses)
get the same settings through ``GLIBC_TUNABLES``, which glibc reads at start-up.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_host_memory"]

#: ``mallopt`` parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Blocks of this size and larger (a data set's arrays) are still mapped one by one.
MMAP_THRESHOLD = 1 << 30
#: Free memory at the top of the heap beyond this is given back to the system (the
#: largest value ``mallopt`` takes, 2 GiB - 1).
TRIM_THRESHOLD = (1 << 31) - 1
#: The same settings as glibc tunables, for processes started afresh.
_TUNABLES = {
    "glibc.malloc.mmap_threshold": MMAP_THRESHOLD,
    "glibc.malloc.trim_threshold": TRIM_THRESHOLD,
}


def keep_freed_host_memory() -> bool:
    """Keep freed host memory in the process (glibc only; see the module docstring).

    Affects the allocations made after the call, in every thread of the process and in the
    processes it forks, and adds the settings to ``GLIBC_TUNABLES`` for the processes it
    starts afresh (a threshold that variable already names is left as it is there).
    Elsewhere (macOS, Windows, musl) it does nothing.

    Returns:
        Whether the C library took the settings.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False  # not glibc: other C libraries' mallopt means something else or nothing
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if not (
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    ):
        return False
    tunables = [item for item in os.environ.get("GLIBC_TUNABLES", "").split(":") if item]
    named = {item.split("=", 1)[0] for item in tunables}
    for name, value in _TUNABLES.items():
        if name not in named:
            tunables.append(f"{name}={value}")
    os.environ["GLIBC_TUNABLES"] = ":".join(tunables)
    return True
