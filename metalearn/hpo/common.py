"""What the hyperparameter-optimization runners share: settings, threads, loggers, reports."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from metalearn.config import instantiate_group
from metalearn.errors import ConfigError

__all__ = [
    "ExperimentLoggers",
    "hpo_settings",
    "torch_threads",
]

log = logging.getLogger(__name__)


def hpo_settings(cfg: DictConfig, required: Sequence[str]) -> dict[str, Any]:
    """The experiment's ``hpo:`` block as a plain dict, resolved; raises ConfigError if a key
    of ``required`` is absent."""
    block = cfg.get("hpo")
    if block is None:
        raise ConfigError("this experiment needs an `hpo:` block in its config")
    settings: dict[str, Any] = OmegaConf.to_container(block, resolve=True)  # type: ignore[assignment]
    missing = [key for key in required if key not in settings]
    if missing:
        raise ConfigError(f"hpo settings missing: {', '.join(missing)}")
    return settings


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run with ``count`` intra-op threads (None: leave torch's setting), then restore it.

    The experiments are sequences of small matrix products; on a machine whose cores are
    shared with other jobs a second thread mostly waits for a core (3x slower measured on
    2 busy cores), hence the configs' default of one thread.
    """
    previous = torch.get_num_threads()
    if count is not None:
        if count < 1:
            raise ConfigError(f"hpo.num_threads must be >= 1 or null, got {count}")
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class ExperimentLoggers:
    """The run's loggers from ``cfg.logger`` (csv, wandb, none), used outside a Trainer.

    Each entry of ``cfg.logger`` with a ``_target_`` is instantiated as in training; the
    Lightning loggers' ``log_hyperparams`` / ``log_metrics`` / ``finalize`` work without a
    Trainer. Images go to wandb only (a CSV logger has no place for them).
    """

    def __init__(self, cfg: DictConfig) -> None:
        self.loggers: list[Any] = instantiate_group(cfg.get("logger"))
        if self.loggers:
            config = OmegaConf.to_container(cfg, resolve=True)
            for logger in self.loggers:
                logger.log_hyperparams(config)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log_metrics(dict(metrics), step=step)

    def log_images(self, images: Mapping[str, Path]) -> None:
        from pytorch_lightning.loggers import WandbLogger

        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.experiment.log({k: wandb.Image(str(p)) for k, p in images.items()})

    def log_summary(self, metrics: Mapping[str, float]) -> None:
        from pytorch_lightning.loggers import WandbLogger

        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.summary.update(dict(metrics))

    def finalize(self) -> None:
        for logger in self.loggers:
            logger.finalize("success")
