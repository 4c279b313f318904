"""miniImageNet on disk: pickles, or Ravi & Larochelle CSVs + images, decoded into the shared cache.

Layout under ``<data_dir>/miniimagenet/``, one of, per split (train / val / test):

1. ``mini-imagenet-cache-<split>.pkl`` (``-validation.pkl`` is accepted for val): a pickled
   dict with ``image_data``, a uint8 array (N, 84, 84, 3), and ``class_dict``, class id ->
   list of row indices, as distributed with several meta-learning libraries;
2. ``<split>.csv`` (Ravi & Larochelle 2017; header ``filename,label``) with the images
   under ``images/``, resized to 84x84 (PIL, Lanczos: antialiased) when decoded.

Either is decoded once into the shared uint8 cache (:mod:`metalearn.data.cache`), one entry
per split, (classes, images per class, 3, H, W), classes sorted by id, images in listed order. Pixels stay uint8 until a meta-batch
reaches the model, which scales it to [0, 1]; no float copy of a split is ever made.

There is no official host for miniImageNet. With ``download=True`` the pickles are fetched
from a public mirror (:data:`MINIIMAGENET_URLS`) and checked before they are kept.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import logging
import os
import pickle
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from metalearn.data.cache import cache_unwritable, cached_class_images, cached_entry
from metalearn.data.download import (
    download_file,
    download_folder,
    one_line,
)
from metalearn.data.sets.formats import load_array_pickle
from metalearn.data.storage import ClassImages
from metalearn.errors import ConfigError, DataError

__all__ = [
    "IMAGES_PER_CLASS",
    "IMAGE_SIZE",
    "MINIIMAGENET_CLASSES",
    "MINIIMAGENET_MIRROR",
    "MINIIMAGENET_SHA256",
    "MINIIMAGENET_SPLITS",
    "MINIIMAGENET_URLS",
    "PREPROCESS_VERSION",
    "MiniImageNetSplit",
    "load_miniimagenet",
    "load_miniimagenet_image",
    "miniimagenet_root",
    "prepare_miniimagenet",
    "preprocess_miniimagenet",
]

log = logging.getLogger(__name__)

MINIIMAGENET_SPLITS: tuple[str, str, str] = ("train", "val", "test")
"""The Ravi & Larochelle splits, in the order of :class:`MiniImageNetDataModule`."""

MINIIMAGENET_CLASSES: dict[str, int] = {"train": 64, "val": 16, "test": 20}
"""Classes per split (Ravi & Larochelle 2017)."""

IMAGES_PER_CLASS = 600
IMAGE_SIZE = 84

MINIIMAGENET_MIRROR = "https://zenodo.org/record/7978538/files"
"""A public mirror of the pickles (the copy learn2learn downloads); not an official host."""

MINIIMAGENET_URLS: dict[str, str] = {
    "train": f"{MINIIMAGENET_MIRROR}/mini-imagenet-cache-train.pkl",
    "val": f"{MINIIMAGENET_MIRROR}/mini-imagenet-cache-validation.pkl",
    "test": f"{MINIIMAGENET_MIRROR}/mini-imagenet-cache-test.pkl",
}
"""Download location of each split's pickle (``data.urls`` overrides it)."""

MINIIMAGENET_SHA256: dict[str, str | None] = {"train": None, "val": None, "test": None}
"""SHA-256 of each split's pickle, checked on download when not None (``data.sha256``).

Not pinned: there is no official copy to take them from. A download is always checked for
content (a loadable pickle of the expected classes, images per class and 84x84x3 size).
"""

PREPROCESS_VERSION = 1
"""Bump whenever the decoding changes, so that stale caches are not reused."""

_CACHE_FORMAT = "metalearn-miniimagenet"
_IMAGES = "images"
_PICKLE_NAMES: dict[str, tuple[str, ...]] = {
    "train": ("mini-imagenet-cache-train.pkl",),
    "val": ("mini-imagenet-cache-val.pkl", "mini-imagenet-cache-validation.pkl"),
    "test": ("mini-imagenet-cache-test.pkl",),
}
_HOW_TO_GET = (
    "there is no official host: place the files there by hand (pickles "
    "mini-imagenet-cache-{train,val,test}.pkl, or images/ with the Ravi & Larochelle "
    "train.csv, val.csv, test.csv), set paths.data_dir / METALEARN_DATA_DIR to a folder "
    "holding miniimagenet/, or enable data.download=true to fetch the pickles from a public "
    "mirror"
)


def miniimagenet_root(data_dir: str | Path) -> Path:
    """Return the miniImageNet root inside ``data_dir``: ``<data_dir>/miniimagenet``."""
    return Path(data_dir).expanduser() / "miniimagenet"


def _expected_classes(split: str, expected: Mapping[str, int] | None) -> int:
    if expected is not None and split in expected:
        return int(expected[split])
    return MINIIMAGENET_CLASSES[split]


# --------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------


def preprocess_miniimagenet(image: Image.Image, size: int = IMAGE_SIZE) -> np.ndarray:
    """One image as training sees it: RGB, resized to ``size x size`` (aspect not kept).

    The resize uses PIL's Lanczos filter, antialiased when shrinking (the usual way the
    84x84 miniImageNet images were made from ImageNet); an image of the right size is
    left untouched.

    Returns:
        uint8 array of shape (size, size, 3).
    """
    rgb = image.convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
    return np.array(rgb, dtype=np.uint8)  # a writable copy


def load_miniimagenet_image(path: str | Path, image_size: int = IMAGE_SIZE) -> Tensor:
    """Load one image exactly as training sees it.

    Returns:
        float32 tensor of shape (3, image_size, image_size) in [0, 1].

    Raises:
        DataError: The file cannot be read or decoded.
    """
    try:
        with Image.open(path) as image:
            array = preprocess_miniimagenet(image, image_size)
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(f"cannot decode the image {path}: {one_line(err)}") from err
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


# --------------------------------------------------------------------------------------
# Locating and checking a copy
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """One split as found on disk."""

    split: str
    kind: Literal["pickle", "folder"]
    path: Path  # the pickle, or the CSV file
    fingerprint: tuple[Any, ...]
    classes: tuple[str, ...] = ()  # folder: sorted class ids
    files: tuple[tuple[Path, ...], ...] = ()  # folder: image paths per class, listed order


def _find_pickle(root: Path, split: str) -> Path | None:
    for name in _PICKLE_NAMES[split]:
        if (root / name).exists():
            return root / name
    return None


def _pickle_source(path: Path, split: str) -> _Source:
    try:
        stat = path.stat()
    except OSError as err:
        raise DataError(f"cannot read the miniImageNet pickle {path}: {one_line(err)}") from err
    fingerprint = ("pickle", split, str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    return _Source(split, "pickle", path, fingerprint)


def _read_csv(path: Path) -> list[tuple[str, str]]:
    """``(filename, label)`` rows of a Ravi & Larochelle CSV file."""
    replace = f"replace it with the Ravi & Larochelle {path.name} (header filename,label)"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path} ({one_line(err)}); {replace}") from err
    rows = [row for row in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in row)]
    if not rows or [cell.strip().lower() for cell in rows[0]] != ["filename", "label"]:
        raise DataError(f"{path} does not start with the header filename,label; {replace}")
    out = []
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"{path} line {number} is not 'filename,label'; {replace}")
        out.append((row[0].strip(), row[1].strip()))
    return out


def _folder_source(
    root: Path, split: str, csv_path: Path, expected_classes: int, per_class: int
) -> _Source:
    """Check a CSV split against ``images/`` (file names, class and image counts)."""
    images = root / _IMAGES
    if not images.is_dir():
        raise DataError(
            f"{csv_path} is present but the image folder {images} is not: put the miniImageNet "
            f"images there (file names as in {csv_path.name}), or use the pickles instead"
        )
    rows = _read_csv(csv_path)
    by_class: dict[str, list[str]] = {}
    for filename, label in rows:
        by_class.setdefault(label, []).append(filename)
    replace = f"replace it with the Ravi & Larochelle {csv_path.name}"
    if len(by_class) != expected_classes:
        raise DataError(
            f"{csv_path} lists {len(by_class)} classes, expected {expected_classes} (the "
            f"{split} split of Ravi & Larochelle): the file is incomplete or not that split; "
            f"{replace}"
        )
    for label, names in by_class.items():
        if len(names) != per_class:
            raise DataError(
                f"{csv_path} lists {len(names)} images of class {label}, expected {per_class} "
                f"(data.images_per_class; set it to {len(names)} for a smaller copy): the file "
                f"is incomplete or not the Ravi & Larochelle split; {replace}"
            )
    classes = tuple(sorted(by_class))
    files = tuple(tuple(images / name for name in by_class[label]) for label in classes)
    count = size = newest = 0
    for group in files:
        for file in group:
            try:
                stat = file.stat()
            except FileNotFoundError:
                raise DataError(
                    f"{file}, listed in {csv_path}, is missing: the image folder is incomplete; "
                    f"copy the miniImageNet images into {images}"
                ) from None
            except OSError as err:
                raise DataError(f"cannot read {file} ({one_line(err)})") from err
            count += 1
            size += stat.st_size
            newest = max(newest, stat.st_mtime_ns)
    listing = hashlib.sha256(csv_path.read_bytes()).hexdigest()
    fingerprint = ("folder", split, str(images.resolve()), listing, count, size, newest)
    return _Source(split, "folder", csv_path, fingerprint, classes, files)


def _locate(
    root: Path, split: str, expected_classes: Mapping[str, int] | None, per_class: int
) -> _Source | None:
    """The present copy of ``split`` (a pickle wins over a CSV), or None when absent."""
    pickled = _find_pickle(root, split)
    if pickled is not None:
        return _pickle_source(pickled, split)
    csv_path = root / f"{split}.csv"
    if csv_path.exists():
        return _folder_source(
            root, split, csv_path, _expected_classes(split, expected_classes), per_class
        )
    return None


# --------------------------------------------------------------------------------------
# Pickles
# --------------------------------------------------------------------------------------


class _BadPickle(Exception):
    """What is wrong with a pickle, as the end of a sentence starting with the file's name."""


def _read_pickle(
    path: Path, split: str, expected_classes: int, per_class: int
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Load and check a pickle; raise :class:`_BadPickle` with the reason when unusable."""
    try:
        with open(path, "rb") as handle:
            payload = load_array_pickle(handle)
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError) as err:
        raise _BadPickle(f"cannot be read ({one_line(err) or type(err).__name__})") from err
    except (AttributeError, ImportError, IndexError, KeyError, MemoryError) as err:
        raise _BadPickle(f"cannot be read ({type(err).__name__}: {one_line(err)})") from err
    if not isinstance(payload, dict) or not {"image_data", "class_dict"} <= set(payload):
        raise _BadPickle("cannot be read (no image_data and class_dict)")
    image_data, class_dict = payload["image_data"], payload["class_dict"]
    if not isinstance(image_data, np.ndarray) or not isinstance(class_dict, dict):
        raise _BadPickle("cannot be read (image_data is not an array or class_dict not a dict)")
    shape = (IMAGE_SIZE, IMAGE_SIZE, 3)
    if image_data.dtype != np.uint8 or image_data.ndim != 4 or image_data.shape[1:] != shape:
        raise _BadPickle(
            f"holds images of {image_data.dtype} {tuple(image_data.shape)}, expected uint8 "
            f"(N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3): it is not the {IMAGE_SIZE}x{IMAGE_SIZE} RGB "
            f"miniImageNet"
        )
    if len(class_dict) != expected_classes:
        raise _BadPickle(
            f"holds {len(class_dict)} classes, expected {expected_classes} (the {split} split "
            f"of Ravi & Larochelle)"
        )
    classes = sorted(str(name) for name in class_dict)
    by_name = {str(name): rows for name, rows in class_dict.items()}
    index = np.empty((len(classes), per_class), np.int64)
    for c, name in enumerate(classes):
        try:
            rows = np.asarray(by_name[name], dtype=np.int64).reshape(-1)
        except (TypeError, ValueError) as err:
            raise _BadPickle(f"cannot be read (rows of class {name}: {one_line(err)})") from err
        if rows.size != per_class:
            raise _BadPickle(
                f"has {rows.size} images of class {name}, expected {per_class} "
                f"(data.images_per_class; set it to {rows.size} for a smaller copy)"
            )
        if rows.size and (rows.min() < 0 or rows.max() >= len(image_data)):
            raise _BadPickle(f"cannot be read (class {name} lists rows outside image_data)")
        index[c] = rows
    return image_data, classes, index


def _load_pickle(
    path: Path, split: str, expected_classes: int, per_class: int
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Load and check a present pickle.

    Returns:
        ``image_data`` (N, 84, 84, 3) uint8, the sorted class ids and their row indices
        (classes, per_class).

    Raises:
        DataError: naming the file, what is wrong and what to do.
    """
    try:
        return _read_pickle(path, split, expected_classes, per_class)
    except _BadPickle as err:
        raise DataError(
            f"the miniImageNet pickle {path} {err}; it is incomplete, corrupt or not the "
            f"{split} split: delete it and enable data.download=true, or replace it with "
            f"mini-imagenet-cache-{split}.pkl"
        ) from err


def _check_download(path: Path, split: str, expected_classes: int, per_class: int) -> None:
    """``validate`` of a downloaded pickle: DataError with the reason alone."""
    try:
        _read_pickle(path, split, expected_classes, per_class)
    except _BadPickle as err:
        raise DataError(f"it {err}") from err


def _decode_pickle(
    source: _Source,
    cache_dir: Path,
    key: Mapping[str, Any],
    image_size: int,
    expected_classes: int,
    per_class: int,
    progress: bool,
) -> ClassImages:
    """Decode a pickle's split into the cache: classes sorted by id, rows in listed order."""
    log.info("Decoding the miniImageNet pickle %s", source.path)
    image_data, classes, index = _load_pickle(
        source.path, source.split, expected_classes, per_class
    )

    def decode(row: int) -> np.ndarray:
        image = image_data[row]  # (84, 84, 3)
        if image_size != IMAGE_SIZE:
            image = preprocess_miniimagenet(Image.fromarray(image), image_size)
        return image.transpose(2, 0, 1)

    return cached_class_images(
        cache_dir,
        f"miniimagenet_{source.split}",
        key,
        [(name, index[c].tolist()) for c, name in enumerate(classes)],
        (3, image_size, image_size),
        decode,
        progress,
        # A copy of each row (84 px) needs no threads; resizing with Lanczos does.
        workers=1 if image_size == IMAGE_SIZE else min(8, os.cpu_count() or 1),
        what=f"miniImageNet {source.split}",
        lookup=False,
    )


# --------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------

_DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    zlib.error,
    Image.DecompressionBombError,
)


def _decode_file(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return preprocess_miniimagenet(image, size)
    except _DECODE_ERRORS as err:
        raise DataError(
            f"cannot decode the miniImageNet image {path} ({one_line(err)}): the copy is "
            f"corrupt; replace the file"
        ) from err


def _decode_folder(
    source: _Source, cache_dir: Path, key: Mapping[str, Any], image_size: int, progress: bool
) -> ClassImages:
    """Decode every listed image into the cache (threads: PIL releases the GIL while
    decoding): classes sorted by id, images in listed order."""
    return cached_class_images(
        cache_dir,
        f"miniimagenet_{source.split}",
        key,
        list(zip(source.classes, source.files, strict=True)),
        (3, image_size, image_size),
        lambda path: _decode_file(path, image_size).transpose(2, 0, 1),
        progress,
        workers=min(8, os.cpu_count() or 1),
        what=f"miniImageNet {source.split}",
        lookup=False,
    )


# --------------------------------------------------------------------------------------
# prepare / load
# --------------------------------------------------------------------------------------


def _prepare(
    data_dir: str | Path,
    download: bool,
    urls: Mapping[str, str] | None,
    sha256: Mapping[str, str | None] | None,
    progress: bool,
    expected_classes: Mapping[str, int] | None,
    per_class: int,
) -> dict[str, _Source]:
    root = miniimagenet_root(data_dir)
    sources = {
        split: _locate(root, split, expected_classes, per_class) for split in MINIIMAGENET_SPLITS
    }
    absent = [split for split, source in sources.items() if source is None]
    if absent and not download:
        if not root.is_dir() or len(absent) == len(MINIIMAGENET_SPLITS):
            raise DataError(f"miniImageNet not found at {root}; {_HOW_TO_GET}")
        missing = ", ".join(
            f"{split} (mini-imagenet-cache-{split}.pkl or {split}.csv)" for split in absent
        )
        raise DataError(f"miniImageNet at {root} lacks the split {missing}; {_HOW_TO_GET}")
    if absent:
        urls = MINIIMAGENET_URLS if urls is None else urls
        sha256 = MINIIMAGENET_SHA256 if sha256 is None else sha256
        for split in absent:
            if split not in urls:
                raise ConfigError(f"no download URL given for the miniImageNet {split} split")
        with download_folder(root, "miniImageNet"):
            for split in absent:
                url, target = urls[split], root / _PICKLE_NAMES[split][0]
                expected = _expected_classes(split, expected_classes)
                log.warning(
                    "Downloading miniImageNet %s from %s (a mirror, not an official host)",
                    split,
                    url,
                )
                download_file(
                    url,
                    target,
                    what=f"miniImageNet {split} pickle",
                    manual=(
                        f"download {url} by hand and save it as {target}, or place the images "
                        f"and the Ravi & Larochelle CSVs in {root}"
                    ),
                    sha256=sha256.get(split),
                    validate=functools.partial(
                        _check_download, split=split, expected_classes=expected, per_class=per_class
                    ),
                    progress=progress,
                )
                sources[split] = _pickle_source(target, split)
    return {split: source for split, source in sources.items() if source is not None}


def prepare_miniimagenet(
    data_dir: str | Path,
    download: bool = True,
    urls: Mapping[str, str] | None = None,
    sha256: Mapping[str, str | None] | None = None,
    progress: bool = True,
    expected_classes: Mapping[str, int] | None = None,
    images_per_class: int = IMAGES_PER_CLASS,
) -> Path:
    """Make sure every split of miniImageNet is under ``data_dir``, downloading absent ones.

    A split is present as a pickle or as a CSV file plus ``images/`` (see the module
    docstring); a CSV split is checked here (class and image counts, every listed file
    present), a pickle when it is decoded. Absent splits are downloaded as pickles (only
    when ``download``), checked (SHA-256 when given, then content) and written atomically.

    Args:
        data_dir: The data folder; miniImageNet lives in ``miniimagenet_root(data_dir)``.
        download: Download absent splits; otherwise their absence is an error.
        urls: Split -> URL of its pickle; default :data:`MINIIMAGENET_URLS`.
        sha256: Split -> expected SHA-256 (None: not checked); default
            :data:`MINIIMAGENET_SHA256`.
        progress: Show a progress bar while downloading.
        expected_classes: Split -> number of classes, when not 64 / 16 / 20 (small copies).
        images_per_class: Images per class of a complete copy (600).

    Returns:
        ``miniimagenet_root(data_dir)``.

    Raises:
        DataError: A split is absent and ``download`` is false, a download fails or is
            rejected, or a present CSV split is incomplete.
    """
    _prepare(data_dir, download, urls, sha256, progress, expected_classes, images_per_class)
    return miniimagenet_root(data_dir)


@dataclass(frozen=True)
class MiniImageNetSplit:
    """One decoded split.

    Attributes:
        images: uint8 tensor (classes, images per class, 3, size, size), RGB, 0..255.
        classes: class id (WordNet id, e.g. ``"n01532829"``) of each row, sorted.
    """

    images: Tensor
    classes: list[str]

    def __len__(self) -> int:
        return len(self.classes)


def _load_split(
    source: _Source,
    cache_dir: Path,
    image_size: int,
    expected_classes: int,
    per_class: int,
    progress: bool,
) -> MiniImageNetSplit:
    key = {
        "source": list(source.fingerprint),
        "image_size": image_size,
        "preprocess_version": PREPROCESS_VERSION,
    }
    shape = (expected_classes, per_class, 3, image_size, image_size)
    stored = cached_entry(
        cache_dir,
        f"miniimagenet_{source.split}",
        key,
        shape[2:],
        expected_classes * per_class,
        f"miniImageNet {source.split}",
    )
    if stored is None or stored.num_classes != expected_classes:
        if source.kind == "pickle":
            stored = _decode_pickle(
                source, cache_dir, key, image_size, expected_classes, per_class, progress
            )
        else:
            stored = _decode_folder(source, cache_dir, key, image_size, progress)
        log.info(
            "Cached miniImageNet %s (%d classes) in %s", source.split, expected_classes, cache_dir
        )
    assert stored.names is not None
    return MiniImageNetSplit(images=stored.images.view(shape), classes=list(stored.names))


def load_miniimagenet(
    data_dir: str | Path,
    cache_dir: str | Path,
    image_size: int = IMAGE_SIZE,
    download: bool = True,
    progress: bool = True,
    expected_classes: Mapping[str, int] | None = None,
    images_per_class: int = IMAGES_PER_CLASS,
    urls: Mapping[str, str] | None = None,
    sha256: Mapping[str, str | None] | None = None,
) -> dict[str, MiniImageNetSplit]:
    """Load the three splits as uint8 tensors, decoding the source files only once.

    Calls :func:`prepare_miniimagenet`, then per split reads
    the shared cache (:func:`metalearn.data.cache.cached_class_images`:
    ``<cache_dir>/miniimagenet_<split>_<hash>.npy`` and ``.json``, memory-mapped) when
    present; otherwise decodes the pickle or the images into it.
    ``<hash>`` fingerprints the source (pickle: resolved path, size, mtime; folder: the CSV's
    content and the listed files' count, total size and newest mtime), ``image_size`` and
    :data:`PREPROCESS_VERSION`. An unreadable or mismatched cache file is rebuilt.

    Args:
        data_dir: The data folder (see :func:`miniimagenet_root`).
        cache_dir: Folder for the decoded cache; created when missing.
        image_size: Side of the decoded images (84; other sides are resized with Lanczos).
        download: Download absent splits (see :func:`prepare_miniimagenet`).
        progress: Show progress bars while downloading and decoding.
        expected_classes: Split -> classes of a complete copy; default 64 / 16 / 20.
        images_per_class: Images per class of a complete copy (600).
        urls: Download URLs (default :data:`MINIIMAGENET_URLS`).
        sha256: Expected checksums of downloads (default :data:`MINIIMAGENET_SHA256`).

    Returns:
        ``{"train", "val", "test"}`` -> :class:`MiniImageNetSplit`.

    Raises:
        DataError: miniImageNet is missing, incomplete, corrupt or of the wrong image size
            or class count, or ``cache_dir`` is not writable. One line, naming the file.
        ConfigError: ``image_size`` or ``images_per_class`` is not positive.
    """
    if image_size < 1:
        raise ConfigError(f"miniImageNet image_size must be a positive integer, got {image_size}")
    if images_per_class < 1:
        raise ConfigError(f"data.images_per_class must be >= 1, got {images_per_class}")
    sources = _prepare(
        data_dir, download, urls, sha256, progress, expected_classes, images_per_class
    )
    cache = Path(cache_dir).expanduser()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise cache_unwritable("miniImageNet", cache, err) from err
    return {
        split: _load_split(
            sources[split],
            cache,
            image_size,
            _expected_classes(split, expected_classes),
            images_per_class,
            progress,
        )
        for split in MINIIMAGENET_SPLITS
    }
