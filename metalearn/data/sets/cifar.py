"""CIFAR-FS and FC100: two few-shot benchmarks cut from CIFAR-100, read from its official archive.

CIFAR-100 (Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html) holds 60000 RGB
images of 32x32 pixels in 100 fine classes (600 each: 500 in its train file, 100 in its
test file), grouped into 20 superclasses of 5 fine classes. The few-shot benchmarks pool
both files and split the *classes*:

- **CIFAR-FS** (Bertinetto et al., "Meta-learning with differentiable closed-form
  solvers", ICLR 2019): 64 / 16 / 20 fine classes chosen at random;
- **FC100** (Oreshkin et al., "TADAM: Task dependent adaptive metric for improved few-shot
  learning", NeurIPS 2018): split by superclass, 12 / 4 / 4 superclasses = 60 / 20 / 20
  fine classes, so that test classes share no superclass with training ones.

The class lists ship with metalearn (``metalearn/data/splits/cifar_fs.json`` and
``fc100.json``, each naming its source). A split is a :class:`ClassImages` with its classes
in the order of the split file and the 600 images of a class in a fixed order: those of the
archive's ``train`` file, in file order, then those of its ``test`` file, in file order.

Layout under ``<data_dir>/cifar100/``, either or both of:

1. ``cifar-100-python.tar.gz``, the official archive (read in memory, not extracted);
2. ``cifar-100-python/`` with its ``train``, ``test`` and ``meta`` files (the archive
   extracted there); when complete, it is read instead of the archive (no decompression).

The three files are Python 2 pickles: ``train`` and ``test`` are dicts with ``data``, a
uint8 array (N, 3072) whose row is one image as 1024 red, 1024 green and 1024 blue values,
each a 32x32 plane in row-major order, and the lists ``fine_labels`` and ``coarse_labels``;
``meta`` has ``fine_label_names`` (100) and ``coarse_label_names`` (20). A row therefore
reshapes to (3, 32, 32), the (C, H, W) layout used everywhere in metalearn, without a copy.

The whole data set is 180 MB of pixels, so a split is built in memory on every load (one
or two seconds at 32x32; about ten more to resize every image to 84x84) and no disk cache
is written. With ``download=True`` an absent archive is fetched from :data:`CIFAR100_URL`
and its MD5 checked before it is kept.
"""

from __future__ import annotations

import logging
import pickle
import tarfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image

from metalearn.data.download import download_file, download_folder, one_line
from metalearn.data.sets.formats import load_array_pickle, packaged_split
from metalearn.data.storage import SPLIT_NAMES, ClassImages
from metalearn.errors import ConfigError, DataError

__all__ = [
    "CIFAR100_ARCHIVE",
    "CIFAR100_FOLDER",
    "CIFAR100_MD5",
    "CIFAR100_URL",
    "CIFAR_FS_CLASSES",
    "FC100_CLASSES",
    "FC100_SUPERCLASSES",
    "IMAGES_PER_CLASS",
    "IMAGE_SIZE",
    "NUM_COARSE_CLASSES",
    "NUM_FINE_CLASSES",
    "cifar100_root",
    "load_cifar_fs",
    "load_fc100",
    "prepare_cifar100",
]

log = logging.getLogger(__name__)

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
"""Official download location of the CIFAR-100 python version."""

CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
"""MD5 of the official archive (as on the CIFAR page and in torchvision / torchmeta);
checked on download only (a present copy is checked for content)."""

CIFAR100_ARCHIVE = "cifar-100-python.tar.gz"
CIFAR100_FOLDER = "cifar-100-python"

IMAGE_SIZE = 32
NUM_FINE_CLASSES = 100
NUM_COARSE_CLASSES = 20

IMAGES_PER_CLASS: tuple[int, int] = (500, 100)
"""Images of each fine class in the official ``train`` and ``test`` files (600 pooled)."""

CIFAR_FS_CLASSES: dict[str, int] = {"train": 64, "val": 16, "test": 20}
"""Fine classes per split of CIFAR-FS (Bertinetto et al. 2019)."""

FC100_CLASSES: dict[str, int] = {"train": 60, "val": 20, "test": 20}
"""Fine classes per split of FC100 (Oreshkin et al. 2018)."""

FC100_SUPERCLASSES: dict[str, int] = {"train": 12, "val": 4, "test": 4}
"""Superclasses per split of FC100."""

_MEMBERS = ("train", "test", "meta")
_PIXELS = 3 * IMAGE_SIZE * IMAGE_SIZE


def cifar100_root(data_dir: str | Path) -> Path:
    """Return the CIFAR-100 root inside ``data_dir``: ``<data_dir>/cifar100``.

    It holds ``cifar-100-python.tar.gz`` and/or the extracted ``cifar-100-python/``.
    """
    return Path(data_dir).expanduser() / "cifar100"


def _how_to_get(root: Path) -> str:
    return (
        f"download {CIFAR100_URL} and put {CIFAR100_ARCHIVE} (or the {CIFAR100_FOLDER}/ folder "
        f"it extracts to) in {root}, set paths.data_dir / METALEARN_DATA_DIR to a folder "
        f"holding cifar100/, or enable data.download=true"
    )


# --------------------------------------------------------------------------------------
# Locating and downloading a copy
# --------------------------------------------------------------------------------------


def _missing_members(folder: Path) -> list[str]:
    return [name for name in _MEMBERS if not (folder / name).is_file()]


def _locate(root: Path) -> Path | None:
    """The complete extracted folder, else the archive, else None."""
    folder = root / CIFAR100_FOLDER
    if folder.is_dir() and not _missing_members(folder):
        return folder
    archive = root / CIFAR100_ARCHIVE
    if archive.is_file():
        return archive
    return None


def _member_key(name: str) -> str | None:
    """``train`` / ``test`` / ``meta`` for the archive member of that file, else None."""
    name = name.removeprefix("./")
    folder, _, base = name.partition("/")
    return base if folder == CIFAR100_FOLDER and base in _MEMBERS else None


def _check_archive(path: Path) -> None:
    """``validate`` of a download: a gzip-compressed tar holding the three pickles."""
    found: set[str] = set()
    try:
        with tarfile.open(path, "r|gz") as tar:
            for member in tar:
                key = _member_key(member.name)
                if key is not None and member.isfile():
                    found.add(key)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise DataError(
            f"it is not a gzip-compressed tar archive ({type(err).__name__}: {one_line(err)})"
        ) from err
    missing = [f"{CIFAR100_FOLDER}/{name}" for name in _MEMBERS if name not in found]
    if missing:
        raise DataError(f"it holds no {', '.join(missing)}")


def prepare_cifar100(
    data_dir: str | Path,
    download: bool = True,
    progress: bool = True,
    url: str = CIFAR100_URL,
    md5: str | None = CIFAR100_MD5,
) -> Path:
    """Make sure CIFAR-100 is under ``data_dir``, downloading the archive when it is absent.

    A present copy (the complete extracted folder or the archive) is used as it is; its
    content is checked when it is read. An absent archive is downloaded (only when
    ``download``) into ``cifar100_root(data_dir)``, its MD5 checked (when ``md5`` is not
    None) and its listing checked, then written atomically; when that fails, the folders
    the download created are removed again.

    Args:
        data_dir: The data folder; CIFAR-100 lives in ``cifar100_root(data_dir)``.
        download: Download the archive when no copy is present.
        progress: Show a progress bar while downloading.
        url: Where to download the archive from.
        md5: Expected MD5 of the download, or None to skip that check.

    Returns:
        The copy to read: the extracted ``cifar-100-python`` folder or the archive.

    Raises:
        DataError: No copy is present and ``download`` is off, or the download fails
            (one line saying where to get the archive and where to put it).
    """
    root = cifar100_root(data_dir)
    source = _locate(root)
    if source is not None:
        return source
    folder = root / CIFAR100_FOLDER
    if not download:
        if folder.is_dir():
            missing = ", ".join(_missing_members(folder))
            raise DataError(
                f"the CIFAR-100 folder {folder} lacks {missing} and {root / CIFAR100_ARCHIVE} is "
                f"absent: extract {CIFAR100_ARCHIVE} ({CIFAR100_URL}) into {root} again, or "
                f"enable data.download=true"
            )
        raise DataError(f"CIFAR-100 not found at {root}: {_how_to_get(root)}")
    target = root / CIFAR100_ARCHIVE
    log.info("Downloading CIFAR-100 from %s", url)
    with download_folder(root, "CIFAR-100"):
        download_file(
            url,
            target,
            what=f"CIFAR-100 {CIFAR100_ARCHIVE}",
            manual=f"download {url} by hand and save it as {target}",
            md5=md5,
            validate=_check_archive,
            progress=progress,
        )
    return target


# --------------------------------------------------------------------------------------
# Reading the pickles
# --------------------------------------------------------------------------------------


class _BadCopy(Exception):
    """What is wrong with a copy, as the end of a sentence starting with its name."""


_READ_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    OSError,
    ValueError,
    TypeError,
    AttributeError,
    ImportError,
    IndexError,
    KeyError,
    MemoryError,
    zlib.error,
    tarfile.TarError,
)


def _text(value: object) -> str:
    """A name from a pickle: Python 2 strings load as str (latin-1), Python 3 bytes as bytes."""
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


def _unpickle(handle: IO[bytes], name: str) -> dict[str, Any]:
    """One of the three pickles, its keys as str."""
    try:
        payload = load_array_pickle(handle)
    except _READ_ERRORS as err:
        raise _BadCopy(f"has an unreadable {name} ({type(err).__name__}: {one_line(err)})") from err
    if not isinstance(payload, dict):
        raise _BadCopy(f"has a {name} that is not a pickled dict")
    return {_text(key): value for key, value in payload.items()}


def _read_folder(folder: Path) -> dict[str, dict[str, Any]]:
    payloads = {}
    for name in _MEMBERS:
        try:
            with open(folder / name, "rb") as handle:
                payloads[name] = _unpickle(handle, name)
        except OSError as err:
            raise _BadCopy(f"has an unreadable {name} ({one_line(err)})") from err
    return payloads


def _read_archive(path: Path) -> dict[str, dict[str, Any]]:
    """The three pickles, unpickled straight from the compressed stream (nothing extracted)."""
    payloads: dict[str, dict[str, Any]] = {}
    try:
        with tarfile.open(path, "r|gz") as tar:
            for member in tar:
                key = _member_key(member.name)
                if key is None or key in payloads or not member.isfile():
                    continue
                handle = tar.extractfile(member)
                if handle is None:
                    continue
                payloads[key] = _unpickle(handle, f"{CIFAR100_FOLDER}/{key}")
                if len(payloads) == len(_MEMBERS):
                    break
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise _BadCopy(f"is corrupt or truncated ({type(err).__name__}: {one_line(err)})") from err
    missing = [f"{CIFAR100_FOLDER}/{name}" for name in _MEMBERS if name not in payloads]
    if missing:
        raise _BadCopy(f"holds no {', '.join(missing)}")
    return payloads


def _names(meta: Mapping[str, Any], key: str, count: int) -> list[str]:
    names = meta.get(key)
    if not isinstance(names, list) or len(names) != count:
        got = len(names) if isinstance(names, list) else "no"
        raise _BadCopy(f"has a meta with {got} {key}, expected {count}")
    return [_text(name) for name in names]


def _labels(payload: Mapping[str, Any], key: str, name: str, rows: int, count: int) -> np.ndarray:
    try:
        labels = np.asarray(payload[key], dtype=np.int64).reshape(-1)
    except (KeyError, TypeError, ValueError) as err:
        raise _BadCopy(f"has a {name} without usable {key} ({one_line(err)})") from err
    if len(labels) != rows or (rows and (labels.min() < 0 or labels.max() >= count)):
        raise _BadCopy(
            f"has a {name} whose {key} are not {rows} labels in [0, {count}) (one per image)"
        )
    return labels


@dataclass(frozen=True)
class _Cifar100:
    """The pooled archive: per file (``train`` / ``test``) the pixels and labels."""

    data: dict[str, np.ndarray]  # (N, 3072) uint8
    rows: dict[str, np.ndarray]  # (100, per_class) int64: rows of each fine class, file order
    coarse_of: np.ndarray  # (100,) int64: the superclass of each fine class
    fine_names: list[str]
    coarse_names: list[str]


def _check(payloads: Mapping[str, Mapping[str, Any]], per_class: Sequence[int]) -> _Cifar100:
    """Check the unpickled files; group the rows of each fine class (stable: file order)."""
    meta = payloads["meta"]
    fine_names = _names(meta, "fine_label_names", NUM_FINE_CLASSES)
    coarse_names = _names(meta, "coarse_label_names", NUM_COARSE_CLASSES)
    data, rows = {}, {}
    coarse_of = np.full(NUM_FINE_CLASSES, -1, np.int64)
    for name, expected in zip(("train", "test"), per_class, strict=True):
        payload = payloads[name]
        images = payload.get("data")
        if (
            not isinstance(images, np.ndarray)
            or images.dtype != np.uint8
            or images.ndim != 2
            or images.shape[1] != _PIXELS
        ):
            got = (
                f"{images.dtype} {tuple(images.shape)}"
                if isinstance(images, np.ndarray)
                else type(images).__name__
            )
            raise _BadCopy(
                f"has a {name} whose data is {got}, expected uint8 (N, {_PIXELS}) "
                f"(32x32 RGB images)"
            )
        fine = _labels(payload, "fine_labels", name, len(images), NUM_FINE_CLASSES)
        coarse = _labels(payload, "coarse_labels", name, len(images), NUM_COARSE_CLASSES)
        counts = np.bincount(fine, minlength=NUM_FINE_CLASSES)
        wrong = np.flatnonzero(counts != expected)
        if wrong.size:
            c = int(wrong[0])
            raise _BadCopy(
                f"has {counts[c]} images of class {fine_names[c]} in its {name} file, expected "
                f"{expected}: it is not the complete official CIFAR-100"
            )
        for f, c in {(int(f), int(c)) for f, c in zip(fine, coarse, strict=True)}:
            if coarse_of[f] not in (-1, c):
                raise _BadCopy(
                    f"puts class {fine_names[f]} in two superclasses ({coarse_names[coarse_of[f]]} "
                    f"and {coarse_names[c]}): its coarse_labels are not those of CIFAR-100"
                )
            coarse_of[f] = c
        data[name] = images
        rows[name] = np.argsort(fine, kind="stable").reshape(NUM_FINE_CLASSES, expected)
    return _Cifar100(data, rows, coarse_of, fine_names, coarse_names)


def _read(source: Path, per_class: Sequence[int]) -> _Cifar100:
    """Read and check a copy (the extracted folder or the archive)."""
    is_folder = source.is_dir()
    log.info("Reading CIFAR-100 from %s", source)
    try:
        payloads = _read_folder(source) if is_folder else _read_archive(source)
        return _check(payloads, per_class)
    except _BadCopy as err:
        if is_folder:
            kind = "folder"
            fix = (
                f"delete it and extract {CIFAR100_ARCHIVE} ({CIFAR100_URL}) into {source.parent} "
                f"again"
            )
        else:
            kind = "archive"
            fix = (
                f"delete it and enable data.download=true, or replace it with {CIFAR100_ARCHIVE} "
                f"from {CIFAR100_URL}"
            )
        raise DataError(f"the CIFAR-100 {kind} {source} {err}; {fix}") from err


# --------------------------------------------------------------------------------------
# Split files and splits
# --------------------------------------------------------------------------------------


def _split_images(
    cifar: _Cifar100, labels: Sequence[int], names: Sequence[str], image_size: int
) -> ClassImages:
    """The images of ``labels``: per class, its train-file rows then its test-file rows."""
    train, test = cifar.rows["train"], cifar.rows["test"]
    per_train, per_test = train.shape[1], test.shape[1]
    out = np.empty((len(labels), per_train + per_test, _PIXELS), np.uint8)
    for c, label in enumerate(labels):
        out[c, :per_train] = cifar.data["train"][train[label]]
        out[c, per_train:] = cifar.data["test"][test[label]]
    images = out.reshape(len(labels), per_train + per_test, 3, IMAGE_SIZE, IMAGE_SIZE)
    if image_size != IMAGE_SIZE:
        images = _resize(images, image_size)
    return ClassImages.from_tensor(torch.from_numpy(images), list(names))


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """(..., 3, 32, 32) -> (..., 3, size, size) with PIL's bilinear filter (antialiased
    when shrinking: PIL widens the filter by the scale factor)."""
    flat = images.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE)
    out = np.empty((len(flat), 3, size, size), np.uint8)
    for i, image in enumerate(flat):
        pil = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)))
        out[i] = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    return out.reshape(*images.shape[:-3], 3, size, size)


def _labels_of(cifar: _Cifar100, names: Iterable[str], split: str, where: str) -> list[int]:
    index = {name: i for i, name in enumerate(cifar.fine_names)}
    labels = []
    for name in names:
        if name not in index:
            raise DataError(
                f"the CIFAR-100 meta has no class {name!r} of the {split} split of {where}: the "
                f"copy is not the official CIFAR-100; replace it with {CIFAR100_ARCHIVE} from "
                f"{CIFAR100_URL}"
            )
        labels.append(index[name])
    return labels


def _load(
    name: str,
    data_dir: str | Path,
    image_size: int,
    download: bool,
    progress: bool,
    images_per_class: Sequence[int],
    expected: Mapping[str, int],
) -> tuple[_Cifar100, str, dict[str, Any], dict[str, list[int]]]:
    if image_size < 1:
        raise ConfigError(f"data.image_size must be >= 1, got {image_size}")
    if len(images_per_class) != 2 or min(images_per_class) < 1:
        raise ConfigError(
            f"images_per_class must be two counts >= 1 (train file, test file), got "
            f"{tuple(images_per_class)}"
        )
    where, payload = packaged_split(name, expected)  # a broken install fails before any download
    source = prepare_cifar100(data_dir, download=download, progress=progress)
    cifar = _read(source, images_per_class)
    labels = {split: _labels_of(cifar, payload[split], split, where) for split in SPLIT_NAMES}
    return cifar, where, payload, labels


def load_cifar_fs(
    data_dir: str | Path,
    cache_dir: str | Path,
    image_size: int = IMAGE_SIZE,
    download: bool = True,
    progress: bool = True,
    *,
    images_per_class: tuple[int, int] = IMAGES_PER_CLASS,
) -> dict[str, ClassImages]:
    """The CIFAR-FS splits (Bertinetto et al. 2019): 64 / 16 / 20 classes of 600 images.

    Classes in the order of ``splits/cifar_fs.json``; the images of a class are its
    train-file images then its test-file images, each in file order (see the module
    docstring). Images are uint8 (3, 32, 32); with another ``image_size`` they are resized
    with PIL's bilinear filter (antialiased when shrinking).

    Args:
        data_dir: The data folder; CIFAR-100 lives in ``cifar100_root(data_dir)``.
        cache_dir: Unused (the splits are built in memory in a second or two); kept for the
            signature every data set's loader shares.
        image_size: Side of the images.
        download: Download the archive when no copy is present.
        progress: Show a progress bar while downloading.
        images_per_class: Images of each fine class in the train and test files (500,
            100 in the official archive; smaller copies in tests).

    Returns:
        ``{"train", "val", "test"}`` -> :class:`ClassImages`, class names as in CIFAR-100.

    Raises:
        DataError: The copy is absent (and not downloaded), corrupt or incomplete, or lacks
            a class of the split; one line naming the file and what to do.
        ConfigError: ``image_size`` or ``images_per_class`` is not positive.
    """
    del cache_dir
    cifar, _, payload, labels = _load(
        "cifar_fs", data_dir, image_size, download, progress, images_per_class, CIFAR_FS_CLASSES
    )
    return {
        split: _split_images(cifar, labels[split], payload[split], image_size)
        for split in SPLIT_NAMES
    }


def load_fc100(
    data_dir: str | Path,
    cache_dir: str | Path,
    image_size: int = IMAGE_SIZE,
    download: bool = True,
    progress: bool = True,
    *,
    images_per_class: tuple[int, int] = IMAGES_PER_CLASS,
) -> dict[str, ClassImages]:
    """The FC100 splits (Oreshkin et al. 2018): 60 / 20 / 20 classes of 600 images, from
    12 / 4 / 4 whole superclasses.

    Classes in the order of ``splits/fc100.json`` (superclass by superclass, fine classes
    in CIFAR-100 label order within one); images ordered and resized as in
    :func:`load_cifar_fs`. The split file's superclasses are checked against the archive's
    coarse labels: each split must hold exactly the fine classes of its superclasses.

    Args:
        data_dir: The data folder; CIFAR-100 lives in ``cifar100_root(data_dir)``.
        cache_dir: Unused (the splits are built in memory); kept for a uniform signature.
        image_size: Side of the images.
        download: Download the archive when no copy is present.
        progress: Show a progress bar while downloading.
        images_per_class: Images of each fine class in the train and test files (500, 100).

    Returns:
        ``{"train", "val", "test"}`` -> :class:`ClassImages`, class names as in CIFAR-100.

    Raises:
        DataError: As :func:`load_cifar_fs`, or the archive's superclasses do not match
            the split file.
        ConfigError: ``image_size`` or ``images_per_class`` is not positive.
    """
    del cache_dir
    cifar, where, payload, labels = _load(
        "fc100", data_dir, image_size, download, progress, images_per_class, FC100_CLASSES
    )
    superclasses = payload.get("superclasses")
    coarse_index = {name: i for i, name in enumerate(cifar.coarse_names)}
    for split in SPLIT_NAMES:
        names = superclasses.get(split) if isinstance(superclasses, dict) else None
        if not isinstance(names, list) or len(names) != FC100_SUPERCLASSES[split]:
            raise DataError(
                f"{where} does not list {FC100_SUPERCLASSES[split]} {split} superclasses; "
                f"reinstall metalearn"
            )
        unknown = [name for name in names if name not in coarse_index]
        if unknown:
            raise DataError(
                f"the CIFAR-100 meta has no superclass {unknown[0]!r} of the {split} split of "
                f"{where}: the copy is not the official CIFAR-100; replace it with "
                f"{CIFAR100_ARCHIVE} from {CIFAR100_URL}"
            )
        coarse = {coarse_index[name] for name in names}
        held = {f for f in range(NUM_FINE_CLASSES) if int(cifar.coarse_of[f]) in coarse}
        if held != set(labels[split]):
            raise DataError(
                f"the superclasses of the CIFAR-100 copy do not match the FC100 {split} split "
                f"of {where} ({len(held)} fine classes in {', '.join(names)}): its coarse labels "
                f"are not those of the official CIFAR-100; replace it with {CIFAR100_ARCHIVE} "
                f"from {CIFAR100_URL}"
            )
    return {
        split: _split_images(cifar, labels[split], payload[split], image_size)
        for split in SPLIT_NAMES
    }
