"""Reading training checkpoints without Lightning: the trained representation as a plain module."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra.utils
import torch
from torch import nn

from metalearn.errors import ConfigError

__all__ = [
    "read_checkpoint",
    "load_representation",
    "check_resumable",
    "config_differences",
    "find_last_checkpoint",
]


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


#: Model settings that change the parameters' shapes or meaning: a checkpoint whose values
#: differ cannot be resumed with the current config.
STRUCTURAL_KEYS = ("backbone", "learn_inner_lr", "inner_lr_param")


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def config_differences(
    trained: Mapping[str, Any], current: Mapping[str, Any], keys: Sequence[str]
) -> list[str]:
    """``"model.key: checkpoint A, config B"`` for every differing leaf under ``keys``."""
    differences = []
    for key in keys:
        old = _flatten(trained.get(key), f"model.{key}")
        new = _flatten(current.get(key), f"model.{key}")
        for leaf in sorted(set(old) | set(new)):
            if old.get(leaf) != new.get(leaf):
                differences.append(
                    f"{leaf}: checkpoint {old.get(leaf)!r}, config {new.get(leaf)!r}"
                )
    return differences


def check_resumable(checkpoint: Mapping[str, Any], model_config: Mapping[str, Any]) -> list[str]:
    """Raise :class:`ConfigError` when the checkpoint's model differs structurally from
    ``model_config``; return the other differences (worth a warning)."""
    trained = checkpoint["hyper_parameters"]
    target = checkpoint.get("model_target", "metalearn.lightning.HyperRepresentation")
    configured = model_config.get("_target_", target)
    if hydra.utils.get_class(configured) is not hydra.utils.get_class(target):
        raise ConfigError(
            f"the checkpoint holds a {target}, the config a {model_config['_target_']}: "
            f"choose the model (or algorithm) the checkpoint was trained with"
        )
    structural = config_differences(trained, model_config, STRUCTURAL_KEYS)
    if structural:
        raise ConfigError(
            "the checkpoint was trained with a different model config: " + "; ".join(structural)
        )
    others = [k for k in trained if k not in STRUCTURAL_KEYS and k in model_config]
    return config_differences(trained, model_config, others)


def find_last_checkpoint(output_dir: str | Path, runs_dir: str | Path) -> Path:
    """Resolve ``ckpt_path=last``: this run folder's ``checkpoints/last.ckpt`` when it
    exists, else the newest ``*/checkpoints/last.ckpt`` under ``runs_dir``."""
    own = Path(output_dir) / "checkpoints" / "last.ckpt"
    if own.is_file():
        return own
    found = sorted(Path(runs_dir).glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ConfigError(
            f"ckpt_path=last: no checkpoints/last.ckpt in {output_dir} or under {runs_dir}; "
            f"give the checkpoint's path instead"
        )
    return found[-1]
