"""The decoded-image cache: one uint8 ``.npy`` file per data set and preprocessing, read
memory-mapped, so that a split need not fit in RAM.

A cache entry is ``<cache_dir>/<kind>_<digest>.npy`` (the images, (N, C, H, W) uint8) and
``<kind>_<digest>.json`` (class names and offsets). The digest covers the source listing
(each file's path, size and modification time) and the preprocessing, so a changed file
or setting makes a new entry. Both files are written to temporary files and renamed, the
index last: a reader sees a whole entry or none.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import mmap
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from metalearn.data.download import create_temp, one_line, progress_bar
from metalearn.data.storage import ClassImages
from metalearn.errors import DataError

__all__ = [
    "cached_class_images",
    "cached_entry",
    "cache_digest",
    "cache_unwritable",
    "CACHE_FORMAT",
]

CACHE_FORMAT = 1

log = logging.getLogger(__name__)

Item = TypeVar("Item")


def cache_digest(key: Mapping[str, Any]) -> str:
    """A short hash of a JSON-serializable key."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def file_listing(paths: Sequence[Path], root: Path) -> list[list[Any]]:
    """(path relative to ``root``, size, mtime in ns) of each file: the cache key's view of
    the source's content."""
    listing = []
    for path in paths:
        stat = path.stat()
        listing.append([str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns])
    return listing


def cache_unwritable(what: str, cache_dir: Path, err: BaseException) -> DataError:
    """The one-line error for a cache folder that cannot be written (naming it and why)."""
    return DataError(
        f"cannot write the {what} cache to {cache_dir} ({one_line(err)}); set "
        f"paths.cache_dir / METALEARN_CACHE_DIR to a writable folder with space"
    )


def _read(
    images_path: Path, index_path: Path, shape: tuple[int, ...], what: str
) -> ClassImages | None:
    """The cached entry, or None when it is absent, or unreadable or of another shape (then
    with a warning: it is rebuilt)."""
    if not (images_path.is_file() and index_path.is_file()):
        return None
    try:
        index = json.loads(index_path.read_text())
        array = np.load(images_path, mmap_mode="c")  # copy-on-write: never writes the file
        if not isinstance(index, dict) or index.get("format") != CACHE_FORMAT:
            raise ValueError("not a metalearn cache index")
        if array.shape != shape or array.dtype != np.uint8:
            raise ValueError(f"{array.dtype} {array.shape}, expected uint8 {shape}")
        offsets = np.asarray(index["offsets"], np.int64)
        names = index["names"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning(
            "Ignoring the unusable %s cache %s (%s); rebuilding it",
            what,
            images_path,
            one_line(err),
        )
        return None
    # Episodes read scattered images: no read-ahead around each one (it would read and
    # evict megabytes per image when the file does not fit in memory).
    madvise = getattr(getattr(array, "_mmap", None), "madvise", None)
    if madvise is not None and hasattr(mmap, "MADV_RANDOM"):
        madvise(mmap.MADV_RANDOM)
    return ClassImages(torch.from_numpy(array), offsets, names)


def _ordered_map(
    pool: concurrent.futures.Executor, fn: Callable[[Item], Any], items: Sequence[Item], ahead: int
) -> Iterator[Any]:
    """``pool.map(fn, items)`` with at most ``ahead`` items in flight (a large data set's
    items are not all submitted, and their images not all held, at once)."""
    pending: collections.deque[concurrent.futures.Future[Any]] = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _entry(
    cache_dir: str | Path, kind: str, key: Mapping[str, Any], image_shape: tuple[int, ...]
) -> tuple[Path, Path]:
    """The images and index paths of the cache entry of ``key``."""
    digest = cache_digest({"format": CACHE_FORMAT, "shape": list(image_shape), **key})
    images_path = Path(cache_dir).expanduser() / f"{kind}_{digest}.npy"
    return images_path, images_path.with_suffix(".json")


def cached_entry(
    cache_dir: str | Path,
    kind: str,
    key: Mapping[str, Any],
    image_shape: tuple[int, int, int],
    num_images: int,
    what: str | None = None,
) -> ClassImages | None:
    """The cached images of ``key`` (as :func:`cached_class_images` wrote them), or None.

    For sources whose class names are known only once they are opened (a pickle): look
    the entry up first, and open the source only when it is absent.
    """
    images_path, index_path = _entry(cache_dir, kind, key, image_shape)
    return _read(images_path, index_path, (num_images, *image_shape), what or kind)


def cached_class_images(
    cache_dir: str | Path,
    kind: str,
    key: Mapping[str, Any],
    classes: Sequence[tuple[str, Sequence[Item]]],
    image_shape: tuple[int, int, int],
    decode: Callable[[Item], np.ndarray] | None = None,
    progress: bool = True,
    workers: int = 4,
    *,
    decoder: Callable[[], AbstractContextManager[Callable[[Item], np.ndarray]]] | None = None,
    what: str | None = None,
    lookup: bool = True,
) -> ClassImages:
    """The images of ``classes`` (name, items), from the cache or decoded once into it (in
    parallel threads, with a progress bar), memory-mapped.

    An item is whatever locates one image (a file, a zip member, a row of an array) and
    ``decode`` turns it into a (C, H, W) uint8 array of ``image_shape``. When decoding
    needs something opened first (zips, a pickle), give ``decoder`` instead: a function
    returning a context manager that yields ``decode``; it is called only when the cache
    misses. ``key`` must identify the source's content and the preprocessing; the image
    shape and :data:`CACHE_FORMAT` are added to it.

    Args:
        cache_dir: folder of the cache files, created when missing.
        kind: prefix of the cache files' names.
        key: what the images are a function of (JSON-serializable).
        classes: (class name, items) in the order of the result's classes.
        image_shape: (C, H, W) of every decoded image.
        decode: item -> (C, H, W) uint8 array (or ``decoder``).
        progress: show a progress bar while decoding.
        workers: decoding threads.
        decoder: () -> context manager yielding ``decode`` (or ``decode``).
        what: the data set's name in messages (default ``kind``).
        lookup: False when :func:`cached_entry` found no entry already (decode at once).

    Raises:
        DataError: the cache folder cannot be written (one line, naming it); errors of
            ``decode`` pass through.
    """
    if (decode is None) == (decoder is None):
        raise TypeError("give decode or decoder")
    what = what or kind
    images_path, index_path = _entry(cache_dir, kind, key, image_shape)
    counts = [len(items) for _, items in classes]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    shape = (int(offsets[-1]), *image_shape)
    cached = _read(images_path, index_path, shape, what) if lookup else None
    if cached is not None:
        return cached
    cache_dir = images_path.parent
    if decoder is None:
        plain = decode
        assert plain is not None

        def decoder() -> AbstractContextManager[Callable[[Item], np.ndarray]]:
            return contextlib.nullcontext(plain)

    items = [item for _, group in classes for item in group]
    temporaries: list[Path] = []
    try:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = create_temp(cache_dir, images_path.name)
            os.close(fd)
            temporaries.append(tmp)
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        except OSError as err:
            raise cache_unwritable(what, cache_dir, err) from err
        pool = concurrent.futures.ThreadPoolExecutor(max(workers, 1))
        try:
            with (
                decoder() as decode_one,
                progress_bar(progress, f"decoding {what}", len(items), in_bytes=False) as advance,
            ):
                for row, image in enumerate(_ordered_map(pool, decode_one, items, 32 * workers)):
                    array[row] = image
                    advance(1)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # after an error: skip the rest
        try:
            array.flush()
            del array
            os.replace(tmp, images_path)
            index = {"format": CACHE_FORMAT, "names": [name for name, _ in classes]}
            index["offsets"] = offsets.tolist()
            fd, tmp_index = create_temp(cache_dir, index_path.name)
            temporaries.append(tmp_index)
            with os.fdopen(fd, "w") as handle:
                json.dump(index, handle)
            os.replace(tmp_index, index_path)
        except OSError as err:
            raise cache_unwritable(what, cache_dir, err) from err
    finally:
        for tmp in temporaries:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    result = _read(images_path, index_path, shape, what)
    assert result is not None
    return result
