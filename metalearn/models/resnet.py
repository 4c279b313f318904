"""Residual representation networks for miniImageNet (SNAIL's and ResNet-12), episodic BatchNorm."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.models.conv import (
    EpisodeBatchNorm2d,
    NormMode,
    from_example_major,
    to_example_major,
)

__all__ = ["ResidualBlock", "ResNet12", "ResidualBackbone", "SnailResNet"]

#: ``"snail"``: 1x1 conv to ``head_channels``, ReLU, global average pool, 1x1 conv to
#: ``out_features`` (Mishra et al. 2018). ``"avgpool"``: global average pool of the last
#: block (ResNet-12); the features are the last block's channels.
Head = Literal["snail", "avgpool"]

_MIN_SIDE = 16  # four 2x2 max-pools leave at least one pixel


class ResidualBlock(nn.Module):
    """3 x [3x3 conv, BatchNorm, leaky ReLU] with a 1x1 conv + BatchNorm shortcut, 2x2 max-pool.

    ``y = maxpool(lrelu(bn3(conv3(h2)) + bn_s(conv_s(x))))`` with
    ``h1 = lrelu(bn1(conv1(x)))`` and ``h2 = lrelu(bn2(conv2(h1)))``: the third activation
    comes after the addition, as in ResNet-12 (Oreshkin et al. 2018; Lee et al. 2019).
    Convolutions have no bias (BatchNorm's shift replaces it). Every BatchNorm takes
    per-group statistics like :class:`~metalearn.models.ConvBackbone`'s.

    Args:
        cin: input channels.
        cout: output channels.
        norm: BatchNorm mode, see :data:`~metalearn.models.NormMode`.
        bn_scale: learn a BatchNorm scale γ as well as the shift β.
        negative_slope: slope of the leaky ReLU for negative inputs.
    """

    def __init__(
        self, cin: int, cout: int, norm: NormMode, bn_scale: bool, negative_slope: float
    ) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(c, cout, 3, padding=1, bias=False) for c in (cin, cout, cout)
        )
        self.norms = nn.ModuleList(
            EpisodeBatchNorm2d(cout, scale=bn_scale, mode=norm) for _ in range(3)
        )
        self.shortcut = nn.Conv2d(cin, cout, 1, bias=False)
        self.shortcut_norm = EpisodeBatchNorm2d(cout, scale=bn_scale, mode=norm)
        self.negative_slope = negative_slope

    def forward(self, x: Tensor, groups: int = 1, support_size: int | None = None) -> Tensor:
        """(M * G, cin, H, W) in example-major order -> (M * G, cout, H // 2, W // 2)."""
        h = x
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            h = norm(conv(h), groups, support_size)
            if i < 2:
                h = F.leaky_relu(h, self.negative_slope, inplace=True)
        h = h + self.shortcut_norm(self.shortcut(x), groups, support_size)
        return F.max_pool2d(F.leaky_relu(h, self.negative_slope, inplace=True), 2)


class ResidualBackbone(nn.Module):
    """Residual blocks (see :class:`ResidualBlock`) followed by a pooling head.

    Each block halves the side: 84 -> 42 -> 21 -> 10 -> 5 for four blocks. The head pools
    globally, so the feature size does not depend on the image size.

    Inputs and BatchNorm are as for :class:`~metalearn.models.ConvBackbone`:

    * (N, C, H, W): one batch of images, statistics over the whole batch; output (N, d).
    * (G, M, C, H, W): G episodes of M images; with ``norm="batch"`` each episode is
      normalized with its own statistics (per-episode BatchNorm, at no copy: the rows are
      put in example-major order, see :class:`~metalearn.models.EpisodeBatchNorm2d`).
      Output (G, M, d).

    Args:
        in_channels: image channels.
        channels: output channels of each residual block.
        image_size: expected input height = width (checked); ``None`` accepts any side of
            at least 2 ** len(channels).
        head: ``"snail"`` or ``"avgpool"``, see :data:`Head`.
        head_channels: channels of the first 1x1 conv of the ``"snail"`` head.
        out_features: output size of the ``"snail"`` head.
        norm: BatchNorm mode, ``"batch"`` (statistics of the current batch or episode, also
            in evaluation; the paper's choice) or ``"running"`` (conventional).
        bn_scale: learn a BatchNorm scale γ as well as the shift β.
        negative_slope: slope of the leaky ReLUs of the blocks.
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: Sequence[int] = (64, 160, 320, 640),
        image_size: int | None = 84,
        head: Head = "avgpool",
        head_channels: int = 2048,
        out_features: int = 512,
        norm: NormMode = "batch",
        bn_scale: bool = True,
        negative_slope: float = 0.1,
    ) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if not channels or min(channels) < 1:
            raise ValueError(f"channels must be a non-empty list of positive sizes, got {channels}")
        if head not in ("snail", "avgpool"):
            raise ValueError(f"unknown head {head!r}: choose 'snail' or 'avgpool'")
        min_side = 2 ** len(channels)
        if image_size is not None and image_size < min_side:
            raise ValueError(
                f"image_size {image_size} is too small for {len(channels)} residual blocks "
                f"(at least {min_side})"
            )
        self.in_channels, self.image_size, self.min_side = in_channels, image_size, min_side
        widths = [in_channels, *channels]
        self.blocks = nn.ModuleList(
            ResidualBlock(cin, cout, norm, bn_scale, negative_slope)
            for cin, cout in zip(widths[:-1], widths[1:], strict=True)
        )
        self.head = head
        if head == "snail":
            self.expand: nn.Conv2d | None = nn.Conv2d(channels[-1], head_channels, 1)
            self.project: nn.Conv2d | None = nn.Conv2d(head_channels, out_features, 1)
            self.feature_dim = out_features
        else:
            self.expand = self.project = None
            self.feature_dim = channels[-1]

    def _check(self, shape: tuple[int, ...]) -> None:
        channels, height, width = shape
        if self.image_size is not None:
            expected = (self.in_channels, self.image_size, self.image_size)
            if shape != expected:
                raise ValueError(
                    f"expected images of {self.in_channels} x {self.image_size} x "
                    f"{self.image_size}, got {shape}"
                )
        elif channels != self.in_channels or min(height, width) < self.min_side:
            raise ValueError(
                f"expected images of {self.in_channels} channels and sides of at least "
                f"{self.min_side}, got {shape}"
            )

    def forward(self, images: Tensor, support_size: int | None = None) -> Tensor:
        """Map (N, C, H, W) to (N, d), or (G, M, C, H, W) to (G, M, d) (per-episode BN).

        ``support_size``: BatchNorm statistics from the first ``support_size`` images (of
        each episode) only, see :class:`~metalearn.models.EpisodeBatchNorm2d`.
        """
        x, groups = to_example_major(images)
        self._check(tuple(x.shape[1:]))
        for block in self.blocks:
            x = block(x, groups, support_size)
        if self.expand is not None and self.project is not None:
            x = F.relu(self.expand(x), inplace=True)
            x = self.project(F.adaptive_avg_pool2d(x, 1))
        else:
            x = F.adaptive_avg_pool2d(x, 1)
        return from_example_major(x.flatten(1), groups, images.dim() == 5)


class SnailResNet(ResidualBackbone):
    """The residual network of the paper's miniImageNet rows (SNAIL, Mishra et al. 2018).

    Four residual blocks of 64, 96, 128 and 256 filters (84 -> 5 pixels per side), then a
    1x1 conv to 2048 channels, ReLU, global average pooling and a 1x1 conv to 512: a 512-d
    representation. Franceschi et al. (2018, Sec. 4.2) use it as h_λ for miniImageNet.

    Args:
        in_channels: image channels (3).
        channels: filters of the four blocks.
        image_size: input side (84), checked; ``None`` accepts any side >= 16.
        head_channels: channels of the 1x1 expansion (2048).
        out_features: feature size d (512).
        norm: BatchNorm mode (``"batch"``: the paper's, statistics per episode).
        bn_scale: learn a BatchNorm scale γ as well as the shift β.
        negative_slope: leaky ReLU slope (0.1).
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: Sequence[int] = (64, 96, 128, 256),
        image_size: int | None = 84,
        head_channels: int = 2048,
        out_features: int = 512,
        norm: NormMode = "batch",
        bn_scale: bool = True,
        negative_slope: float = 0.1,
    ) -> None:
        super().__init__(
            in_channels,
            channels,
            image_size,
            "snail",
            head_channels,
            out_features,
            norm,
            bn_scale,
            negative_slope,
        )


class ResNet12(ResidualBackbone):
    """ResNet-12: four residual blocks of 64, 160, 320 and 640 filters, global average pool.

    The standard modern few-shot backbone (Oreshkin et al. 2018, Lee et al. 2019; without
    DropBlock): 640-d features on 84x84 images.

    Args:
        in_channels: image channels (3).
        channels: filters of the four blocks.
        image_size: input side (84), checked; ``None`` accepts any side >= 16.
        norm: BatchNorm mode (``"batch"``: statistics per episode).
        bn_scale: learn a BatchNorm scale γ as well as the shift β.
        negative_slope: leaky ReLU slope (0.1).
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: Sequence[int] = (64, 160, 320, 640),
        image_size: int | None = 84,
        norm: NormMode = "batch",
        bn_scale: bool = True,
        negative_slope: float = 0.1,
    ) -> None:
        super().__init__(
            in_channels,
            channels,
            image_size,
            "avgpool",
            norm=norm,
            bn_scale=bn_scale,
            negative_slope=negative_slope,
        )
