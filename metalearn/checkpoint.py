"""Reading training checkpoints without Lightning: the trained representation as a plain module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra.utils
import torch
from torch import nn

from metalearn.errors import ConfigError

__all__ = ["read_checkpoint", "load_representation"]


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by metalearn's training onto the CPU.

    Raises:
        ConfigError: the file does not exist or is not a metalearn checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"cannot read checkpoint {path}: {err}".replace("\n", " ")) from None
    if "state_dict" not in checkpoint or "backbone" not in checkpoint.get("hyper_parameters", {}):
        raise ConfigError(f"{path} is not a metalearn training checkpoint (no backbone config)")
    return checkpoint


def load_representation(checkpoint_path: str | Path) -> nn.Module:
    """The trained representation h_λ of a checkpoint, as a plain ``torch.nn.Module``.

    The module maps a batch of images to features: for Omniglot (B, 1, 28, 28) float
    images preprocessed as :func:`metalearn.data.load_omniglot_image` does (ink = 1,
    background = 0) to (B, 256). It is returned in ``eval()`` mode on the CPU. With the
    default BatchNorm mode (``norm: batch``, the paper's) normalization uses the statistics
    of the batch it is given, so embed a whole episode (or a reasonably large batch) at once.

    Example:
        >>> net = load_representation("logs/train/runs/.../checkpoints/last.ckpt")
        >>> features = net(torch.stack([load_omniglot_image(p) for p in paths]))
    """
    checkpoint = read_checkpoint(checkpoint_path)
    net: nn.Module = hydra.utils.instantiate(checkpoint["hyper_parameters"]["backbone"])
    prefix = "backbone."
    state = {
        key[len(prefix) :]: value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(prefix)
    }
    net.load_state_dict(state)
    return net.eval()
