"""How a split's images are held: one uint8 array of all images, grouped by class."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["ClassImages", "SPLIT_NAMES"]

#: The three splits of every episodic data set.
SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class ClassImages:
    """The images of one split, class after class, in one (N, C, H, W) uint8 tensor.

    Class c holds the images ``offsets[c]:offsets[c + 1]``; classes may hold different
    numbers of images. The tensor may be memory-mapped from a cache file (then a split
    need not fit in RAM: sampling reads only the images an episode uses).

    Attributes:
        images: (N, C, H, W) uint8.
        offsets: (num_classes + 1,) int64, increasing, ``offsets[0] == 0``,
            ``offsets[-1] == N``.
        names: one name per class (for messages), or None.
    """

    images: Tensor
    offsets: np.ndarray
    names: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.dtype != torch.uint8:
            raise ValueError(
                f"images must be a uint8 tensor (N, C, H, W), got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        offsets = self.offsets
        if offsets.ndim != 1 or len(offsets) < 2 or offsets[0] != 0:
            raise ValueError("offsets must start at 0 and delimit at least one class")
        if offsets[-1] != len(self.images) or np.any(np.diff(offsets) < 0):
            raise ValueError("offsets must increase up to the number of images")
        if self.names is not None and len(self.names) != len(offsets) - 1:
            raise ValueError("one name per class")

    @classmethod
    def from_tensor(cls, images: Tensor, names: Sequence[str] | None = None) -> ClassImages:
        """From a (classes, per_class, C, H, W) tensor (a view, no copy)."""
        classes, per_class = images.shape[:2]
        offsets = np.arange(classes + 1, dtype=np.int64) * per_class
        return cls(images.reshape(classes * per_class, *images.shape[2:]), offsets, names)

    @property
    def num_classes(self) -> int:
        return len(self.offsets) - 1

    @property
    def counts(self) -> np.ndarray:
        """Images per class, (num_classes,) int64."""
        return np.diff(self.offsets)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def name(self, c: int) -> str:
        return str(self.names[c]) if self.names is not None else f"#{c}"

    def to(self, device: torch.device | str) -> ClassImages:
        """The same classes with the images on ``device``."""
        return ClassImages(self.images.to(device), self.offsets, self.names)
