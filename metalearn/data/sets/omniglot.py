"""Omniglot on disk: locate or download the official zips, decode once into a uint8 cache, split.

Pixel convention, used everywhere in metalearn: the official PNGs are 105x105, 1-bit, black
ink on a white background; :func:`preprocess_omniglot` inverts them so that **ink is bright**
(255 in uint8, 1.0 in float) and the background is 0, then shrinks them with an area average
(box filter), so a pixel of the result is the fraction of its source area covered by ink.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import math
import os
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from metalearn.data.cache import cached_class_images
from metalearn.data.download import download_file, download_folder
from metalearn.data.download import one_line as _one_line
from metalearn.errors import ConfigError, DataError

__all__ = [
    "IMAGES_PER_CHARACTER",
    "NUM_CHARACTERS",
    "OMNIGLOT_ALPHABETS",
    "OMNIGLOT_CHARACTERS",
    "OMNIGLOT_COLLECTIONS",
    "OMNIGLOT_MD5",
    "OMNIGLOT_SPLITS",
    "OMNIGLOT_URLS",
    "PREPROCESS_VERSION",
    "OmniglotCharacters",
    "load_omniglot",
    "load_omniglot_image",
    "omniglot_root",
    "prepare_omniglot",
    "preprocess_omniglot",
    "split_characters",
]

log = logging.getLogger(__name__)

OMNIGLOT_COLLECTIONS: tuple[str, str] = ("images_background", "images_evaluation")
"""The two official collections, in the order in which characters are numbered."""

OMNIGLOT_URLS: dict[str, str] = {
    "images_background": (
        "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_background.zip"
    ),
    "images_evaluation": (
        "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_evaluation.zip"
    ),
}
"""Official download location of each collection's zip."""

OMNIGLOT_MD5: dict[str, str] = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
"""md5 of the official zips; checked on download only (a present copy is checked for content)."""

OMNIGLOT_CHARACTERS: dict[str, int] = {"images_background": 964, "images_evaluation": 659}
"""Number of characters (character folders) in each official collection."""

OMNIGLOT_ALPHABETS: dict[str, int] = {"images_background": 30, "images_evaluation": 20}
"""Number of alphabets in each official collection (informative; not checked)."""

NUM_CHARACTERS = 1623
IMAGES_PER_CHARACTER = 20

OMNIGLOT_SPLITS: tuple[str, ...] = ("paper", "vinyals", "lake")
"""Character splits understood by :func:`split_characters`."""

PREPROCESS_VERSION = 1
"""Bump whenever :func:`preprocess_omniglot` changes, so that stale caches are not reused."""

_PAPER_SIZES = (1200, 100, 323)
_VINYALS_COLLECTIONS = {"background": "images_background", "evaluation": "images_evaluation"}
_CACHE_FORMAT = "metalearn-omniglot"
_HOW_TO_POINT = (
    "set paths.data_dir / METALEARN_DATA_DIR to a folder holding omniglot/omniglot-py/, "
    "or enable data.download=true to fetch the official zips"
)

# (alphabet, character) -> sorted list of image members (zip member names or file paths)
_Listing = dict[tuple[str, str], list[str]]


def omniglot_root(data_dir: str | Path) -> Path:
    """Return the Omniglot root inside ``data_dir``: ``<data_dir>/omniglot/omniglot-py``.

    Args:
        data_dir: The user's data folder (``paths.data_dir``).

    Returns:
        The folder that holds ``images_background(.zip)`` and ``images_evaluation(.zip)``.
    """
    return Path(data_dir).expanduser() / "omniglot" / "omniglot-py"


# --------------------------------------------------------------------------------------
# Locating and checking a copy
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """One collection as found on disk, already checked for completeness."""

    collection: str
    path: Path  # the zip file or the extracted collection folder
    is_zip: bool
    listing: _Listing
    fingerprint: tuple[Any, ...]


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(".png") and not name.startswith(".")


def _list_zip(path: Path, collection: str) -> _Listing:
    """List the images of a collection zip from its central directory (no decompression)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise DataError(
            f"{path} is not a valid zip file ({_one_line(err)}): the copy is incomplete or "
            f"corrupt; delete it and enable data.download=true, or replace it with the official "
            f"{collection}.zip"
        ) from err
    listing: _Listing = {}
    for name in names:
        parts = name.split("/")
        if len(parts) != 4 or parts[0] != collection or any(p.startswith(".") for p in parts):
            continue
        if _is_image_name(parts[3]):
            listing.setdefault((parts[1], parts[2]), []).append(name)
    return listing


def _list_folder(path: Path) -> tuple[_Listing, tuple[int, int, int]]:
    """List the images of an extracted collection folder with one ``os.scandir`` walk.

    Returns:
        The listing and ``(number of files, total bytes, max mtime_ns)`` for the fingerprint.
    """
    listing: _Listing = {}
    count = size = 0
    try:
        newest = path.stat().st_mtime_ns
        with os.scandir(path) as alphabets:
            alphabet_dirs = [e for e in alphabets if e.is_dir() and not e.name.startswith(".")]
        for alphabet in alphabet_dirs:
            newest = max(newest, alphabet.stat().st_mtime_ns)
            with os.scandir(alphabet.path) as characters:
                char_dirs = [e for e in characters if e.is_dir() and not e.name.startswith(".")]
            for character in char_dirs:
                newest = max(newest, character.stat().st_mtime_ns)
                images = []
                with os.scandir(character.path) as files:
                    for entry in files:
                        if entry.is_file() and _is_image_name(entry.name):
                            stat = entry.stat()
                            count += 1
                            size += stat.st_size
                            newest = max(newest, stat.st_mtime_ns)
                            images.append(entry.path)
                listing[(alphabet.name, character.name)] = images
    except OSError as err:
        raise DataError(
            f"cannot read the Omniglot folder {path}: {_one_line(err)}; check its permissions"
        ) from err
    return listing, (count, size, newest)


def _check_listing(
    listing: _Listing, collection: str, path: Path, is_zip: bool, expected: int
) -> None:
    """Raise DataError unless the listing has ``expected`` characters of 20 images each."""
    what = "zip" if is_zip else "folder"
    if len(listing) != expected:
        alphabets = len({alphabet for alphabet, _ in listing})
        raise DataError(
            f"the Omniglot {what} {path} holds {len(listing)} characters in {alphabets} "
            f"alphabets, expected {expected} ({collection}/<Alphabet>/<characterNN>/*.png): "
            f"the copy is incomplete or not Omniglot; delete it and enable data.download=true, "
            f"or replace it with the official {collection}.zip"
        )
    for (alphabet, character), images in listing.items():
        if len(images) != IMAGES_PER_CHARACTER:
            where = (
                f"{path}:{collection}/{alphabet}/{character}"
                if is_zip
                else str(path / alphabet / character)
            )
            raise DataError(
                f"the Omniglot character folder {where} holds {len(images)} PNG images, "
                f"expected {IMAGES_PER_CHARACTER}: the copy is incomplete; replace it with the "
                f"official {collection}.zip"
            )
        images.sort()  # one folder: the same order as by file name


def _scan_zip(path: Path, collection: str, expected: int) -> _Source:
    listing = _list_zip(path, collection)
    _check_listing(listing, collection, path, True, expected)
    stat = path.stat()
    fingerprint = ("zip", collection, str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    return _Source(collection, path, True, listing, fingerprint)


def _scan_folder(path: Path, collection: str, expected: int) -> _Source:
    listing, (count, size, newest) = _list_folder(path)
    _check_listing(listing, collection, path, False, expected)
    fingerprint = ("folder", collection, str(path.resolve()), count, size, newest)
    return _Source(collection, path, False, listing, fingerprint)


def _expected_count(collection: str, expected_characters: Mapping[str, int] | None) -> int:
    if expected_characters is not None and collection in expected_characters:
        return int(expected_characters[collection])
    return OMNIGLOT_CHARACTERS[collection]


# --------------------------------------------------------------------------------------
# Downloading
# --------------------------------------------------------------------------------------


def _download_zip(
    url: str,
    target: Path,
    collection: str,
    md5: str | None,
    expected: int,
    progress: bool,
) -> None:
    """Download ``url`` to ``target`` atomically, checking its md5 and its content.

    See :func:`metalearn.data.download.download_file`: ``target`` appears only once the
    whole file is there, its md5 matches (when given) and it is a complete collection zip.
    """
    download_file(
        url,
        target,
        what=f"Omniglot {collection}.zip",
        manual=(
            f"download {url} by hand and save it as {target}, or "
            f"set paths.data_dir / METALEARN_DATA_DIR to a folder holding omniglot/omniglot-py/"
        ),
        md5=md5,
        validate=lambda path: _scan_zip(path, collection, expected),
        progress=progress,
    )


# --------------------------------------------------------------------------------------
# prepare_omniglot
# --------------------------------------------------------------------------------------


def _scan(root: Path, collection: str, expected_characters: Mapping[str, int] | None) -> _Source:
    """Check the present copy of one collection; a zip wins over an extracted folder."""
    expected = _expected_count(collection, expected_characters)
    archive = root / f"{collection}.zip"
    # The zip is preferred because it cannot be half extracted.
    if archive.exists():
        return _scan_zip(archive, collection, expected)
    return _scan_folder(root / collection, collection, expected)


def _prepare(
    data_dir: str | Path,
    download: bool,
    urls: Mapping[str, str] | None,
    md5: Mapping[str, str | None] | None,
    progress: bool,
    expected_characters: Mapping[str, int] | None,
) -> list[_Source]:
    root = omniglot_root(data_dir)
    absent = [
        c
        for c in OMNIGLOT_COLLECTIONS
        if not (root / f"{c}.zip").exists() and not (root / c).exists()
    ]
    if absent and not download:
        if not root.is_dir():
            raise DataError(
                f"Omniglot not found at {root}: expected images_background(.zip) and "
                f"images_evaluation(.zip); {_HOW_TO_POINT}"
            )
        missing = " and ".join(f"{c}(.zip)" for c in absent)
        raise DataError(f"Omniglot at {root} lacks {missing}; {_HOW_TO_POINT}")
    # Check what is present first, so that a broken copy fails before a long download.
    sources = {
        c: _scan(root, c, expected_characters) for c in OMNIGLOT_COLLECTIONS if c not in absent
    }
    if absent:
        urls = OMNIGLOT_URLS if urls is None else urls
        md5 = OMNIGLOT_MD5 if md5 is None else md5
        for collection in absent:
            if collection not in urls:
                raise ConfigError(f"no download URL given for Omniglot {collection}")
        with download_folder(root, "Omniglot"):
            for collection in absent:
                log.info("Downloading Omniglot %s from %s", collection, urls[collection])
                _download_zip(
                    urls[collection],
                    root / f"{collection}.zip",
                    collection,
                    md5.get(collection),
                    _expected_count(collection, expected_characters),
                    progress,
                )
                sources[collection] = _scan(root, collection, expected_characters)
    return [sources[c] for c in OMNIGLOT_COLLECTIONS]


def prepare_omniglot(
    data_dir: str | Path,
    download: bool = True,
    urls: Mapping[str, str] | None = None,
    progress: bool = True,
    md5: Mapping[str, str | None] | None = None,
    expected_characters: Mapping[str, int] | None = None,
) -> Path:
    """Make sure a complete copy of Omniglot is under ``data_dir``, downloading what is absent.

    Each collection may be present as the zip ``<root>/<collection>.zip`` (official layout
    inside: ``<collection>/<Alphabet>/characterNN/IIII_DD.png``) or as the extracted folder
    ``<root>/<collection>/<Alphabet>/characterNN/*.png``; the zip wins when both are present.
    A present copy is accepted without a checksum match when it is complete: the right number
    of character folders, each with 20 PNGs (checked from the zip's central directory or one
    directory walk, without decoding). Absent collections are downloaded (only when
    ``download``), md5-checked, and written atomically.

    Args:
        data_dir: The data folder; Omniglot lives in ``omniglot_root(data_dir)``.
        download: Download absent collections; otherwise their absence is an error.
        urls: Collection name -> URL of its zip; default :data:`OMNIGLOT_URLS`.
        progress: Show a progress bar while downloading.
        md5: Collection name -> expected md5 of the download, ``None`` (or a missing key) to
            skip the check; default :data:`OMNIGLOT_MD5`.
        expected_characters: Collection name -> number of characters a complete copy holds;
            default :data:`OMNIGLOT_CHARACTERS` (small generated fixtures pass their own).

    Returns:
        ``omniglot_root(data_dir)``.

    Raises:
        DataError: Omniglot is absent and ``download`` is false, a download fails or has the
            wrong md5, or a present copy is corrupt or incomplete.
    """
    _prepare(data_dir, download, urls, md5, progress, expected_characters)
    return omniglot_root(data_dir)


# --------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------


def preprocess_omniglot(image: Image.Image, size: int = 28) -> np.ndarray:
    """Turn one Omniglot PNG into the training representation: bright ink on black, shrunk.

    Steps: convert to 8-bit grayscale, invert (so ink = 255 and background = 0; the official
    images are black ink on white), resize to ``size x size`` with PIL's box filter
    (``Image.Resampling.BOX``: each output pixel is the plain average of the source area it
    covers, i.e. its ink coverage; antialiased, with no ringing and no clipping, unlike
    Lanczos), rounded to uint8.

    Args:
        image: A decoded PIL image, any mode (the official ones are 105x105, mode ``"1"``).
        size: Side of the output in pixels.

    Returns:
        uint8 array of shape (size, size), 255 = full ink, 0 = background.
    """
    inverted = ImageOps.invert(image.convert("L"))
    if inverted.size != (size, size):
        inverted = inverted.resize((size, size), Image.Resampling.BOX)
    return np.array(inverted, dtype=np.uint8)


def load_omniglot_image(path: str | Path, image_size: int = 28) -> torch.Tensor:
    """Load one Omniglot PNG exactly as training sees it.

    Args:
        path: Path of the PNG file.
        image_size: Side of the output in pixels.

    Returns:
        float32 tensor of shape (1, image_size, image_size) in [0, 1], ink = 1.

    Raises:
        DataError: The file cannot be read or decoded.
    """
    try:
        with Image.open(path) as image:
            array = preprocess_omniglot(image, image_size)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot decode the Omniglot image {path}: {_one_line(err)}") from err
    return torch.from_numpy(array).to(torch.float32).div_(255.0)[None]


# --------------------------------------------------------------------------------------
# Decoding into the cache
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OmniglotCharacters:
    """All Omniglot characters, decoded.

    Attributes:
        images: uint8 tensor of shape (num_characters, 20, size, size), ink = 255.
        names: ``(collection, alphabet, character)`` of each row of ``images``, e.g.
            ``("images_background", "Alphabet_of_the_Magi", "character01")``; sorted by
            collection (background first), then alphabet, then character. The 20 images of
            a character are in file-name order.
    """

    images: torch.Tensor
    names: list[tuple[str, str, str]]

    def __len__(self) -> int:
        return len(self.names)


def _ordered_names(sources: Sequence[_Source]) -> list[tuple[str, str, str]]:
    return [(s.collection, a, c) for s in sources for (a, c) in sorted(s.listing)]


def _cache_key(sources: Sequence[_Source], image_size: int) -> dict[str, Any]:
    return {
        "sources": [list(s.fingerprint) for s in sources],
        "image_size": image_size,
        "preprocess_version": PREPROCESS_VERSION,
    }


_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, zipfile.BadZipFile, zlib.error)

# An image: (index of its source, zip member name or file path).
_Item = tuple[int, str]


@contextlib.contextmanager
def _decoder(
    sources: Sequence[_Source], image_size: int
) -> Iterator[Callable[[_Item], np.ndarray]]:
    """Open the zips (members are read in memory; nothing is extracted to disk) and yield
    item -> (1, size, size) uint8."""
    with contextlib.ExitStack() as stack:
        archives: dict[int, zipfile.ZipFile] = {}
        for i, source in enumerate(sources):
            if source.is_zip:
                try:
                    archives[i] = stack.enter_context(zipfile.ZipFile(source.path))
                except _DECODE_ERRORS as err:
                    raise DataError(
                        f"cannot open the Omniglot zip {source.path} ({_one_line(err)}); "
                        f"replace it with the official {source.collection}.zip"
                    ) from err

        def decode(item: _Item) -> np.ndarray:
            i, member = item
            archive = archives.get(i)
            try:
                handle = io.BytesIO(archive.read(member)) if archive is not None else member
                with Image.open(handle) as image:
                    return preprocess_omniglot(image, image_size)[None]
            except _DECODE_ERRORS as err:
                source = sources[i]
                where = f"{source.path}:{member}" if archive is not None else member
                raise DataError(
                    f"cannot decode the Omniglot image {where} ({_one_line(err)}): the copy "
                    f"is corrupt; replace it with the official {source.collection}.zip"
                ) from err

        yield decode


def load_omniglot(
    data_dir: str | Path,
    cache_dir: str | Path,
    image_size: int = 28,
    download: bool = True,
    progress: bool = True,
    expected_characters: Mapping[str, int] | None = None,
) -> OmniglotCharacters:
    """Load all Omniglot characters as one uint8 tensor, decoding the PNGs only once.

    Calls :func:`prepare_omniglot`, then reads the decoded images from the shared cache
    (:func:`metalearn.data.cache.cached_class_images`: ``<cache_dir>/omniglot_<hash>.npy``
    and ``.json``, memory-mapped) when present; otherwise decodes every PNG (straight from
    the zips, nothing extracted) with :func:`preprocess_omniglot` into it.
    ``<hash>`` covers the sources (zip: resolved path, size and mtime; folder: path, file
    count, total size and newest mtime), ``image_size`` and :data:`PREPROCESS_VERSION`, so
    a changed source gives a new cache. An unreadable cache is ignored and rebuilt.

    Args:
        data_dir: The data folder (see :func:`omniglot_root`).
        cache_dir: Folder for the decoded cache; created when missing.
        image_size: Side of the decoded images in pixels.
        download: Download absent collections (see :func:`prepare_omniglot`).
        progress: Show progress bars while downloading and decoding.
        expected_characters: Characters per collection of a complete copy; default the
            official counts (:data:`OMNIGLOT_CHARACTERS`).

    Returns:
        The characters; ``images`` has shape (num_characters, 20, image_size, image_size).

    Raises:
        DataError: Omniglot is missing, incomplete, corrupt or cannot be downloaded, or
            ``cache_dir`` is not writable.
        ConfigError: ``image_size`` is not positive.
    """
    if image_size < 1:
        raise ConfigError(f"Omniglot image_size must be a positive integer, got {image_size}")
    sources = _prepare(data_dir, download, None, None, progress, expected_characters)
    names = _ordered_names(sources)
    classes = [
        ("/".join(key), [(i, member) for member in source.listing[key[1:]]])
        for i, source in enumerate(sources)
        for key in ((source.collection, *k) for k in sorted(source.listing))
    ]
    stored = cached_class_images(
        cache_dir,
        "omniglot",
        _cache_key(sources, image_size),
        classes,
        (1, image_size, image_size),
        progress=progress,
        # One thread: a 105x105 1-bit PNG decodes in microseconds and threads only contend
        # for the GIL and the zip's lock (1623 characters: 9.6 s with 1, 14.0 s with 4).
        workers=1,
        decoder=functools.partial(_decoder, sources, image_size),
        what="Omniglot",
    )
    images = stored.images.view(len(names), IMAGES_PER_CHARACTER, image_size, image_size)
    return OmniglotCharacters(images=images, names=names)


# --------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def _paper_split(n: int, seed: int) -> dict[str, np.ndarray]:
    total = sum(_PAPER_SIZES)
    if n < 3:
        raise ConfigError(
            f"the paper Omniglot split needs at least 3 characters (one per split), got {n}"
        )
    n_val = max(1, _round_half_up(n * _PAPER_SIZES[1] / total))
    n_train = min(max(1, _round_half_up(n * _PAPER_SIZES[0] / total)), n - n_val - 1)
    order = np.random.RandomState(seed).permutation(n)
    return {
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }


def _vinyals_split(
    names: Sequence[tuple[str, str, str]], split_dir: str | Path | None
) -> dict[str, np.ndarray]:
    if split_dir is None:
        raise ConfigError(
            "the vinyals Omniglot split needs its split files: set data.split_dir to the folder "
            "holding train.json, val.json and test.json"
        )
    index = {tuple(name): i for i, name in enumerate(names)}
    out: dict[str, np.ndarray] = {}
    for part in ("train", "val", "test"):
        file = Path(split_dir).expanduser() / f"{part}.json"
        try:
            spec = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise DataError(
                f"Omniglot split file {file} not found: set data.split_dir to the folder "
                f"holding train.json, val.json and test.json"
            ) from err
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read Omniglot split file {file}: {_one_line(err)}") from err
        if not isinstance(spec, dict):
            raise DataError(f"Omniglot split file {file} is not a JSON object")
        indices = []
        for group, alphabets in spec.items():
            collection = _VINYALS_COLLECTIONS.get(group)
            if collection is None or not isinstance(alphabets, dict):
                raise DataError(
                    f"Omniglot split file {file} has an unexpected key {group!r}: expected "
                    f"{{'background'|'evaluation': {{alphabet: [characterNN, ...]}}}}"
                )
            for alphabet, characters in alphabets.items():
                for character in characters:
                    key = (collection, alphabet, character)
                    if key not in index:
                        raise DataError(
                            f"Omniglot split file {file} lists {collection}/{alphabet}/"
                            f"{character}, which is not in the loaded data set"
                        )
                    indices.append(index[key])
        out[part] = np.asarray(indices, dtype=np.int64)
    return out


def _lake_split(
    names: Sequence[tuple[str, str, str]], seed: int, val_alphabets: int
) -> dict[str, np.ndarray]:
    background, evaluation = OMNIGLOT_COLLECTIONS
    alphabets = sorted({a for c, a, _ in names if c == background})
    if not 0 <= val_alphabets < len(alphabets):
        raise ConfigError(
            f"lake_val_alphabets must be between 0 and {len(alphabets) - 1} (there are "
            f"{len(alphabets)} background alphabets), got {val_alphabets}"
        )
    order = np.random.RandomState(seed).permutation(len(alphabets))
    held_out = {alphabets[i] for i in order[:val_alphabets]}
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, (collection, alphabet, _) in enumerate(names):
        if collection == evaluation:
            parts["test"].append(i)
        elif collection == background:
            parts["val" if alphabet in held_out else "train"].append(i)
    return {k: np.asarray(v, dtype=np.int64) for k, v in parts.items()}


def split_characters(
    names: Sequence[tuple[str, str, str]],
    split: str,
    split_dir: str | Path | None = None,
    seed: int = 0,
    lake_val_alphabets: int = 5,
) -> dict[str, np.ndarray]:
    """Split Omniglot characters into meta-train, meta-validation and meta-test.

    Splits:
        - ``"paper"`` (Franceschi et al. 2018): ``np.random.RandomState(seed).permutation``
          of all characters; the first 1200 are train, the next 100 val, the last 323 test
          (for another number of characters, the same proportions, each part non-empty).
        - ``"vinyals"`` (Vinyals et al. 2016; 1028 / 172 / 423): read from
          ``<split_dir>/{train,val,test}.json``, each
          ``{"background"|"evaluation": {alphabet: [characterNN, ...]}}``.
        - ``"lake"`` (Lake et al. 2015): the background collection is train, except
          ``lake_val_alphabets`` of its alphabets (chosen by
          ``np.random.RandomState(seed).permutation`` of their sorted names) which are val;
          the evaluation collection is test.

    Args:
        names: ``(collection, alphabet, character)`` per character, as in
            :attr:`OmniglotCharacters.names`.
        split: One of ``"paper"``, ``"vinyals"``, ``"lake"``.
        split_dir: Folder of the vinyals split files (``data.split_dir``).
        seed: Seed of the paper and lake splits.
        lake_val_alphabets: Background alphabets held out for validation by the lake split.

    Returns:
        ``{"train": idx, "val": idx, "test": idx}``: disjoint int64 arrays of indices into
        ``names``, each sorted ascending.

    Raises:
        ConfigError: Unknown split name, vinyals without ``split_dir``, or impossible sizes.
        DataError: A vinyals split file is missing, malformed or names an absent character.
    """
    if split == "paper":
        parts = _paper_split(len(names), seed)
    elif split == "vinyals":
        parts = _vinyals_split(names, split_dir)
    elif split == "lake":
        parts = _lake_split(names, seed, lake_val_alphabets)
    else:
        raise ConfigError(
            f"unknown Omniglot split {split!r}: choose one of {', '.join(OMNIGLOT_SPLITS)}"
        )
    out = {k: np.sort(np.asarray(v, dtype=np.int64)) for k, v in parts.items()}
    joined = np.concatenate([out["train"], out["val"], out["test"]])
    if np.unique(joined).size != joined.size:
        raise DataError(f"the {split} Omniglot split puts a character in two parts (or twice)")
    return out
