"""Test-only: the dtypes a backbone's convolutions produce, and a callback that records them
in training."""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn


def conv_dtypes(backbone: nn.Module) -> set[torch.dtype]:
    """The dtypes of every convolution output of ``backbone``'s forward passes from now on
    (filled as they run)."""
    seen: set[torch.dtype] = set()
    for conv in backbone.modules():
        if isinstance(conv, nn.Conv2d):
            conv.register_forward_hook(lambda module, inputs, out: seen.add(out.dtype))
    return seen


class ConvDtypes(pl.Callback):
    """Writes the convolution output dtypes of a training run to ``path`` (a JSON list)."""

    def __init__(self, path: str) -> None:
        self.path, self.dtypes = path, set()

    def on_fit_start(self, trainer, pl_module) -> None:
        self.dtypes = conv_dtypes(pl_module.backbone)

    def on_train_end(self, trainer, pl_module) -> None:
        Path(self.path).write_text(json.dumps(sorted(str(d) for d in self.dtypes)))
