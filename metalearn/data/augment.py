"""Training augmentation of whole meta-batches: random crop (zero padding) and horizontal
flip, reproducible per episode, with one gather on the batch's device."""

from __future__ import annotations

import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from metalearn.data.episodes import EpisodeBatch
from metalearn.errors import ConfigError

__all__ = ["augment_episodes"]


def _crop_flip(images: Tensor, offsets: Tensor, flips: Tensor, padding: int) -> Tensor:
    """Crop (n, C, H, W) images out of their zero-padded copies at ``offsets`` (n, 2), and
    mirror those with ``flips`` (n,), with one gather on the images' device."""
    n, _, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    device = images.device
    offsets, flips = offsets.to(device), flips.to(device)
    rows = offsets[:, :1] + torch.arange(height, device=device)  # (n, H)
    across = torch.arange(width, device=device).expand(n, width)
    cols = offsets[:, 1:] + torch.where(flips[:, None], width - 1 - across, across)  # (n, W)
    picked = padded[
        torch.arange(n, device=device)[:, None, None], :, rows[:, :, None], cols[:, None]
    ]
    return picked.permute(0, 3, 1, 2).contiguous()  # (n, H, W, C) -> (n, C, H, W)


def augment_episodes(
    batch: EpisodeBatch, seed: int, padding: int = 8, flip: bool = True
) -> EpisodeBatch:
    """Random crop with zero padding and random horizontal flip of every image of a batch.

    Each support and query image is padded by ``padding`` pixels on every side, cropped
    back to its size at a uniformly drawn offset, and mirrored with probability 1/2 (when
    ``flip``). The draws of episode ``i`` are a pure function of ``(seed, i)``
    (``numpy.random.default_rng([seed, crc32("augment"), i])``), so a run is reproducible,
    and equal whatever the number of ranks or the step a resumed run starts from. Only the
    offsets are drawn on the CPU; the images are transformed on their device, as uint8.

    Args:
        batch: support (B, N*K, C, H, W), query (B, N*Q, C, H, W), ``episode_ids`` (B,).
        seed: the training seed.
        padding: pixels of zero padding (8).
        flip: also flip horizontally.

    Returns:
        The batch with new support and query images (labels unchanged).
    """
    if padding < 0:
        raise ConfigError(f"data.augment_padding must be >= 0, got {padding}")
    code = zlib.crc32(b"augment")
    per_support, per_query = batch.support.shape[1], batch.query.shape[1]
    per_episode = per_support + per_query
    offsets, flips = [], []
    for episode in batch.episode_ids.tolist():
        rng = np.random.default_rng([seed, code, int(episode)])
        offsets.append(rng.integers(0, 2 * padding + 1, size=(per_episode, 2)))
        flips.append(rng.random(per_episode) < 0.5 if flip else np.zeros(per_episode, bool))
    offset = torch.from_numpy(np.stack(offsets))  # (B, M, 2)
    mirror = torch.from_numpy(np.stack(flips))  # (B, M)

    def apply(images: Tensor, part: slice) -> Tensor:
        out = _crop_flip(
            images.flatten(0, 1), offset[:, part].flatten(0, 1), mirror[:, part].flatten(), padding
        )
        return out.view(images.shape)

    return batch._replace(
        support=apply(batch.support, slice(0, per_support)),
        query=apply(batch.query, slice(per_support, per_episode)),
    )
