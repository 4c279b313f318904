"""Your own data set: a folder of images with one folder (or CSV label) per class.

Three layouts, chosen by the settings given:

* ``split_file``: a JSON file ``{"train": [class, ...], "val": [...], "test": [...]}``
  naming folders of ``root`` (one folder of images per class);
* ``csv_dir``: ``train.csv``, ``val.csv``, ``test.csv`` with rows ``filename,label``
  (Ravi & Larochelle's miniImageNet CSVs, LibFewShot), the files in ``root``;
* neither: ``root/train/``, ``root/val/``, ``root/test/``, each with one folder per class.

Any format Pillow reads; images are converted to ``channels`` (1: grayscale, 3: RGB),
inverted if asked, and resized to ``image_size`` x ``image_size``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from metalearn.data.download import one_line
from metalearn.data.storage import SPLIT_NAMES as SPLITS
from metalearn.errors import ConfigError, DataError

__all__ = [
    "IMAGE_SUFFIXES",
    "RESAMPLE",
    "Resample",
    "SPLITS",
    "class_folders",
    "find_classes",
    "decode_image",
]


#: File name endings of the formats Pillow opens.
IMAGE_SUFFIXES = frozenset(suffix.lower() for suffix in Image.registered_extensions())

Classes = list[tuple[str, list[Path]]]


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def class_folders(root: Path, names: Sequence[str], where: str) -> Classes:
    """(name, sorted image files) of each class folder ``root/<name>``; ``where`` names the
    list of classes in errors (a missing folder, a folder without images)."""
    classes: Classes = []
    for name in names:
        folder = root / name
        if not folder.is_dir():
            raise DataError(f"{where} names the class {name!r}, but {folder} is not a folder")
        images = _images_in(folder)
        if not images:
            raise DataError(f"the class folder {folder} holds no images Pillow can read")
        classes.append((name, images))
    return classes


def _from_split_file(root: Path, split_file: Path) -> dict[str, Classes]:
    try:
        spec = json.loads(split_file.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise DataError(f"data.split_file={split_file} not found") from err
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read data.split_file={split_file}: {one_line(err)}") from err
    if not isinstance(spec, dict) or set(spec) != set(SPLITS):
        raise DataError(
            f"data.split_file={split_file} must be a JSON object with the keys train, val "
            f"and test, each a list of class folder names"
        )
    return {split: class_folders(root, list(spec[split]), str(split_file)) for split in SPLITS}


def _from_csv(root: Path, csv_dir: Path) -> dict[str, Classes]:
    out: dict[str, Classes] = {}
    for split in SPLITS:
        file = csv_dir / f"{split}.csv"
        try:
            with open(file, newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
        except FileNotFoundError as err:
            raise DataError(f"{file} not found (data.csv_dir holds train/val/test.csv)") from err
        if rows and not {"filename", "label"} <= set(rows[0]):
            raise DataError(f"{file} needs the columns filename,label")
        by_label: dict[str, list[Path]] = {}
        for row in rows:
            path = root / row["filename"]
            if not path.is_file():
                raise DataError(f"{file} lists {row['filename']}, which is not in {root}")
            by_label.setdefault(row["label"], []).append(path)
        out[split] = [(label, sorted(paths)) for label, paths in sorted(by_label.items())]
    return out


def find_classes(
    root: str | Path, split_file: str | Path | None = None, csv_dir: str | Path | None = None
) -> dict[str, Classes]:
    """``{"train", "val", "test"}`` -> [(class name, image files)], classes sorted by name
    in the subfolder and CSV layouts, in the split file's order otherwise.

    Raises:
        DataError: a missing folder or file, an empty class folder, a class in two splits.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root={root} is not a folder")
    if split_file is not None:
        splits = _from_split_file(root, Path(split_file).expanduser())
    elif csv_dir is not None:
        splits = _from_csv(root, Path(csv_dir).expanduser())
    else:
        missing = [s for s in SPLITS if not (root / s).is_dir()]
        if missing:
            raise ConfigError(
                f"data.root={root} has no {'/, '.join(missing)}/ folders: give the split as "
                f"data.split_file (JSON) or data.csv_dir (train/val/test.csv), or make one "
                f"folder per split"
            )
        splits = {
            split: class_folders(
                root / split,
                sorted(p.name for p in (root / split).iterdir() if p.is_dir()),
                f"{root / split}",
            )
            for split in SPLITS
        }
    seen: dict[str, str] = {}
    for split in SPLITS:
        if not splits[split]:
            raise DataError(f"the {split} split of data.root={root} has no classes")
        for name, _ in splits[split]:
            if name in seen:
                raise DataError(
                    f"the class {name!r} is in both the {seen[name]} and the {split} split"
                )
            seen[name] = split
    return splits


#: Resampling filters of ``data.resample`` (PIL's).
RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}

Resample = Literal["bilinear", "box", "bicubic", "lanczos", "nearest"]


def decode_image(
    path: Path, image_size: int, channels: int, invert: bool = False, resample: str = "bilinear"
) -> np.ndarray:
    """One image as a (channels, image_size, image_size) uint8 array: converted to
    grayscale or RGB, inverted when ``invert`` (dark ink on white becomes bright ink, as
    Omniglot is read), resized with the ``resample`` filter.

    Raises:
        DataError: the file cannot be read as an image (naming it).
    """
    try:
        with Image.open(path) as image:
            converted = image.convert("L" if channels == 1 else "RGB")
            if invert:
                converted = ImageOps.invert(converted)
            if converted.size != (image_size, image_size):
                converted = converted.resize((image_size, image_size), RESAMPLE[resample])
            array = np.array(converted, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise DataError(f"cannot read the image {path}: {one_line(err)}") from err
    return array[None] if channels == 1 else array.transpose(2, 0, 1)
