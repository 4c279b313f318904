"""Test helpers for miniImageNet: tiny generated copies in both on-disk formats.

Image j of class c is :func:`fixture_image` (c, j): a class-specific colour with a
class-specific gradient and a bright square whose place varies per image, so a few steps of
training can tell the classes apart. The same images go into both formats (PNG is lossless),
so the pickle and the folder copy decode to identical arrays.
"""

from __future__ import annotations

import csv
import io
import pickle
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from metalearn.data.sets.miniimagenet import MINIIMAGENET_SPLITS, miniimagenet_root

__all__ = [
    "FIXTURE_CLASSES",
    "FIXTURE_IMAGES",
    "expected_split",
    "fixture_class_ids",
    "fixture_image",
    "make_folder_fixture",
    "make_pickle_fixture",
    "pickle_bytes",
]

FIXTURE_CLASSES: dict[str, int] = {"train": 5, "val": 3, "test": 3}
FIXTURE_IMAGES = 20

_SPLIT_OFFSET = {"train": 0, "val": 100, "test": 200}


def fixture_class_ids(split: str, classes: int) -> list[str]:
    """WordNet-like ids of a split's classes, sorted (the loader's order)."""
    return [f"n{_SPLIT_OFFSET[split] + c + 1:08d}" for c in range(classes)]


def fixture_image(split: str, c: int, j: int, size: tuple[int, int] = (84, 84)) -> np.ndarray:
    """Image ``j`` of class ``c`` of ``split``: uint8 (height, width, 3)."""
    width, height = size
    code = _SPLIT_OFFSET[split] + c
    colour = np.random.default_rng([code]).integers(30, 200, size=3)
    ramp = np.linspace(0.0, 1.0, width)[None, :, None] * (np.array([40, -30, 20]) * (c % 3 - 1))
    image = np.clip(colour + ramp + np.zeros((height, 1, 1)), 0, 255)
    rng = np.random.default_rng([code, j])
    side = max(4, min(height, width) // 4)
    top, left = rng.integers(0, height - side), rng.integers(0, width - side)
    image[top : top + side, left : left + side] = 255 - colour
    return image.astype(np.uint8)


def expected_split(
    split: str, classes: int | None = None, per_class: int = FIXTURE_IMAGES
) -> np.ndarray:
    """What the loader must return for a split of an 84x84 fixture: (classes, per_class, 3, 84, 84)."""
    classes = FIXTURE_CLASSES[split] if classes is None else classes
    return np.stack(
        [
            np.stack([fixture_image(split, c, j).transpose(2, 0, 1) for j in range(per_class)])
            for c in range(classes)
        ]
    )


def pickle_bytes(
    split: str,
    classes: int | None = None,
    per_class: int = FIXTURE_IMAGES,
    size: int = 84,
    protocol: int = 4,
) -> bytes:
    """A ``mini-imagenet-cache-<split>.pkl`` payload: rows shuffled, class_dict unsorted."""
    classes = FIXTURE_CLASSES[split] if classes is None else classes
    ids = fixture_class_ids(split, classes)
    total = classes * per_class
    order = np.random.default_rng([7, _SPLIT_OFFSET[split]]).permutation(total)
    image_data = np.empty((total, size, size, 3), np.uint8)
    class_dict: dict[str, list[int]] = {}
    for c in reversed(range(classes)):  # insertion order differs from sorted order
        rows = [int(order[c * per_class + j]) for j in range(per_class)]
        class_dict[ids[c]] = rows
        for j, row in enumerate(rows):
            image_data[row] = fixture_image(split, c, j, (size, size))
    return pickle.dumps({"image_data": image_data, "class_dict": class_dict}, protocol=protocol)


def make_pickle_fixture(
    data_dir: Path,
    classes: Mapping[str, int] = FIXTURE_CLASSES,
    per_class: int = FIXTURE_IMAGES,
    val_name: str = "val",
    splits: tuple[str, ...] = MINIIMAGENET_SPLITS,
) -> Path:
    """Write ``mini-imagenet-cache-<split>.pkl`` files under ``data_dir/miniimagenet``.

    Args:
        data_dir: The data folder to create the copy in.
        classes: Classes per split.
        per_class: Images per class.
        val_name: File name part of the val split (``val`` or ``validation``).
        splits: Which splits to write.

    Returns:
        ``data_dir``.
    """
    root = miniimagenet_root(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    for split in splits:
        name = val_name if split == "val" else split
        payload = pickle_bytes(split, classes[split], per_class)
        (root / f"mini-imagenet-cache-{name}.pkl").write_bytes(payload)
    return data_dir


def make_folder_fixture(
    data_dir: Path,
    classes: Mapping[str, int] = FIXTURE_CLASSES,
    per_class: int = FIXTURE_IMAGES,
    size: tuple[int, int] = (84, 84),
    splits: tuple[str, ...] = MINIIMAGENET_SPLITS,
) -> Path:
    """Write ``images/*.png`` and the Ravi-style ``<split>.csv`` files under ``data_dir/miniimagenet``.

    File names follow Ravi & Larochelle (``<wnid><8-digit index>``); CSV rows interleave the
    classes (image 0 of every class, then image 1, ...), so the loader has to group them.

    Returns:
        ``data_dir``.
    """
    root = miniimagenet_root(data_dir)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for split in splits:
        ids = fixture_class_ids(split, classes[split])
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["filename", "label"])
        for j in range(per_class):
            for c, wnid in enumerate(ids):
                name = f"{wnid}{j + 1:08d}.png"
                Image.fromarray(fixture_image(split, c, j, size)).save(images / name)
                writer.writerow([name, wnid])
        (root / f"{split}.csv").write_text(buffer.getvalue())
    return data_dir
