"""MNIST on disk: locate or download the official IDX files, parse them into uint8 tensors.

Layout under the data root ``<data_dir>/mnist/`` (the official file names, gzip-compressed or
not):

- test: ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz`` (10,000 images);
- train: the official ``train-images-idx3-ubyte.gz`` / ``train-labels-idx1-ubyte.gz``
  (60,000), or, when those are absent, ``train-images-first10k-idx3-ubyte.gz`` /
  ``train-labels-first10k-idx1-ubyte.gz`` (the first 10,000 training images in the
  original order; enough for the data hyper-cleaning protocol).

Absent official files are downloaded (md5-checked, written atomically by
:func:`metalearn.data.download.download_file`) when ``download`` is true. The IDX format
(LeCun et al.): a big-endian header ``0x00 0x00 <type> <ndim>``, ``ndim`` int32
dimensions, then the data in C order; MNIST uses type ``0x08`` (unsigned byte) only.
"""

from __future__ import annotations

import gzip
import logging
import struct
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from metalearn.data.download import download_file, download_folder, one_line
from metalearn.errors import ConfigError, DataError

__all__ = [
    "MNIST_BASE_URL",
    "MNIST_FILES",
    "MNIST_FIRST10K_FILES",
    "MNIST_MD5",
    "MnistSet",
    "load_mnist",
    "mnist_root",
    "read_idx",
]

log = logging.getLogger(__name__)

MNIST_BASE_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
"""Mirror of the official files (the one torchvision tries first); ``<base><file name>``."""

MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
"""The official (images, labels) files of each split."""

MNIST_FIRST10K_FILES: tuple[str, str] = (
    "train-images-first10k-idx3-ubyte.gz",
    "train-labels-first10k-idx1-ubyte.gz",
)
"""The first 10,000 training images and labels, accepted when the official train files are absent."""

MNIST_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
"""md5 of the official gzip files; checked on download (a present copy is checked for content)."""

Split = Literal["train", "test"]

_UBYTE = 0x08
_SIDE = 28
_HOW_TO_POINT = (
    "set paths.data_dir / METALEARN_DATA_DIR to a folder holding mnist/ with the official "
    "IDX files, or enable download (hpo.download=true)"
)


class MnistSet(NamedTuple):
    """One MNIST split as uint8 tensors.

    Attributes:
        images: ``(N, 28, 28)`` uint8, 0 = background, 255 = ink (as in the files).
        labels: ``(N,)`` uint8 digits 0..9.
    """

    images: Tensor
    labels: Tensor


def mnist_root(data_dir: str | Path) -> Path:
    """The MNIST folder inside a data root: ``<data_dir>/mnist``."""
    return Path(data_dir).expanduser() / "mnist"


def read_idx(path: str | Path, compressed: bool | None = None) -> Tensor:
    """Parse an IDX file of unsigned bytes, gzip-compressed or not.

    Args:
        path: The file.
        compressed: Whether it is gzip-compressed; None: when its name ends in ``.gz``.

    Returns:
        A uint8 tensor shaped by the header's dimensions.

    Raises:
        DataError: The file is missing, unreadable, not IDX, not of unsigned bytes, or its
            length disagrees with its header (truncated or with trailing bytes). One line.
    """
    path = Path(path)
    try:
        if path.name.endswith(".gz") if compressed is None else compressed:
            with gzip.open(path, "rb") as stream:
                data = stream.read()
        else:
            data = path.read_bytes()
    except FileNotFoundError as err:
        raise DataError(f"MNIST file {path} not found; {_HOW_TO_POINT}") from err
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(
            f"cannot read the MNIST file {path} ({one_line(err)}): it is corrupt or truncated; "
            f"delete it to download it again, or replace it with the official file"
        ) from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(
            f"{path} is not an IDX file (bad magic number {data[:4].hex() or 'empty'}); "
            "delete it to download it again, or replace it with the official file"
        )
    kind, ndim = data[2], data[3]
    if kind != _UBYTE:
        raise DataError(
            f"{path} holds IDX type 0x{kind:02x}, but MNIST files hold unsigned bytes (0x08)"
        )
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DataError(f"{path} has a truncated IDX header ({ndim} dimensions, {len(data)} bytes)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != expected:
        state = "truncated" if len(data) - header < expected else "longer than its header says"
        raise DataError(
            f"{path} is {state}: its header declares {'x'.join(map(str, dims))} = {expected} "
            f"bytes of data, the file has {len(data) - header}; delete it to download it again"
        )
    array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)
    return torch.from_numpy(array.copy())


def _check_images(images: Tensor, path: Path) -> None:
    if images.dim() != 3 or tuple(images.shape[1:]) != (_SIDE, _SIDE):
        raise DataError(
            f"{path} holds an array of shape {tuple(images.shape)}, not MNIST images (N, 28, 28)"
        )


def _check_labels(labels: Tensor, path: Path) -> None:
    if labels.dim() != 1:
        raise DataError(f"{path} holds an array of shape {tuple(labels.shape)}, not labels (N,)")
    if labels.numel() and int(labels.max()) > 9:
        raise DataError(f"{path} holds a label {int(labels.max())}; MNIST labels are 0..9")


def _validator(name: str) -> Callable[[Path], object]:
    """The content check of a downloaded file (images or labels, by its name)."""

    def validate(path: Path) -> None:
        # The temporary file's name hides the .gz suffix: say how it is compressed.
        array = read_idx(path, compressed=name.endswith(".gz"))
        (_check_images if "images" in name else _check_labels)(array, path)

    return validate


def _present(root: Path, name: str) -> Path | None:
    """The file ``name`` (``.gz``) or its uncompressed twin, when either exists."""
    for candidate in (root / name, root / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def _locate(root: Path, split: Split) -> tuple[Path | None, Path | None, tuple[str, str]]:
    """The present (images, labels) files of a split and the names to download if absent."""
    names = MNIST_FILES[split]
    images, labels = _present(root, names[0]), _present(root, names[1])
    if split == "train" and images is None and labels is None:
        first = _present(root, MNIST_FIRST10K_FILES[0]), _present(root, MNIST_FIRST10K_FILES[1])
        if first != (None, None):
            return first[0], first[1], MNIST_FIRST10K_FILES
    return images, labels, names


def _download(
    root: Path,
    name: str,
    base_url: str,
    md5: Mapping[str, str | None],
    progress: bool,
) -> Path:
    url = base_url.rstrip("/") + "/" + name
    log.info("Downloading MNIST %s from %s", name, url)
    with download_folder(root, "MNIST"):
        return download_file(
            url,
            root / name,
            what=f"MNIST {name}",
            manual=(
                f"download {url} by hand and save it as {root / name}, or set paths.data_dir / "
                "METALEARN_DATA_DIR to a folder holding mnist/"
            ),
            md5=md5.get(name),
            validate=_validator(name),
            progress=progress,
        )


def load_mnist(
    data_dir: str | Path,
    split: Split,
    download: bool = True,
    progress: bool = True,
    base_url: str = MNIST_BASE_URL,
    md5: Mapping[str, str | None] | None = None,
) -> MnistSet:
    """Load one MNIST split from ``<data_dir>/mnist``, downloading absent official files.

    For ``split="train"`` the official 60,000-image files win; without them the
    ``*-first10k-*`` files (10,000 images) are used; without either, the official files are
    downloaded (when ``download``).

    Args:
        data_dir: The data root (``paths.data_dir``).
        split: ``"train"`` or ``"test"``.
        download: Download absent official files; otherwise their absence is an error.
        progress: Show a progress bar while downloading.
        base_url: Where to download from: ``<base_url>/<file name>``.
        md5: File name -> expected md5 of the download (None or a missing key: unchecked);
            default :data:`MNIST_MD5`.

    Returns:
        The :class:`MnistSet` (uint8 images ``(N, 28, 28)`` and labels ``(N,)``).

    Raises:
        ConfigError: An unknown split.
        DataError: Files are missing (and ``download`` is false), corrupt, inconsistent
            with each other, or the download fails. One line each.
    """
    if split not in MNIST_FILES:
        raise ConfigError(f"unknown MNIST split {split!r}; choose 'train' or 'test'")
    root = mnist_root(data_dir)
    images_path, labels_path, names = _locate(root, split)
    missing = [n for n, p in zip(names, (images_path, labels_path), strict=True) if p is None]
    if missing and not download:
        raise DataError(
            f"MNIST {split} files not found in {root}: missing {' and '.join(missing)}; "
            f"{_HOW_TO_POINT}"
        )
    md5 = MNIST_MD5 if md5 is None else md5
    if images_path is None:
        images_path = _download(root, names[0], base_url, md5, progress)
    if labels_path is None:
        labels_path = _download(root, names[1], base_url, md5, progress)
    images, labels = read_idx(images_path), read_idx(labels_path)
    _check_images(images, images_path)
    _check_labels(labels, labels_path)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"MNIST {split}: {images_path} holds {images.shape[0]} images but {labels_path} "
            f"holds {labels.shape[0]} labels; replace them with a matching pair of files"
        )
    return MnistSet(images, labels)
