"""What train.py and evaluate.py run: composed Hydra config in, metrics and reports out."""

from __future__ import annotations

import itertools
import logging
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import hydra.utils
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.utilities import rank_zero_warn

from metalearn.checkpoint import (
    check_resumable,
    datamodule_target,
    find_last_checkpoint,
    learner_class,
    read_checkpoint,
    run_differences,
    upgrade_hyper_parameters,
)
from metalearn.config import (
    EVAL_DATA,
    EvalSettings,
    TrainSettings,
    check_config,
    check_target,
    instantiate_group,
    settings_of,
)
from metalearn.data.datamodule import EpisodicDataModule
from metalearn.data.episodes import check_episode_geometry
from metalearn.errors import ConfigError
from metalearn.lightning import MAML, EpisodicModule, TrainingDiverged
from metalearn.lightning.maml import MAML_BATCH_STATS
from metalearn.models import BATCH_STATS, BatchStats
from metalearn.reports import (
    format_result,
    markdown_table,
    plot_accuracy_vs_steps,
    write_json,
)
from metalearn.utils.console import print_config_tree
from metalearn.utils.files import write_text
from metalearn.utils.host_memory import keep_freed_host_memory
from metalearn.utils.loggers import CSVLogger

__all__ = ["train", "evaluate"]

log = logging.getLogger(__name__)

#: evaluate.py names the test geometry ``ways``, ``shots``, ``query_shots``.
EVAL_KEYS = ("ways", "shots", "query_shots")


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
    """The checkpoint to resume from (``ckpt_path``; ``last`` resolved to this run folder's
    or the newest run with the same model and data settings), checked against the config,
    and its global step."""
    ckpt_path = cfg.get("ckpt_path")
    if not ckpt_path:
        return None
    model_cfg: dict[str, Any] = OmegaConf.to_container(cfg.model, resolve=True)  # type: ignore[assignment]
    data_cfg: dict[str, Any] = OmegaConf.to_container(cfg.data, resolve=True)  # type: ignore[assignment]
    if ckpt_path == "last":
        runs = Path(cfg.paths.log_dir) / cfg.task_name / "runs"
        ckpt_path = str(
            find_last_checkpoint(
                cfg.paths.output_dir,
                runs,
                lambda found: run_differences(found, model_cfg, data_cfg),
            )
        )
        log.info("resuming from %s", ckpt_path)
    checkpoint = read_checkpoint(ckpt_path)
    check_resumable(checkpoint, model_cfg)
    for difference in run_differences(checkpoint, model_cfg, data_cfg):
        log.warning("resuming with a changed setting: %s", difference)
    return str(ckpt_path), int(checkpoint.get("global_step", 0))


def _check_fresh_run_dir(cfg: DictConfig) -> None:
    """Refuse to start training in a folder that already holds a run (its checkpoints
    and metrics would be overwritten, a stale best checkpoint left behind)."""
    if cfg.get("ckpt_path") or not cfg.get("train", True):
        return
    if int(os.environ.get("LOCAL_RANK", "0")) > 0:  # plain ddp: the ranks rank 0 launched
        return
    out = Path(cfg.paths.output_dir)
    held = sorted((out / "checkpoints").glob("*.ckpt")) + sorted(out.glob("csv/**/metrics.csv"))
    if held:
        raise ConfigError(
            f"{out} already holds a run ({held[0].relative_to(out)}): continue it with "
            f"ckpt_path=last, or choose a new folder (hydra.run.dir)"
        )


def _warn_per_rank_statistics(
    trainer: pl.Trainer, model: EpisodicModule, datamodule: EpisodicDataModule
) -> None:
    """BatchNorm statistics over the meta-batch (``meta_batch``, ``running`` in training)
    come from each rank's slice of it: say so, since the run then differs from one
    process (the per-episode settings do not)."""
    ranks = trainer.world_size
    if ranks > 1 and model.batch_stats in ("meta_batch", "running"):
        rank_zero_warn(
            f"model.batch_stats={model.batch_stats} on {ranks} ranks: training normalizes "
            f"over each rank's {datamodule.meta_batch // ranks} episodes of the meta-batch "
            f"of {datamodule.meta_batch}, not over all of them, so the updates differ from "
            f"one process (episode, split and support are the same on any number of ranks)"
        )


def _check_trained(metrics: Mapping[str, float], model: EpisodicModule) -> None:
    """Stop when every training step of the fit was skipped (``model.nonfinite=skip``
    with a loss that was never finite): there is no trained model to test."""
    if "train/skipped" in metrics and "train/loss" not in metrics:
        raise TrainingDiverged(
            f"every training step ({int(metrics['train/skipped'])}) had an inf or NaN loss "
            f"and was skipped (model.nonfinite=skip), so nothing was trained: "
            f"{model.divergence_advice()}"
        )


def _best_checkpoint(trainer: pl.Trainer) -> str | None:
    """Path of the best checkpoint by ``val/acc`` (None when none was written)."""
    callback = trainer.checkpoint_callback
    path = getattr(callback, "best_model_path", "") if callback is not None else ""
    return path or None


def _checkpoint_to_test(trainer: pl.Trainer, cfg: DictConfig, given: str | None) -> str | None:
    """The checkpoint a training run tests: the best by meta-validation accuracy; with
    ``train=false``, the one given as ``ckpt_path``. Never the weights of no checkpoint,
    except in ``debug=fast_dev_run`` (a smoke test that writes no checkpoints)."""
    if not cfg.get("train", True):
        assert given is not None  # checked before anything ran
        return given
    best = _best_checkpoint(trainer)
    if best is None and not getattr(trainer, "fast_dev_run", False):
        raise ConfigError(
            f"no validation ran in {trainer.global_step} steps, so there is no best "
            f"checkpoint to test: set trainer.val_check_interval <= trainer.max_steps (and "
            f"keep callbacks.model_checkpoint), or evaluate a checkpoint with evaluate.py"
        )
    return best


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


def _keep_host_memory(cfg: DictConfig) -> None:
    """``extras.keep_host_memory``: the C library keeps the host memory PyTorch frees, for
    its next allocations (metalearn.utils.host_memory)."""
    if (cfg.get("extras") or {}).get("keep_host_memory", True):
        keep_freed_host_memory()


def train(cfg: DictConfig) -> dict[str, float]:
    """Train (and test the best checkpoint of) the model described by a composed config.

    Returns:
        The final metrics (``train/*``, ``val/*`` and, when ``cfg.test``, ``test/*``).
    """
    _quiet_known_warnings()
    check_config(cfg, TrainSettings)
    _keep_host_memory(cfg)
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
    _check_fresh_run_dir(cfg)
    if not cfg.get("train", True) and cfg.get("test", True) and not cfg.get("ckpt_path"):
        raise ConfigError(
            "train=false tests a trained model: give it as ckpt_path=PATH (or use evaluate.py)"
        )
    datamodule: EpisodicDataModule = hydra.utils.instantiate(cfg.data)
    model: EpisodicModule = hydra.utils.instantiate(cfg.model)
    resume = _resume_checkpoint(cfg)
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    for logger in loggers:
        if resume is not None and isinstance(logger, CSVLogger):
            logger.resume_step = resume[1]  # keep the metrics logged before the checkpoint
    trainer: pl.Trainer = hydra.utils.instantiate(
        _sweep_safe(cfg.trainer), callbacks=callbacks, logger=loggers or False
    )
    _warn_per_rank_statistics(trainer, model, datamodule)
    for logger in loggers:
        hyperparameters: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
        logger.log_hyperparams({**hyperparameters, "protocol": model.protocol})
    try:
        if cfg.get("train", True):
            trainer.fit(model, datamodule=datamodule, ckpt_path=resume[0] if resume else None)
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
        _check_trained(metrics, model)
        if cfg.get("test", True):
            tested = _checkpoint_to_test(trainer, cfg, resume[0] if resume else None)
            trainer.test(model, datamodule=datamodule, ckpt_path=tested, verbose=False)
            result = _test_result(trainer, model, datamodule, model.eval_steps, tested)
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


def model_from_checkpoint(
    checkpoint: Mapping[str, Any], compile: bool | str = False
) -> EpisodicModule:
    """Rebuild the trained LightningModule (its class is recorded in the checkpoint).

    ``compile`` replaces the training run's ``model.compile``: how a run executes is a
    setting of the run that evaluates, not of the trained model."""
    hyper_parameters = upgrade_hyper_parameters(checkpoint["hyper_parameters"])
    if "compile" in hyper_parameters or compile:
        hyper_parameters["compile"] = compile
    model: EpisodicModule = learner_class(checkpoint)(**hyper_parameters)
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
    this machine's paths (:data:`~metalearn.config.EVAL_DATA`, those its class takes),
    every ``data.KEY=VALUE`` given to evaluate.py, then ``query_shots``, ``split``,
    ``disjoint`` and ``episodes``."""
    given: dict[str, Any] = OmegaConf.to_container(cfg.data, resolve=True)  # type: ignore[assignment]
    if "_target_" in given:
        raise ConfigError(
            "evaluate.py reads the data set from the checkpoint: leave data unset and change "
            "single settings with data.KEY=VALUE"
        )
    trained = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    target = datamodule_target(checkpoint)
    if target is None or not trained:
        raise ConfigError(
            f"{cfg.ckpt_path} records no data settings (it was not written by train.py): "
            f"evaluate it from Python with a DataModule of your choice"
        )
    takes = settings_of(target)
    data_cfg = {**trained, "_target_": target}
    for key, value in given.items():
        if key not in EVAL_DATA or key in takes:
            data_cfg[key] = value
    for key in ("query_shots", "split", "disjoint"):
        if cfg.get(key) is not None:
            data_cfg[key] = cfg[key]
    if "test_episodes" in given:
        raise ConfigError("data.test_episodes: evaluate.py takes episodes=N instead")
    if int(cfg.episodes) < 1:
        raise ConfigError(f"episodes must be >= 1, got {cfg.episodes}")
    data_cfg["test_episodes"] = int(cfg.episodes)
    check_target("data", data_cfg)
    return data_cfg


def _test_datamodules(
    data_cfg: Mapping[str, Any], ways_list: list[int], shots_list: list[int]
) -> list[EpisodicDataModule]:
    """One DataModule per (ways, shots), each checked against the test split before any
    evaluation runs; the split is read once."""
    query_shots = data_cfg["query_shots"]
    for ways, shots in itertools.product(ways_list, shots_list):
        check_episode_geometry(ways, shots, query_shots, EVAL_KEYS)
    modules: list[EpisodicDataModule] = []
    for ways, shots in itertools.product(ways_list, shots_list):
        datamodule: EpisodicDataModule = hydra.utils.instantiate(
            {**data_cfg, "ways": ways, "shots": shots}
        )
        datamodule.eval_keys = EVAL_KEYS
        if modules:
            datamodule.use_splits(modules[0].loaded_splits)
        else:
            datamodule.prepare_data()
            datamodule.setup("test")
        modules.append(datamodule)
    return modules


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate a checkpoint on fixed test episodes, for one or several settings.

    ``ways`` and ``shots`` may be lists (every combination is evaluated) and
    ``inner_steps`` a list of test-time inner step counts (read off one inner solve of
    max(inner_steps) steps). Settings left ``null`` come from the checkpoint. Writes
    ``output_file`` (the first result, with all of them under ``results``) and, in the run
    folder, ``report.json``, ``report.md`` and ``accuracy_vs_steps.png``.
    """
    _quiet_known_warnings()
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        raise ConfigError(
            "evaluate.py needs ckpt_path=PATH, a checkpoint written by train.py "
            "(<run>/checkpoints/best-*.ckpt or last.ckpt)"
        )
    check_config(cfg, EvalSettings)
    _keep_host_memory(cfg)
    ckpt_path = str(cfg.ckpt_path)
    checkpoint = read_checkpoint(ckpt_path)
    model = model_from_checkpoint(checkpoint, cfg.get("compile", False))
    _set_test_batch_stats(model, cfg.get("batch_stats"))

    data_cfg = _evaluation_data_config(cfg, checkpoint)
    ways_list = _as_list(cfg.get("ways")) or [data_cfg["ways"]]
    shots_list = _as_list(cfg.get("shots")) or [data_cfg["shots"]]
    steps_list = _as_list(cfg.get("inner_steps")) or [model.eval_steps]
    if min(steps_list) < 0:
        raise ConfigError(f"inner_steps must be >= 0, got {steps_list}")
    model.eval_inner_steps = max(max(steps_list), 1)
    datamodules = _test_datamodules(data_cfg, ways_list, shots_list)

    if cfg.get("logger") and "wandb" in cfg.logger:
        project = _training_wandb_project(ckpt_path)
        if project and cfg.logger.wandb.get("project") in (None, "metalearn"):
            with open_dict(cfg):
                cfg.logger.wandb.project = project
    loggers = instantiate_group(cfg.get("logger"))
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, logger=loggers or False, callbacks=[], enable_checkpointing=False
    )
    results: list[dict[str, Any]] = []
    curves: dict[str, list[float]] = {}
    try:
        for datamodule in datamodules:
            trainer.test(model, datamodule=datamodule, verbose=False)
            full = _test_result(
                trainer, model, datamodule, model.eval_steps, str(Path(ckpt_path).resolve())
            )
            curves[f"{datamodule.ways}-way {datamodule.shots}-shot"] = full["accuracy_per_step"]
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
        write_text(out_dir / "report.md", f"# Evaluation of `{ckpt_path}`\n\n{table}")
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
