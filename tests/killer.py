"""A test-only callback that kills its own process, as an out-of-memory killer or a
preempted cluster job would (SIGKILL: no cleanup, no final checkpoint)."""

from __future__ import annotations

import os
import signal

import pytorch_lightning as pl


class KillAtStep(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)
