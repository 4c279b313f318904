"""tieredImageNet on disk (Ren et al.'s pickles, or one image folder per class), decoded once
into the memory-mapped uint8 cache.

tieredImageNet (Ren et al., "Meta-Learning for Semi-Supervised Few-Shot Classification",
ICLR 2018) is a subset of ILSVRC-12: 608 classes (779,165 images, 84x84 RGB) grouped under
34 high-level categories of the ImageNet hierarchy, of which 20 (351 classes) are for
training, 6 (97 classes) for validation and 8 (160 classes) for testing, so that test
classes are less similar to training classes than in miniImageNet. The class and category
synsets of each split are ``metalearn/data/splits/tieredimagenet.json``, taken from Ren et
al.'s repository (github.com/renmengye/few-shot-ssl-public,
``fewshot/data/tiered_imagenet_split/{train,val,test}.csv``).

Layout under ``<data_dir>/tieredimagenet/`` (or its subfolder ``tiered-imagenet/``, as Ren et
al.'s ``tiered-imagenet.tar`` extracts), one of, per split (train / val / test):

1. ``<split>_images_png.pkl``: a pickled list of the split's images, each a uint8 numpy
   array of the bytes of one 84x84 PNG file (``cv2.imencode``), with ``<split>_labels.pkl``:
   a pickled dict with ``label_specific`` (one class index per image),
   ``label_specific_str`` (the name of each class index), ``label_general`` and
   ``label_general_str`` (the categories). Ren et al.'s code (``fewshot/data/
   tiered_imagenet.py``) names the classes by their ILSVRC names from the distribution's
   ``class_names.txt`` (WordNet lemmas, ``"limpkin, Aramus pictus"``), not their synset
   ids, and numbers them in directory-listing order; each name is matched to its synset
   through the lemmas in the split file, or else the ``synsets.txt`` / ``class_names.txt``
   pair of the distribution; synset ids are accepted too;
2. ``<split>_images.npz`` (``images``: uint8 (N, 84, 84, 3), the decompressed form Ren et
   al.'s code makes, in OpenCV's BGR channel order) with the same ``<split>_labels.pkl``;
3. ``<split>/<wnid>/*.jpg|png``: one folder of images per class (the layout of
   github.com/yaoyao-liu/tiered-imagenet-tools), any size (resized, bilinear).

Pickles are read with a restricted unpickler (numpy arrays, dicts and lists only: these
files come from mirrors). An images pickle is opened only when its cache entry is missing
(its PNG bytes, several GB for train, are held in memory while decoding); the decoded
images, 16.5 GB in all, are memory-mapped cache files
(:func:`metalearn.data.cache.cached_class_images`).
Classes come in the order of the split file, the images of a class in file order (pickles)
or sorted by name (folders).

There is no stable official host: the files are on Google Drive (the link in Ren et al.'s
README; learn2learn also downloads them from https://zenodo.org/record/7978538, files
``tiered-imagenet-<name>``), so :func:`prepare_tieredimagenet` only says where to get them
and where to put them.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import pickle
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from metalearn.data.cache import cached_class_images, file_listing
from metalearn.data.download import one_line
from metalearn.data.sets.folder import RESAMPLE, class_folders, decode_image
from metalearn.data.sets.formats import load_array_pickle, packaged_split
from metalearn.data.storage import SPLIT_NAMES, ClassImages
from metalearn.errors import ConfigError, DataError

__all__ = [
    "IMAGE_SIZE",
    "PREPROCESS_VERSION",
    "TIEREDIMAGENET_CLASSES",
    "TIEREDIMAGENET_IMAGES",
    "TIEREDIMAGENET_URL",
    "load_tieredimagenet",
    "prepare_tieredimagenet",
    "tieredimagenet_root",
    "tieredimagenet_split",
]

log = logging.getLogger(__name__)

IMAGE_SIZE = 84

TIEREDIMAGENET_CLASSES: dict[str, int] = {"train": 351, "val": 97, "test": 160}
"""Classes per split (Ren et al. 2018)."""

TIEREDIMAGENET_IMAGES: dict[str, int] = {"train": 448_695, "val": 124_261, "test": 206_209}
"""Images per split of the distributed copy (779,165 in all); a copy of another size is
read all the same (with a note in the log)."""

TIEREDIMAGENET_URL = "https://github.com/renmengye/few-shot-ssl-public#tieredimagenet"
"""Where the files are linked from (a Google Drive archive, ``tiered-imagenet.tar``)."""

PREPROCESS_VERSION = 1
"""Bump whenever the decoding changes, so that stale caches are not reused."""

_SUBFOLDER = "tiered-imagenet"  # what tiered-imagenet.tar extracts to


def _how_to_get(root: Path) -> str:
    return (
        f"there is no official host: download tiered-imagenet.tar as linked in Ren et al.'s "
        f"README ({TIEREDIMAGENET_URL}), extract it and put its "
        f"{{train,val,test}}_images_png.pkl and {{train,val,test}}_labels.pkl (or one folder "
        f"per split holding one folder of images per class synset) in {root}, or set "
        f"paths.data_dir / METALEARN_DATA_DIR to the folder holding tieredimagenet/"
    )


Form = Literal["png", "npz", "folder"]


def tieredimagenet_root(data_dir: str | Path) -> Path:
    """The tieredImageNet root inside ``data_dir``: ``<data_dir>/tieredimagenet``."""
    return Path(data_dir).expanduser() / "tieredimagenet"


def _split_spec() -> dict[str, Any]:
    return packaged_split("tieredimagenet", TIEREDIMAGENET_CLASSES)[1]


def tieredimagenet_split(split: str) -> list[str]:
    """The class synsets (WordNet ids) of ``split`` (train / val / test), in the order of
    Ren et al.'s split file (grouped by category)."""
    if split not in SPLIT_NAMES:
        raise ConfigError(f"unknown tieredImageNet split {split!r}: train, val or test")
    return list(_split_spec()[split])


# --------------------------------------------------------------------------------------
# Locating a copy
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """One split as found on disk."""

    split: str
    form: Form
    base: Path  # the folder holding the files (root or root/tiered-imagenet)
    images: Path  # the images pickle or npz, or the split's folder
    labels: Path | None  # the labels pickle (pickle forms)


def _locate(root: Path, split: str) -> _Source | None:
    """The present copy of ``split`` (PNG pickle, then npz, then folder), or None."""
    for base in (root, root / _SUBFOLDER):
        labels = base / f"{split}_labels.pkl"
        forms: tuple[tuple[Form, str], ...] = (
            ("png", f"{split}_images_png.pkl"),
            ("npz", f"{split}_images.npz"),
        )
        for form, name in forms:
            images = base / name
            if images.is_file():
                if not labels.is_file():
                    raise DataError(
                        f"{images} is present but {labels} is not: put the tieredImageNet "
                        f"labels pickle of the {split} split next to it"
                    )
                return _Source(split, form, base, images, labels)
        if (base / split).is_dir():
            return _Source(split, "folder", base, base / split, None)
    return None


def prepare_tieredimagenet(
    data_dir: str | Path, download: bool = True, progress: bool = True
) -> Path:
    """Check that every split of tieredImageNet is present; return its root.

    ``download`` and ``progress`` are accepted for a signature uniform with the other data
    sets: there is no stable host to download from (see :data:`TIEREDIMAGENET_URL`).

    Raises:
        DataError: a split is absent (one line: where the files come from and where to put
            them), or an images pickle lacks its labels pickle.
    """
    root = tieredimagenet_root(data_dir)
    missing = [split for split in SPLIT_NAMES if _locate(root, split) is None]
    if missing:
        raise DataError(
            f"tieredImageNet ({', '.join(missing)}) not found in {root}: " + _how_to_get(root)
        )
    return root


# --------------------------------------------------------------------------------------
# Pickles
# --------------------------------------------------------------------------------------


def _replace(path: Path) -> str:
    return f"replace {path.name} with the file of Ren et al.'s tiered-imagenet.tar"


def _load_pickle(path: Path, what: str) -> Any:
    try:
        with open(path, "rb") as handle:
            return load_array_pickle(handle)
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError) as err:
        reason = one_line(err) or type(err).__name__
    except (AttributeError, ImportError, IndexError, KeyError, MemoryError) as err:
        reason = f"{type(err).__name__}: {one_line(err)}"
    raise DataError(f"cannot read the tieredImageNet {what} {path} ({reason}); {_replace(path)}")


def _text(value: Any) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


def _synset_table(base: Path) -> dict[str, list[str]]:
    """Class name -> synsets, from the distribution's ``synsets.txt`` and
    ``class_names.txt`` (line by line), or {} when absent."""
    try:
        synsets = (base / "synsets.txt").read_text(encoding="utf-8").splitlines()
        names = (base / "class_names.txt").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    table: dict[str, list[str]] = {}
    for synset, name in zip(synsets, names, strict=False):
        table.setdefault(name.strip(), []).append(synset.strip())
    return table


def _class_rows(source: _Source) -> tuple[list[tuple[str, np.ndarray]], int]:
    """(synset, rows of its images) of the split's classes, in the split file's order, and
    the number of images the labels pickle lists.

    Raises:
        DataError: the labels pickle is unreadable, names a class outside the split, or
            lacks one of the split's classes.
    """
    assert source.labels is not None
    path, split = source.labels, source.split
    payload = _load_pickle(path, "labels pickle")
    if isinstance(payload, dict):
        payload = {_text(key): value for key, value in payload.items()}
    if isinstance(payload, dict) and "labels" in payload and "label_specific" not in payload:
        raise DataError(
            f"the tieredImageNet labels pickle {path} holds only 'labels' (a repack, as "
            f"MetaOptNet's copy), which does not name the classes, so they cannot be matched "
            f"to Ren et al.'s split; use the {path.name} of Ren et al.'s tiered-imagenet.tar "
            f"(with label_specific and label_specific_str)"
        )
    if not isinstance(payload, dict) or not {"label_specific", "label_specific_str"} <= set(
        payload
    ):
        raise DataError(
            f"the tieredImageNet labels pickle {path} is not a dict with label_specific and "
            f"label_specific_str; {_replace(path)}"
        )
    try:
        labels = np.asarray(payload["label_specific"]).reshape(-1).astype(np.int64, casting="safe")
    except (TypeError, ValueError) as err:
        raise DataError(
            f"label_specific of the tieredImageNet labels pickle {path} is not an integer "
            f"array ({one_line(err)}); {_replace(path)}"
        ) from err
    label_str = payload["label_specific_str"]
    if isinstance(label_str, dict):  # index -> name
        label_str = [label_str[k] for k in sorted(label_str)]
    names = [_text(name).strip() for name in label_str]
    if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
        raise DataError(
            f"label_specific of the tieredImageNet labels pickle {path} holds class indices "
            f"outside label_specific_str (0..{len(names) - 1}); {_replace(path)}"
        )
    spec = _split_spec()
    wnids: list[str] = spec[split]
    in_split = set(wnids)
    by_words: dict[str, list[str]] = {}
    for wnid in wnids:
        by_words.setdefault(spec["words"][wnid], []).append(wnid)
    table: dict[str, list[str]] | None = None
    index: dict[str, int] = {}
    for k, name in enumerate(names):
        if name in in_split:
            found = [name]
        else:
            found = by_words.get(name, [])
            if not found:
                if table is None:
                    table = _synset_table(source.base)
                found = [w for w in table.get(name, []) if w in in_split]
        if len(found) != 1:
            raise DataError(
                f"class {k} of the tieredImageNet labels pickle {path}, {name!r}, is not one "
                f"of the {len(wnids)} {split} classes of Ren et al. (by synset id or WordNet "
                f"name): the file is not the {split} split; {_replace(path)}"
            )
        if found[0] in index:
            raise DataError(
                f"the tieredImageNet labels pickle {path} names the class {found[0]} twice "
                f"(classes {index[found[0]]} and {k}); {_replace(path)}"
            )
        index[found[0]] = k
    rows_of = {k: np.flatnonzero(labels == k) for k in index.values()}
    for wnid in wnids:
        if wnid not in index or not rows_of[index[wnid]].size:
            raise DataError(
                f"the tieredImageNet labels pickle {path} has no images of the {split} class "
                f"{wnid} ({spec['words'][wnid]}); {_replace(path)}"
            )
    return [(wnid, rows_of[index[wnid]]) for wnid in wnids], int(labels.size)


def _to_chw(image: Image.Image, image_size: int) -> np.ndarray:
    rgb = image.convert("RGB")
    if rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), RESAMPLE["bilinear"])
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


@contextlib.contextmanager
def _png_decoder(path: Path, count: int, image_size: int) -> Iterator[Callable[[int], np.ndarray]]:
    """Open the images pickle (all of it, in memory); yield row -> (3, S, S) uint8."""
    log.info("Reading the tieredImageNet images pickle %s", path)
    images = _load_pickle(path, "images pickle")
    if not isinstance(images, list | np.ndarray) or len(images) != count:
        size = len(images) if isinstance(images, list | np.ndarray) else type(images).__name__
        raise DataError(
            f"the tieredImageNet images pickle {path} holds {size} images where its labels "
            f"pickle has {count}: the pair does not match; {_replace(path)}"
        )

    def decode(row: int) -> np.ndarray:
        item = images[row]
        try:
            data = item.tobytes() if isinstance(item, np.ndarray) else bytes(item)
            with Image.open(io.BytesIO(data)) as image:
                return _to_chw(image, image_size)
        except (OSError, UnidentifiedImageError, ValueError, TypeError) as err:
            raise DataError(
                f"row {row} of the tieredImageNet images pickle {path} is not a readable PNG "
                f"image ({one_line(err)}); the file is corrupt: {_replace(path)}"
            ) from err

    yield decode


def _npz_images(path: Path) -> np.ndarray:
    """``images`` of an npz file: memory-mapped when stored uncompressed (``np.savez``),
    read into memory otherwise."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("images.npy")
        if info.compress_type == zipfile.ZIP_STORED:
            with open(path, "rb") as handle:
                handle.seek(info.header_offset)
                local = handle.read(30)
                if local[:4] != b"PK\x03\x04":
                    raise ValueError("bad zip member header")
                name_len = int.from_bytes(local[26:28], "little")
                extra_len = int.from_bytes(local[28:30], "little")
                handle.seek(info.header_offset + 30 + name_len + extra_len)
                version = np.lib.format.read_magic(handle)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
                offset = handle.tell()
            if fortran:
                raise ValueError("images is stored in Fortran order")
            return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset)
        log.warning("%s is compressed: reading its images into memory", path)
        with archive.open("images.npy") as member:
            array: np.ndarray = np.lib.format.read_array(member)
            return array


@contextlib.contextmanager
def _npz_decoder(path: Path, count: int, image_size: int) -> Iterator[Callable[[int], np.ndarray]]:
    """Open the npz file; yield row -> (3, S, S) uint8 RGB (the file holds BGR)."""
    try:
        images = _npz_images(path)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(
            f"cannot read the tieredImageNet images {path} ({one_line(err)}); it must be an "
            f"npz file with images, uint8 (N, 84, 84, 3): replace it, or use "
            f"{path.name.replace('_images.npz', '_images_png.pkl')}"
        ) from err
    shape = (count, IMAGE_SIZE, IMAGE_SIZE, 3)
    if images.dtype != np.uint8 or images.shape != shape:
        raise DataError(
            f"the tieredImageNet images {path} are {images.dtype} {tuple(images.shape)}, "
            f"expected uint8 {shape} (as many as its labels pickle lists); replace the file"
        )

    def decode(row: int) -> np.ndarray:
        rgb = np.ascontiguousarray(images[row][:, :, ::-1])
        if image_size == IMAGE_SIZE:
            return rgb.transpose(2, 0, 1)
        return _to_chw(Image.fromarray(rgb), image_size)

    yield decode


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _load_split(
    source: _Source, cache_dir: Path, image_size: int, progress: bool, workers: int
) -> ClassImages:
    split, root = source.split, source.base
    what = f"tieredImageNet {split}"
    kind = f"tieredimagenet_{split}"
    shape = (3, image_size, image_size)
    key: dict[str, Any] = {
        "form": source.form,
        "image_size": image_size,
        "preprocess_version": PREPROCESS_VERSION,
        "root": str(root.resolve()),
    }
    if source.form == "folder":
        wnids = tieredimagenet_split(split)
        where = f"the tieredImageNet {split} split of Ren et al."
        files = class_folders(source.images, wnids, where)
        extra = sorted({p.name for p in source.images.iterdir() if p.is_dir()} - set(wnids))
        if extra:
            log.warning(
                "%s: ignoring %d folders that are not %s classes (%s)",
                source.images,
                len(extra),
                split,
                ", ".join(extra[:5]) + (", ..." if len(extra) > 5 else ""),
            )
        key["files"] = file_listing([path for _, group in files for path in group], root)
        decode = functools.partial(decode_image, image_size=image_size, channels=3)
        result = cached_class_images(
            cache_dir, kind, key, files, shape, decode, progress, workers, what=what
        )
    else:
        assert source.labels is not None
        rows, count = _class_rows(source)
        key["files"] = file_listing([source.images, source.labels], root)
        key["classes"] = [wnid for wnid, _ in rows]
        opener = _png_decoder if source.form == "png" else _npz_decoder
        result = cached_class_images(
            cache_dir,
            kind,
            key,
            [(wnid, r.tolist()) for wnid, r in rows],
            shape,
            progress=progress,
            workers=workers,
            decoder=functools.partial(opener, source.images, count, image_size),
            what=what,
        )
    if len(result.images) != TIEREDIMAGENET_IMAGES[split]:
        log.info(
            "%s has %d images (the distributed copy: %d)",
            what,
            len(result.images),
            TIEREDIMAGENET_IMAGES[split],
        )
    return result


def load_tieredimagenet(
    data_dir: str | Path,
    cache_dir: str | Path,
    image_size: int = IMAGE_SIZE,
    download: bool = True,
    progress: bool = True,
    *,
    workers: int = 4,
) -> dict[str, ClassImages]:
    """The three splits of tieredImageNet, decoded once into the memory-mapped cache.

    Each split is read from its PNG pickle, npz file or image folder (see the module
    docstring) into ``<cache_dir>/tieredimagenet_<split>_<digest>.npy``; the digest covers
    the source files' paths, sizes and modification times, ``image_size`` and
    :data:`PREPROCESS_VERSION`, so a changed file or setting decodes again. A split whose
    cache entry exists is read without opening its images.

    Args:
        data_dir: The data folder (see :func:`tieredimagenet_root`).
        cache_dir: Folder of the decoded cache; created when missing.
        image_size: Side of the decoded images (84; others are resized, bilinear).
        download: Accepted for a uniform signature; tieredImageNet cannot be downloaded.
        progress: Show a progress bar while decoding.
        workers: Decoding threads.

    Returns:
        ``{"train", "val", "test"}`` -> :class:`ClassImages` (3, size, size) uint8 RGB,
        classes in the order of the split file, named by their synsets.

    Raises:
        DataError: a split is absent, incomplete, corrupt or not Ren et al.'s, or the cache
            is not writable. One line, naming the file or class and what to do.
        ConfigError: ``image_size`` is not positive.
    """
    if image_size < 1:
        raise ConfigError(f"tieredImageNet image_size must be >= 1, got {image_size}")
    root = prepare_tieredimagenet(data_dir, download, progress)
    cache = Path(cache_dir).expanduser()
    out: dict[str, ClassImages] = {}
    for split in SPLIT_NAMES:
        source = _locate(root, split)
        assert source is not None  # prepare_tieredimagenet checked
        out[split] = _load_split(source, cache, image_size, progress, workers)
    return out
