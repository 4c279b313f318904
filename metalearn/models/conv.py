"""Convolutional representation networks h_λ (the outer variables) with episodic BatchNorm."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "EpisodeBatchNorm2d",
    "ConvBackbone",
    "NormMode",
    "to_example_major",
    "from_example_major",
]

#: ``"batch"``: always normalize with the statistics of the current batch (train and eval),
#: per episode when the input has an episode dimension (see :class:`ConvBackbone`), or of
#: its first ``support_size`` images only. This is the paper's choice (its code keeps no
#: running statistics). ``"running"``: conventional BatchNorm, batch statistics in training
#: and running averages in ``eval()`` mode, so an image's features do not depend on the
#: other images of the batch. Learners set it from ``model.batch_stats``
#: (:data:`metalearn.models.BatchStats`), the one user-facing setting.
NormMode = Literal["batch", "running"]


def to_example_major(images: Tensor, channels_last: bool = False) -> tuple[Tensor, int]:
    """Flatten an episode batch for the convolutions, in the order EpisodeBatchNorm2d needs.

    (N, C, H, W) is returned as it is, one group. (G, M, C, H, W) becomes (G * M, C, H, W):
    in example-major order (row m * G + g), which makes per-episode BatchNorm a free view
    of a contiguous tensor; or, with ``channels_last``, in group-major order (row g * M + m,
    a free reshape) in the channels-last memory format, where each group is one contiguous
    block of rows.

    Returns:
        ``(images, groups)``.
    """
    if images.dim() == 4:
        rows, groups = images, 1
    elif images.dim() == 5:
        groups, per_group = images.shape[:2]
        rows = images.flatten(0, 1) if channels_last else images.transpose(0, 1).flatten(0, 1)
    else:
        raise ValueError(
            f"expected images of shape (N, C, H, W) or (G, M, C, H, W), got {tuple(images.shape)}"
        )
    if _batched(rows):  # under torch.func.vmap (MAML) there is no memory format to choose
        return rows, groups
    if channels_last:
        return rows.contiguous(memory_format=torch.channels_last), groups
    return rows.contiguous(), groups


def _batched(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a functorch batched tensor (inside ``torch.func.vmap``)."""
    return bool(torch._C._functorch.is_batchedtensor(tensor))


def from_example_major(
    features: Tensor, groups: int, episodic: bool, channels_last: bool = False
) -> Tensor:
    """Undo :func:`to_example_major` on (rows, d) features: (G, M, d) when ``episodic``."""
    if not episodic:
        return features
    if channels_last:
        return features.view(groups, -1, features.shape[-1])
    return features.view(-1, groups, features.shape[-1]).transpose(0, 1)


class EpisodeBatchNorm2d(nn.Module):
    """BatchNorm over channels whose statistics can be taken per group of the batch.

    The input is (M * G, C, H, W) in *example-major* order: row ``m * G + g`` is example m of
    group g. Seen as (M, G * C, H, W), that tensor is a free view on which one fused
    ``F.batch_norm`` call computes one mean and variance per (group, channel) pair, so
    per-episode statistics cost no copy. With ``group_major`` the input is in group-major
    order instead (row ``g * M + m``; the order of channels-last backbones, whose memory
    format admits no such view) and each group's block of rows is normalized by its own
    ``F.batch_norm`` call.

    Args:
        channels: number of channels C.
        scale: learn a per-channel scale γ (the paper's code learns only the shift β).
        mode: see :data:`NormMode`.
        eps: added to the variance.
        momentum: running-average momentum (``mode="running"`` only).
        group_major: the rows are in group-major order (see above).
    """

    unit_scale: Tensor

    def __init__(
        self,
        channels: int,
        scale: bool = False,
        mode: NormMode = "batch",
        eps: float = 1e-5,
        momentum: float = 0.1,
        group_major: bool = False,
    ) -> None:
        super().__init__()
        self.group_major = group_major
        if mode not in ("batch", "running"):
            raise ValueError(f"unknown BatchNorm mode {mode!r}: choose 'batch' or 'running'")
        self.channels, self.mode, self.eps, self.momentum = channels, mode, eps, momentum
        self.weight = nn.Parameter(torch.ones(channels)) if scale else None
        self.bias = nn.Parameter(torch.zeros(channels))
        # Without a learned scale, a constant one is passed: some CUDA builds of
        # batch_norm's backward fail on an undefined weight ("tensor does not have a device").
        self.register_buffer("unit_scale", torch.ones(channels), persistent=False)
        if mode == "running":
            self.register_buffer("running_mean", torch.zeros(channels))
            self.register_buffer("running_var", torch.ones(channels))
        else:
            self.running_mean: Tensor | None = None
            self.running_var: Tensor | None = None

    def forward(self, x: Tensor, groups: int = 1, support_size: int | None = None) -> Tensor:
        """Normalize (M * G, C, H, W); with ``mode="batch"`` statistics are per group.

        ``support_size`` (``mode="batch"`` only; ignored with running statistics): the
        statistics of each group are taken from its first ``support_size`` examples (rows
        ``m * G + g`` with m < support_size: the support set) and applied to all M, so an
        example after them does not influence any other example's output.
        """
        scale: Tensor = self.weight if self.weight is not None else self.unit_scale
        if support_size is not None and self.mode == "batch":
            return self._support_normalize(x, groups, support_size, scale)
        if self.mode == "running" or groups == 1:
            return F.batch_norm(
                x,
                self.running_mean,
                self.running_var,
                scale,
                self.bias,
                training=self.training or self.mode == "batch",
                momentum=self.momentum,
                eps=self.eps,
            )
        if self.group_major:
            return torch.cat(
                [
                    F.batch_norm(part, None, None, scale, self.bias, training=True, eps=self.eps)
                    for part in x.chunk(groups)
                ]
            )
        rows, channels, height, width = x.shape
        out = F.batch_norm(
            x.view(rows // groups, groups * channels, height, width),
            None,
            None,
            scale.repeat(groups),
            self.bias.repeat(groups),
            training=True,
            eps=self.eps,
        )
        return out.view(rows, channels, height, width)

    def _support_normalize(
        self, x: Tensor, groups: int, support_size: int, scale: Tensor
    ) -> Tensor:
        rows, channels, height, width = x.shape
        per_group = rows // groups
        if not 1 <= support_size <= per_group:
            raise ValueError(
                f"support_size must be in [1, {per_group}] (examples per group), got {support_size}"
            )
        if self.group_major:
            view = x.view(groups, per_group, channels, height, width)
            var, mean = torch.var_mean(view[:, :support_size], dim=(1, 3, 4), correction=0)
            factor = torch.rsqrt(var + self.eps) * scale
            shift = self.bias - mean * factor
            out = view * factor[:, None, :, None, None] + shift[:, None, :, None, None]
            return out.view(rows, channels, height, width)
        view = x.view(per_group, groups * channels, height, width)
        var, mean = torch.var_mean(view[:support_size], dim=(0, 2, 3), correction=0)
        factor = torch.rsqrt(var + self.eps) * scale.repeat(groups)
        shift = self.bias.repeat(groups) - mean * factor
        out = view * factor[:, None, None] + shift[:, None, None]
        return out.view(rows, channels, height, width)

    def extra_repr(self) -> str:
        order = ", group_major=True" if self.group_major else ""
        return f"{self.channels}, scale={self.weight is not None}, mode={self.mode}{order}"


class ConvBlock(nn.Module):
    """3x3 conv (no bias: BatchNorm's shift replaces it), BatchNorm, ReLU, optional max-pool."""

    def __init__(
        self,
        cin: int,
        cout: int,
        stride: int,
        pool: bool,
        norm: NormMode,
        bn_scale: bool,
        group_major: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm = EpisodeBatchNorm2d(cout, scale=bn_scale, mode=norm, group_major=group_major)
        self.pool = pool

    def forward(self, x: Tensor, groups: int = 1, support_size: int | None = None) -> Tensor:
        x = F.relu(self.norm(self.conv(x), groups, support_size))
        return F.max_pool2d(x, 2) if self.pool else x


class ConvBackbone(nn.Module):
    """The paper's conv representations: ``depth`` x [3x3 conv, BatchNorm, ReLU (, max-pool)].

    * Omniglot (the default): 4 x [64 filters, stride 2, no pooling] on 1 x 28 x 28 images,
      28 -> 14 -> 7 -> 4 -> 2, flattened to 64 * 2 * 2 = 256 features.
    * miniImageNet conv4: ``in_channels=3, channels=32, stride=1, pool=True,
      image_size=84``: 84 -> 42 -> 21 -> 10 -> 5, flattened to 32 * 5 * 5 = 800 features.

    Inputs:
        * (N, C, H, W): one batch of images; BatchNorm statistics over the whole batch.
        * (G, M, C, H, W): G episodes (or support / query sets) of M images each; with
          ``norm="batch"`` each episode is normalized with its own statistics, so an
          episode's features never depend on the other episodes of the meta-batch.
          Output (G, M, d).

    BatchNorm mode (``norm``): ``"batch"`` always uses the statistics of the current batch
    or episode, in training and evaluation alike, like the paper's code (which keeps only a
    learned shift, ``bn_scale=False``); evaluation is then transductive within an episode.
    ``"running"`` is conventional BatchNorm with running averages in ``eval()`` mode.

    Args:
        in_channels: image channels (1 for Omniglot, 3 for miniImageNet).
        channels: filters per conv layer.
        depth: number of conv blocks.
        stride: stride of every conv.
        pool: 2x2 max-pool after every block.
        image_size: input height = width, used to compute :attr:`feature_dim`.
        norm: BatchNorm mode, see above.
        bn_scale: learn a BatchNorm scale γ as well as the shift β.
        channels_last: run the convolutions in the channels-last memory format (weights
            and activations); the features are the same, in the same order. On the CPU
            (oneDNN) it makes a training step of the Omniglot network faster
            (``bench/step_speed.py``, docs/benchmarks.md), at a cost in float32 accuracy:
            PyTorch's channels-last CPU BatchNorm accumulates its statistics with about
            100 times the rounding error of the contiguous kernel (1e-4 against 1e-6 of a
            unit output on Omniglot-like activations), enough to flip ReLU kinks that a
            float64 run does not, so the default stays contiguous.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: int = 64,
        depth: int = 4,
        stride: int = 2,
        pool: bool = False,
        image_size: int = 28,
        norm: NormMode = "batch",
        bn_scale: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels, self.image_size = in_channels, image_size
        self.channels_last = channels_last
        widths = [in_channels] + [channels] * depth
        self.blocks = nn.ModuleList(
            ConvBlock(cin, cout, stride, pool, norm, bn_scale, channels_last)
            for cin, cout in zip(widths[:-1], widths[1:], strict=True)
        )
        if channels_last:
            self.to(memory_format=torch.channels_last)
        side = image_size
        for _ in range(depth):
            side = (side - 1) // stride + 1  # 3x3 conv, padding 1
            side = side // 2 if pool else side
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for {depth} blocks")
        self.feature_dim = channels * side * side

    def forward(self, images: Tensor, support_size: int | None = None) -> Tensor:
        """Map (N, C, H, W) to (N, d), or (G, M, C, H, W) to (G, M, d) (per-episode BN).

        ``support_size``: take every BatchNorm's statistics from the first
        ``support_size`` images (of each episode) only, see :class:`EpisodeBatchNorm2d`.
        """
        x, groups = to_example_major(images, self.channels_last)
        if x.shape[1:] != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(
                f"expected images of {self.in_channels} x {self.image_size} x {self.image_size}, "
                f"got {tuple(x.shape[1:])}"
            )
        for block in self.blocks:
            x = block(x, groups, support_size)
        return from_example_major(x.flatten(1), groups, images.dim() == 5, self.channels_last)
