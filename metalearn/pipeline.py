"""What train.py and evaluate.py run: composed Hydra config in, metrics and reports out."""

from __future__ import annotations

import itertools
import logging
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import hydra.utils
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf, open_dict

from metalearn.checkpoint import (
    check_resumable,
    find_last_checkpoint,
    read_checkpoint,
    upgrade_hyper_parameters,
)
from metalearn.data.datamodule import EpisodicDataModule
from metalearn.errors import ConfigError
from metalearn.lightning import MAML, EpisodicModule
from metalearn.lightning.baselines import MAML_BATCH_STATS
from metalearn.models import BATCH_STATS, BatchStats
from metalearn.reports import (
    format_result,
    markdown_table,
    plot_accuracy_vs_steps,
    write_json,
)
from metalearn.utils.console import print_config_tree
from metalearn.utils.loggers import CSVLogger

__all__ = ["train", "evaluate"]

log = logging.getLogger(__name__)

#: Data settings of the evaluation machine, never taken from the checkpoint.
_LOCAL_DATA_KEYS = ("data_dir", "cache_dir", "split_dir", "download", "num_workers")


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
    # The episode stream resumes from the step in the checkpoint (the datamodule's state),
    # not from the DataLoader's, so a mid-epoch resume is exact
    # (tests/test_operations.py::test_resume_after_sigkill_is_exact).
    warnings.filterwarnings(
        "ignore", message=r"You're resuming from a checkpoint that ended before"
    )


def _finish_wandb() -> None:
    """End the wandb run of this job (one run per job, also in a Hydra multirun)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _sweep_safe(trainer_cfg: DictConfig) -> DictConfig:
    """In a Hydra multirun, replace plain ``ddp`` by ``ddp_spawn``.

    Plain ``ddp`` starts the other ranks by re-running the command line; inside a sweep
    that re-launches the sweep itself, and jobs silently train on part of the data.
    ``ddp_spawn`` starts the ranks from inside the job and is correct there.
    """
    devices, nodes = trainer_cfg.get("devices", 1), trainer_cfg.get("num_nodes", 1) or 1
    several = (
        nodes > 1 or devices in (-1, "-1", "auto") or (isinstance(devices, int) and devices > 1)
    )
    strategy = trainer_cfg.get("strategy", "auto")
    if _in_multirun() and several and strategy in ("ddp", "auto", None):
        log.warning(
            "Hydra multirun with several devices: using strategy=ddp_spawn instead of %s "
            "(plain ddp re-launches the command line, which breaks sweeps)",
            strategy,
        )
        trainer_cfg = trainer_cfg.copy()
        with open_dict(trainer_cfg):
            trainer_cfg.strategy = "ddp_spawn"
    return trainer_cfg


def _resume_checkpoint(cfg: DictConfig) -> tuple[str, int] | None:
    """The checkpoint to resume from (``ckpt_path``, ``last`` resolved), checked against
    the model config, and its global step."""
    ckpt_path = cfg.get("ckpt_path")
    if not ckpt_path:
        return None
    if ckpt_path == "last":
        runs = Path(cfg.paths.log_dir) / cfg.task_name / "runs"
        ckpt_path = str(find_last_checkpoint(cfg.paths.output_dir, runs))
        log.info("resuming from %s", ckpt_path)
    model_cfg: dict[str, Any] = OmegaConf.to_container(cfg.model, resolve=True)  # type: ignore[assignment]
    checkpoint = read_checkpoint(ckpt_path)
    for difference in check_resumable(checkpoint, model_cfg):
        log.warning("resuming with a changed setting: %s", difference)
    return str(ckpt_path), int(checkpoint.get("global_step", 0))


def _best_checkpoint(trainer: pl.Trainer) -> str | None:
    """Path of the best checkpoint by ``val/acc`` (None when none was written)."""
    callback = trainer.checkpoint_callback
    path = getattr(callback, "best_model_path", "") if callback is not None else ""
    return path or None


def _test_result(
    trainer: pl.Trainer,
    model: EpisodicModule,
    datamodule: EpisodicDataModule,
    steps: int,
    checkpoint: str | None,
) -> dict[str, Any]:
    """The test result of the last ``trainer.test``, read from ``callback_metrics`` (the
    only results that come back from spawned ranks)."""
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    return {
        "accuracy": metrics["test/acc"],
        "ci95": metrics["test/ci95"],
        "episodes": int(metrics["test/episodes"]),
        "ways": datamodule.ways,
        "shots": datamodule.shots,
        "query_shots": datamodule.query_shots,
        "inner_steps": steps,
        "split": getattr(datamodule, "split", None),
        "disjoint": datamodule.disjoint,
        "protocol": model.protocol,
        "batch_stats": model.batch_stats,
        "checkpoint": checkpoint,
        "loss": metrics["test/loss"],
        "accuracy_per_step": [metrics[f"test/acc_t{t}"] for t in range(steps + 1)],
        "ci95_per_step": [metrics[f"test/ci95_t{t}"] for t in range(steps + 1)],
    }


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
    if cfg.get("runner"):
        # Experiments that are not episodic Lightning training (hyperparameter optimization).
        try:
            metrics: dict[str, float] = hydra.utils.call(cfg.runner, cfg)
        finally:
            _finish_wandb()
        return metrics
    datamodule: EpisodicDataModule = hydra.utils.instantiate(cfg.data)
    model: EpisodicModule = hydra.utils.instantiate(cfg.model)
    resume = _resume_checkpoint(cfg)
    callbacks = _instantiate_all(cfg.get("callbacks"))
    loggers = _instantiate_all(cfg.get("logger"))
    for logger in loggers:
        if resume is not None and isinstance(logger, CSVLogger):
            logger.resume_step = resume[1]  # keep the metrics logged before the checkpoint
    trainer: pl.Trainer = hydra.utils.instantiate(
        _sweep_safe(cfg.trainer), callbacks=callbacks, logger=loggers or False
    )
    for logger in loggers:
        hyperparameters: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
        logger.log_hyperparams({**hyperparameters, "protocol": model.protocol})
    try:
        if cfg.get("train", True):
            trainer.fit(model, datamodule=datamodule, ckpt_path=resume[0] if resume else None)
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
        if cfg.get("test", True):
            best = _best_checkpoint(trainer)
            trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False)
            result = _test_result(trainer, model, datamodule, model.eval_steps, best)
            write_json(result, cfg.output_file)
            _wandb_summary(loggers, result)
            print(format_result(result))
            print(f"report written to {cfg.output_file}")
            metrics.update({f"test/{k}": float(result[k]) for k in ("accuracy", "ci95")})
    finally:
        _finish_wandb()
    return metrics


def _as_list(value: Any) -> list[Any] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [int(v) for v in value.split(",")]
    if OmegaConf.is_list(value) or isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _training_wandb_project(ckpt_path: str) -> str | None:
    """The wandb project of the run that wrote the checkpoint (from its .hydra/config.yaml)."""
    config = Path(ckpt_path).resolve().parent.parent / ".hydra" / "config.yaml"
    if not config.is_file():
        return None
    project = OmegaConf.select(OmegaConf.load(config), "logger.wandb.project", default=None)
    return None if project is None else str(project)


def model_from_checkpoint(checkpoint: Mapping[str, Any]) -> EpisodicModule:
    """Rebuild the trained LightningModule (its class is recorded in the checkpoint)."""
    target = checkpoint.get("model_target", "metalearn.lightning.HyperRepresentation")
    hyper_parameters = upgrade_hyper_parameters(checkpoint["hyper_parameters"])
    model: EpisodicModule = hydra.utils.get_class(target)(**hyper_parameters)
    model.load_state_dict(checkpoint["state_dict"])
    return model


def _set_test_batch_stats(model: EpisodicModule, batch_stats: str | None) -> None:
    """Evaluate under another normalization than the checkpoint's (``batch_stats=...``).

    Any setting with batch statistics can replace another (no parameter changes), so a
    transductively trained model can be tested inductively with ``support``; running
    averages exist only in a model trained with ``running``.
    """
    if batch_stats is None or batch_stats == model.batch_stats:
        return
    with_batch_statistics = tuple(name for name in BATCH_STATS if name != "running")
    allowed = MAML_BATCH_STATS if isinstance(model, MAML) else with_batch_statistics
    if model.batch_stats == "running" or batch_stats not in allowed:
        raise ConfigError(
            f"batch_stats={batch_stats}: the checkpoint holds running averages (trained with "
            f"running); leave batch_stats null"
            if model.batch_stats == "running"
            else f"batch_stats={batch_stats} is not possible for this checkpoint "
            f"({type(model).__name__}, trained with {model.batch_stats}): choose one of "
            f"{', '.join(allowed)} (running averages exist only in a model trained with running)"
        )
    model.batch_stats = cast(BatchStats, batch_stats)


def _evaluation_data_config(cfg: DictConfig, checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The DataModule config for evaluating ``checkpoint``: the data set, split and
    preprocessing it was trained with (its saved DataModule hyperparameters and class),
    this machine's paths from ``cfg.data``, then the explicit overrides of ``cfg``."""
    local: dict[str, Any] = OmegaConf.to_container(cfg.data, resolve=True)  # type: ignore[assignment]
    trained = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    target = next(
        (v["target"] for v in checkpoint.values() if isinstance(v, dict) and "target" in v),
        local["_target_"],
    )
    if target != local["_target_"]:
        log.info("evaluating on the checkpoint's data set %s", target)
    data_cfg = {**(trained if trained else local), "_target_": target}
    for key in _LOCAL_DATA_KEYS:
        if key in local:
            data_cfg[key] = local[key]
    for key in ("query_shots", "split", "disjoint"):
        if cfg.get(key) is not None:
            data_cfg[key] = cfg[key]
    data_cfg["test_episodes"] = int(cfg.episodes)
    return data_cfg


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate a checkpoint on fixed test episodes, for one or several settings.

    ``ways`` and ``shots`` may be lists (every combination is evaluated) and
    ``inner_steps`` a list of test-time inner step counts (read off one inner solve of
    max(inner_steps) steps). Settings left ``null`` come from the checkpoint. Writes
    ``output_file`` (the first result, with all of them under ``results``) and, in the run
    folder, ``report.json``, ``report.md`` and ``accuracy_vs_steps.png``.
    """
    _quiet_known_warnings()
    ckpt_path = str(cfg.ckpt_path)
    checkpoint = read_checkpoint(ckpt_path)
    model = model_from_checkpoint(checkpoint)
    _set_test_batch_stats(model, cfg.get("batch_stats"))

    data_cfg = _evaluation_data_config(cfg, checkpoint)
    ways_list = _as_list(cfg.get("ways")) or [data_cfg["ways"]]
    shots_list = _as_list(cfg.get("shots")) or [data_cfg["shots"]]
    steps_list = _as_list(cfg.get("inner_steps")) or [model.eval_steps]
    if min(steps_list) < 0:
        raise ConfigError(f"inner_steps must be >= 0, got {steps_list}")
    model.eval_inner_steps = max(max(steps_list), 1)

    if cfg.get("logger") and "wandb" in cfg.logger:
        project = _training_wandb_project(ckpt_path)
        if project and cfg.logger.wandb.get("project") in (None, "metalearn"):
            with open_dict(cfg):
                cfg.logger.wandb.project = project
    loggers = _instantiate_all(cfg.get("logger"))
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, logger=loggers or False, callbacks=[], enable_checkpointing=False
    )
    results: list[dict[str, Any]] = []
    curves: dict[str, list[float]] = {}
    try:
        for ways, shots in itertools.product(ways_list, shots_list):
            datamodule: EpisodicDataModule = hydra.utils.instantiate(
                {**data_cfg, "ways": ways, "shots": shots}
            )
            trainer.test(model, datamodule=datamodule, verbose=False)
            full = _test_result(
                trainer, model, datamodule, model.eval_steps, str(Path(ckpt_path).resolve())
            )
            curves[f"{ways}-way {shots}-shot"] = full["accuracy_per_step"]
            for steps in steps_list:
                result = {
                    **full,
                    "accuracy": full["accuracy_per_step"][steps],
                    "ci95": full["ci95_per_step"][steps],
                    "inner_steps": steps,
                }
                result.pop("loss")
                results.append(result)
                print(format_result(result))
        out_dir = Path(cfg.paths.output_dir)
        write_json({**results[0], "results": results}, cfg.output_file)
        write_json(
            {"checkpoint": results[0]["checkpoint"], "results": results}, out_dir / "report.json"
        )
        table = markdown_table(results)
        (out_dir / "report.md").write_text(f"# Evaluation of `{ckpt_path}`\n\n{table}")
        plot = plot_accuracy_vs_steps(curves, out_dir / "accuracy_vs_steps.png")
        print(f"reports written to {out_dir} (report.md, report.json, {plot.name})")
        _log_eval_to_wandb(loggers, results, plot)
    finally:
        _finish_wandb()
    return {**results[0], "results": results}


def _log_eval_to_wandb(loggers: list[Any], results: list[dict[str, Any]], plot: Path) -> None:
    from pytorch_lightning.loggers import WandbLogger

    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        import wandb

        columns: list[str | int] = [
            "ways",
            "shots",
            "query_shots",
            "inner_steps",
            "protocol",
            "disjoint",
            "accuracy",
            "ci95",
            "episodes",
        ]
        table = wandb.Table(columns=columns, data=[[r[str(c)] for c in columns] for r in results])
        logger.experiment.log(
            {"eval/results": table, "eval/accuracy_vs_steps": wandb.Image(str(plot))}
        )
    _wandb_summary(loggers, results[0])


def _wandb_summary(loggers: list[Any], result: Mapping[str, Any]) -> None:
    """The test accuracy and the protocol it was measured under, in each wandb run's summary."""
    from pytorch_lightning.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(
                {
                    "test/acc": result["accuracy"],
                    "test/ci95": result["ci95"],
                    "test/protocol": result["protocol"],
                    "test/batch_stats": result["batch_stats"],
                    "test/disjoint": result["disjoint"],
                }
            )
