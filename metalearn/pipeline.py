"""What train.py and evaluate.py run: composed Hydra config in, metrics and reports out."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra.utils
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from metalearn.checkpoint import read_checkpoint
from metalearn.data.datamodule import EpisodicDataModule
from metalearn.lightning import HyperRepresentation
from metalearn.utils.console import print_config_tree

__all__ = ["train", "evaluate", "write_report", "format_report"]

#: Data settings that evaluate.py takes from the checkpoint unless given explicitly.
_EPISODE_KEYS = ("ways", "shots", "query_shots", "split", "disjoint")
_TRAINED_KEYS = _EPISODE_KEYS + ("image_size", "rotations")


def _instantiate_all(group: Mapping[str, Any] | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a callbacks / logger group, dropping None."""
    if not group:
        return []
    objects = (
        hydra.utils.instantiate(conf) for conf in group.values() if conf and "_target_" in conf
    )
    return [obj for obj in objects if obj is not None]


def _quiet_known_warnings() -> None:
    """Silence Lightning warnings that do not apply to metalearn's data pipeline."""
    # TrainEpisodes shards itself across workers, so its __len__ is exact.
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
    # Raised inside Lightning on recent torch; nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def _finish_wandb() -> None:
    """End the wandb run of this job (one run per job, also in a Hydra multirun)."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def format_report(report: Mapping[str, Any]) -> str:
    """One line: accuracy ± 95% CI and the setting it was measured on."""
    return (
        f"test accuracy {100 * report['accuracy']:.2f}% ± {100 * report['ci95']:.2f} "
        f"({report['episodes']} episodes, {report['ways']}-way {report['shots']}-shot, "
        f"{report['query_shots']} queries per class, T={report['inner_steps']}, "
        f"split {report['split']}, {'disjoint' if report.get('disjoint', True) else 'paper'} sampler)"
    )


def write_report(report: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the evaluation report as JSON (atomically) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(dict(report), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def _test_report(
    trainer: pl.Trainer,
    model: HyperRepresentation,
    datamodule: EpisodicDataModule,
    checkpoint: str | None,
) -> dict[str, Any]:
    trainer.test(model, datamodule=datamodule, ckpt_path=checkpoint, verbose=False)
    return {
        **model.last_eval,
        "ways": datamodule.ways,
        "shots": datamodule.shots,
        "query_shots": datamodule.query_shots,
        "inner_steps": model.eval_steps,
        "split": getattr(datamodule, "split", None),
        "disjoint": datamodule.disjoint,
        "checkpoint": checkpoint,
    }


def _best_checkpoint(trainer: pl.Trainer) -> str | None:
    """Path of the best checkpoint by ``val/acc`` (None when none was written)."""
    callback = trainer.checkpoint_callback
    path = getattr(callback, "best_model_path", "") if callback is not None else ""
    return path or None


def _report(report: Mapping[str, Any], output_file: str) -> None:
    path = write_report(report, output_file)
    print(format_report(report))
    print(f"report written to {path}")


def train(cfg: DictConfig) -> dict[str, float]:
    """Train (and test the best checkpoint of) the model described by a composed config.

    Returns:
        The final metrics (``train/*``, ``val/*`` and, when ``cfg.test``, ``test/*``).
    """
    _quiet_known_warnings()
    if cfg.get("extras", {}).get("print_config"):
        print_config_tree(cfg)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    datamodule: EpisodicDataModule = hydra.utils.instantiate(cfg.data)
    model: HyperRepresentation = hydra.utils.instantiate(cfg.model)
    callbacks = _instantiate_all(cfg.get("callbacks"))
    loggers = _instantiate_all(cfg.get("logger"))
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False
    )
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        if cfg.get("train", True):
            trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
        if cfg.get("test", True):
            report = _test_report(trainer, model, datamodule, _best_checkpoint(trainer))
            _report(report, cfg.output_file)
            metrics.update({f"test/{k}": float(report[k]) for k in ("accuracy", "ci95")})
    finally:
        _finish_wandb()
    return metrics


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate a checkpoint on fixed test episodes; print and write the report.

    Settings (``ways``, ``shots``, ``query_shots``, ``split``, ``disjoint``, ``inner_steps``)
    left ``null`` in the config are taken from the checkpoint.
    """
    _quiet_known_warnings()
    checkpoint = read_checkpoint(cfg.ckpt_path)
    model = HyperRepresentation(**checkpoint["hyper_parameters"])
    model.load_state_dict(checkpoint["state_dict"])
    if cfg.get("inner_steps") is not None:
        model.eval_inner_steps = int(cfg.inner_steps)

    data_cfg: dict[str, Any] = OmegaConf.to_container(cfg.data, resolve=True)  # type: ignore[assignment]
    trained = checkpoint.get("datamodule_hyper_parameters", {})
    for key in _TRAINED_KEYS:
        if key in trained:
            data_cfg[key] = trained[key]
    for key in _EPISODE_KEYS:
        if cfg.get(key) is not None:
            data_cfg[key] = cfg[key]
    data_cfg["test_episodes"] = int(cfg.episodes)
    datamodule: EpisodicDataModule = hydra.utils.instantiate(data_cfg)

    loggers = _instantiate_all(cfg.get("logger"))
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, logger=loggers or False, callbacks=[], enable_checkpointing=False
    )
    try:
        report = _test_report(trainer, model, datamodule, None)
        report["checkpoint"] = str(Path(cfg.ckpt_path).resolve())
        _report(report, cfg.output_file)
    finally:
        _finish_wandb()
    return report
