"""CUB-200-2011 with the few-shot split of Chen et al. (2019): download, extraction, cache.

CUB-200-2011 (Wah et al., "The Caltech-UCSD Birds-200-2011 Dataset", Caltech CNS-TR-2011-001)
holds 11,788 photographs of 200 bird species (a few dozen each). For few-shot learning
Chen et al. ("A Closer Look at Few-shot Classification", ICLR 2019; github.com/wyharveychen/
CloserLookFewShot, ``filelists/CUB/write_CUB_filelist.py``) sort the 200 class folders and
give class ``i`` (from 0) to the base (train) split when ``i % 2 == 0``, to val when
``i % 4 == 1`` and to novel (test) when ``i % 4 == 3``: 100 / 50 / 50 classes, listed in
``metalearn/data/splits/cub.json``.

Layout under ``<data_dir>/cub/`` (what the official ``CUB_200_2011.tgz`` extracts to)::

    CUB_200_2011/
        images/<NNN.Name>/*.jpg    one folder per class (e.g. 001.Black_footed_Albatross)
        images.txt, classes.txt, image_class_labels.txt, ...   (not needed)

With ``download=True`` the archive is fetched from CaltechDATA (:data:`CUB_URL`), checked
against its MD5 (:data:`CUB_MD5`), extracted atomically and deleted; an archive put in
``<data_dir>/cub/`` by hand is extracted (and kept). Whole images are resized to
``image_size`` x ``image_size`` (bilinear, aspect not kept; grayscale images converted to
RGB) and decoded once into the memory-mapped uint8 cache; classes hold different numbers
of images.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any

from metalearn.data.cache import cached_class_images, file_listing
from metalearn.data.download import download_file, download_folder, extract_tar
from metalearn.data.sets.folder import class_folders, decode_image
from metalearn.data.sets.formats import packaged_split
from metalearn.data.storage import SPLIT_NAMES, ClassImages
from metalearn.errors import ConfigError, DataError

__all__ = [
    "CUB_CLASSES",
    "CUB_MD5",
    "CUB_URL",
    "IMAGE_SIZE",
    "PREPROCESS_VERSION",
    "cub_root",
    "cub_split",
    "load_cub",
    "prepare_cub",
]

IMAGE_SIZE = 84

CUB_CLASSES: dict[str, int] = {"train": 100, "val": 50, "test": 50}
"""Classes per split (Chen et al. 2019)."""

CUB_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
"""The official archive (CaltechDATA), 1.1 GB."""

CUB_MD5 = "97eceeb196236b17998738112f37df78"
"""MD5 of the official ``CUB_200_2011.tgz``."""

PREPROCESS_VERSION = 1
"""Bump whenever the decoding changes, so that stale caches are not reused."""

_ARCHIVE = "CUB_200_2011.tgz"
_FOLDER = "CUB_200_2011"
_WHAT = "CUB-200-2011"


def cub_root(data_dir: str | Path) -> Path:
    """The CUB root inside ``data_dir``: ``<data_dir>/cub``."""
    return Path(data_dir).expanduser() / "cub"


def _split_spec() -> dict[str, Any]:
    return packaged_split("cub", CUB_CLASSES)[1]


def cub_split(split: str) -> list[str]:
    """The class folders of ``split`` (train / val / test) in Chen et al.'s split, sorted."""
    if split not in SPLIT_NAMES:
        raise ConfigError(f"unknown CUB split {split!r}: train, val or test")
    return list(_split_spec()[split])


def _missing_classes(images: Path) -> list[str]:
    return [
        name for split in SPLIT_NAMES for name in cub_split(split) if not (images / name).is_dir()
    ]


def _manual(root: Path, url: str) -> str:
    return (
        f"download {_ARCHIVE} from {url} (or https://www.vision.caltech.edu/datasets/"
        f"cub_200_2011/) into {root} and retry, or set paths.data_dir / METALEARN_DATA_DIR "
        f"to the folder holding cub/"
    )


def prepare_cub(
    data_dir: str | Path,
    download: bool = True,
    progress: bool = True,
    url: str = CUB_URL,
    md5: str | None = CUB_MD5,
) -> Path:
    """Make sure ``<data_dir>/cub/CUB_200_2011/images/`` holds the 200 class folders.

    When it does not exist, extracts ``<data_dir>/cub/CUB_200_2011.tgz`` (kept afterwards),
    or with ``download`` fetches the archive from ``url`` first (atomically, MD5-checked;
    nothing is left behind when the download fails) and deletes it once extracted.

    Returns:
        The CUB root, ``<data_dir>/cub``.

    Raises:
        DataError: the data is absent and ``download`` is off, the download or extraction
            fails, or the extracted copy lacks a class folder. One line, naming the file or
            class and what to do.
    """
    root = cub_root(data_dir)
    folder = root / _FOLDER
    images = folder / "images"
    if folder.exists():
        missing = _missing_classes(images)
        if missing:
            raise DataError(
                f"{images / missing[0]} is not a folder ({len(missing)} of the 200 CUB class "
                f"folders are missing): the copy in {folder} is incomplete; delete it and "
                f"retry to extract {_ARCHIVE} again"
            )
        return root
    archive = root / _ARCHIVE
    downloaded = False
    if not archive.is_file():
        if not download:
            raise DataError(f"{_WHAT} not found in {root}: {_manual(root, url)}")
        with download_folder(root, _WHAT):
            download_file(
                url, archive, f"{_WHAT} {_ARCHIVE}", _manual(root, url), md5=md5, progress=progress
            )
        downloaded = True
    extract_tar(archive, folder, _WHAT)
    missing = _missing_classes(images)
    if missing:
        raise DataError(
            f"{archive} extracted to {folder} without the class folder "
            f"{images / missing[0]} ({len(missing)} missing): it is not the CUB-200-2011 "
            f"archive; delete both and retry"
        )
    if downloaded:
        with contextlib.suppress(OSError):
            archive.unlink()
    return root


def load_cub(
    data_dir: str | Path,
    cache_dir: str | Path,
    image_size: int = IMAGE_SIZE,
    download: bool = True,
    progress: bool = True,
    *,
    workers: int = 4,
) -> dict[str, ClassImages]:
    """The three splits of CUB-200-2011 (Chen et al. 2019), decoded once into the cache.

    Calls :func:`prepare_cub`, then per split reads (or decodes once into)
    ``<cache_dir>/cub_<split>_<digest>.npy``, memory-mapped; the digest covers every image
    file's path, size and modification time, ``image_size`` and :data:`PREPROCESS_VERSION`.

    Args:
        data_dir: The data folder (see :func:`cub_root`).
        cache_dir: Folder of the decoded cache; created when missing.
        image_size: Side of the decoded images (the whole image is resized, bilinear).
        download: Download the archive when absent (see :func:`prepare_cub`).
        progress: Show progress bars while downloading and decoding.
        workers: Decoding threads.

    Returns:
        ``{"train", "val", "test"}`` -> :class:`ClassImages` (3, size, size) uint8 RGB,
        classes in the split file's order (sorted), named by their folders, of different
        sizes.

    Raises:
        DataError: see :func:`prepare_cub`; an unreadable image (naming it); an unwritable
            cache. One line each.
        ConfigError: ``image_size`` is not positive.
    """
    if image_size < 1:
        raise ConfigError(f"CUB image_size must be >= 1, got {image_size}")
    root = prepare_cub(data_dir, download, progress)
    images = root / _FOLDER / "images"
    decode = functools.partial(decode_image, image_size=image_size, channels=3)
    out: dict[str, ClassImages] = {}
    for split in SPLIT_NAMES:
        classes = class_folders(images, cub_split(split), f"the CUB {split} split of Chen et al.")
        key = {
            "root": str(root.resolve()),
            "files": file_listing([path for _, group in classes for path in group], root),
            "classes": [name for name, _ in classes],
            "image_size": image_size,
            "preprocess_version": PREPROCESS_VERSION,
        }
        out[split] = cached_class_images(
            Path(cache_dir).expanduser(),
            f"cub_{split}",
            key,
            classes,
            (3, image_size, image_size),
            decode,
            progress,
            workers,
            what=f"CUB {split}",
        )
    return out
