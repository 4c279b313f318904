"""Callbacks and plugins: throughput in the progress bar, wandb plots, atomic checkpoints."""

from __future__ import annotations

import os
import time
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Checkpoint, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from metalearn.utils.files import atomic_write

__all__ = [
    "EpisodeRate",
    "InnerStepCurve",
    "AtomicCheckpointIO",
    "BestCheckpoint",
    "ResumeCheckpoint",
    "StepProgressBar",
]


class EpisodeRate(pl.Callback):
    """Shows training episodes per second (all ranks together) in the progress bar.

    The rate is measured between consecutive training batch ends, so data loading and
    the optimizer step are included, and smoothed exponentially.

    Args:
        smoothing: weight of the previous estimate in the moving average.
    """

    def __init__(self, smoothing: float = 0.9) -> None:
        self.smoothing = smoothing
        self._last: float | None = None
        self.rate: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = None

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        now = time.perf_counter()
        if self._last is not None and now > self._last:
            episodes = len(batch.episode_ids) * trainer.world_size
            current = episodes / (now - self._last)
            self.rate = (
                current
                if self.rate is None
                else self.smoothing * self.rate + (1 - self.smoothing) * current
            )
            pl_module.log("episodes_per_s", self.rate, prog_bar=True, logger=False)
        self._last = now


class StepProgressBar(TQDMProgressBar):
    """The training bar counts outer steps of ``trainer.max_steps`` ("train 180/2000").

    Training is one endless epoch that ``max_steps`` ends, so Lightning's "Epoch 0" and
    batch counter say nothing, and after a resume the batch counter starts again from 0
    while the step does not.
    """

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        super().on_train_epoch_start(trainer)
        bar = self.train_progress_bar
        if trainer.max_steps and trainer.max_steps > 0:
            bar.total = trainer.max_steps
        bar.n = trainer.global_step
        bar.set_description("train steps")
        bar.refresh()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        bar = self.train_progress_bar
        step = trainer.global_step
        if bar is not None and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()


class InnerStepCurve(pl.Callback):
    """After each validation, logs to wandb a table and a line plot of the mean query
    accuracy of the heads after t = 0..T inner steps (``last_eval["accuracy_per_step"]``)."""

    @rank_zero_only
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        curve = getattr(pl_module, "last_eval", {}).get("accuracy_per_step")
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not curve or not loggers:
            return
        import wandb

        table = wandb.Table(
            columns=["inner_step", "query_accuracy"],
            data=[[t, float(a)] for t, a in enumerate(curve)],
        )
        # A custom line chart; wandb logs its data as the table "val/acc_vs_inner_step_table".
        plot = wandb.plot.line(
            table, "inner_step", "query_accuracy", title="val: query accuracy vs inner step"
        )
        for logger in loggers:
            logger.experiment.log(
                {"val/acc_vs_inner_step": plot, "trainer/global_step": trainer.global_step}
            )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same folder, then renames it.

    A run killed or a disk filled while a checkpoint is written leaves the previous file
    intact and never a truncated checkpoint under the final name.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        atomic_write(path, lambda handle: torch.save(checkpoint, handle))


class BestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose saved state names its files relative to its folder.

    Lightning's own state holds absolute paths, so a run folder that was copied or moved
    resumed with the old location of its best checkpoint (and tested the original's file
    when that still existed). Here the paths are stored relative to ``dirpath`` and
    resolved against the current ``dirpath`` on load; absolute paths of older
    checkpoints that lie in their saved ``dirpath`` are moved along the same way.
    """

    _PATH_KEYS = ("best_model_path", "kth_best_model_path", "last_model_path")

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key, so that checkpoints written with it resume here too.
        key = super().state_key
        return "ModelCheckpoint" + key[len(type(self).__qualname__) :]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        folder = os.path.abspath(self.dirpath or ".")

        def relative(path: str) -> str:
            if path and os.path.dirname(os.path.abspath(path)) == folder:
                return os.path.basename(path)
            return path

        for key in self._PATH_KEYS:
            state[key] = relative(state.get(key) or "")
        state["best_k_models"] = {relative(k): v for k, v in state["best_k_models"].items()}
        state["dirpath"] = "."
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("dirpath") or "."
        folder = self.dirpath or "."

        def here(path: str) -> str:
            if not path:
                return path
            if not os.path.isabs(path):
                return os.path.join(folder, path)
            if saved != "." and os.path.dirname(path) == os.path.abspath(saved):
                return os.path.join(folder, os.path.basename(path))
            return path

        state = dict(state_dict, dirpath=self.dirpath)
        for key in self._PATH_KEYS:
            if key in state:
                state[key] = here(state[key] or "")
        state["best_k_models"] = {here(k): v for k, v in state.get("best_k_models", {}).items()}
        super().load_state_dict(state)


class ResumeCheckpoint(Checkpoint):
    """Keeps ``<dirpath>/last.ckpt`` current for resuming (``ckpt_path=last``).

    Saved every ``every_n_train_steps`` steps, again after each validation (so a resumed
    run does not miss one) and when training ends. Being a ``Checkpoint``, it runs after
    the other callbacks, including the best-checkpoint ``ModelCheckpoint``, whose state is
    then already up to date in the saved file.

    Args:
        dirpath: the checkpoint folder.
        every_n_train_steps: steps between saves (the most a killed run can lose).
    """

    def __init__(self, dirpath: str, every_n_train_steps: int = 100) -> None:
        if every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps must be >= 1, got {every_n_train_steps}")
        self.dirpath, self.every_n_train_steps = dirpath, every_n_train_steps
        self._saved_step = -1

    @property
    def path(self) -> str:
        return os.path.join(self.dirpath, "last.ckpt")

    def _save(self, trainer: pl.Trainer) -> None:
        if getattr(trainer, "fast_dev_run", False) or trainer.sanity_checking:
            return
        trainer.save_checkpoint(self.path, weights_only=False)
        self._saved_step = trainer.global_step

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.global_step % self.every_n_train_steps == 0:
            self._save(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._saved_step != trainer.global_step:
            self._save(trainer)
