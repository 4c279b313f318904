"""A test-only callback that records the dtype of every convolution's output in training."""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl
from torch import nn


class ConvDtypes(pl.Callback):
    def __init__(self, path: str) -> None:
        self.path, self.dtypes = path, set()

    def on_fit_start(self, trainer, pl_module) -> None:
        for module in pl_module.backbone.modules():
            if isinstance(module, nn.Conv2d):
                module.register_forward_hook(self._record)

    def _record(self, module, inputs, output) -> None:
        self.dtypes.add(str(output.dtype))

    def on_train_end(self, trainer, pl_module) -> None:
        Path(self.path).write_text(json.dumps(sorted(self.dtypes)))
