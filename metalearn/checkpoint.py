"""Reading training checkpoints without Lightning: the trained representation as a plain module."""

from __future__ import annotations

import inspect
import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra.utils
import torch

from metalearn.errors import ConfigError
from metalearn.models.normalization import Representation, build_backbone

__all__ = [
    "read_checkpoint",
    "check_trusted_targets",
    "TRUSTED_TARGETS",
    "upgrade_hyper_parameters",
    "load_representation",
    "check_resumable",
    "learner_class",
    "learner_defaults",
    "config_differences",
    "find_last_checkpoint",
    "run_differences",
    "datamodule_target",
    "LOCAL_DATA_KEYS",
]


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by metalearn's training onto the CPU.

    Raises:
        ConfigError: the file does not exist or is not a metalearn checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        inside = sorted(path.glob("**/*.ckpt"))
        hint = f" such as {inside[0]}" if inside else ""
        raise ConfigError(f"{path} is a folder: give a checkpoint file{hint}")
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):
        raise ConfigError(f"{path} is not a checkpoint (not a file written by torch.save)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(
            f"cannot read checkpoint {path}: it is damaged or holds objects other than "
            f"tensors and plain containers ({type(err).__name__})"
        ) from None
    if (
        not isinstance(checkpoint, dict)
        or "state_dict" not in checkpoint
        or not isinstance(checkpoint.get("hyper_parameters"), dict)
        or "backbone" not in checkpoint["hyper_parameters"]
    ):
        raise ConfigError(f"{path} is not a metalearn training checkpoint (no backbone config)")
    check_trusted_targets(checkpoint, path)
    checkpoint["hyper_parameters"] = upgrade_hyper_parameters(checkpoint["hyper_parameters"])
    return checkpoint


#: Modules whose classes a checkpoint may name as ``_target_`` (the model, its backbone,
#: optimizer and DataModule); METALEARN_TRUSTED_TARGETS adds comma-separated prefixes.
TRUSTED_TARGETS = ("metalearn.", "torch.optim.")


def _targets(value: Any) -> list[str]:
    """Every ``_target_`` / ``target`` string anywhere in a checkpoint's records."""
    if isinstance(value, Mapping):
        found = [str(v) for k, v in value.items() if k in ("_target_", "target", "model_target")]
        return found + [t for k, v in value.items() if k != "state_dict" for t in _targets(v)]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _targets(item)]
    return []


def check_trusted_targets(checkpoint: Mapping[str, Any], path: str | Path) -> None:
    """Refuse a checkpoint that names a class outside :data:`TRUSTED_TARGETS`.

    Loading a checkpoint instantiates the classes its hyperparameters name; with
    ``weights_only=True`` the tensors are safe but a ``_target_`` such as
    ``builtins.exec`` would still run. Trust another package with
    ``METALEARN_TRUSTED_TARGETS=mypackage.`` (comma-separated module prefixes).
    """
    extra = os.environ.get("METALEARN_TRUSTED_TARGETS", "")
    trusted = TRUSTED_TARGETS + tuple(p.strip() for p in extra.split(",") if p.strip())
    for target in _targets(checkpoint):
        if not target.startswith(trusted):
            raise ConfigError(
                f"{path} names {target}, which is not a metalearn class; if you trust this "
                f"checkpoint, allow it with METALEARN_TRUSTED_TARGETS={target.rsplit('.', 1)[0]}."
            )


def upgrade_hyper_parameters(hyper_parameters: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's model hyperparameters in today's form.

    Checkpoints written before ``model.batch_stats`` became the one normalization setting
    carry ``backbone.norm``: ``"running"`` becomes ``batch_stats="running"``, ``"batch"``
    is dropped (the grouping was already in ``batch_stats``).
    """
    upgraded = dict(hyper_parameters)
    backbone = dict(upgraded["backbone"])
    norm = backbone.pop("norm", None)
    if norm == "running":
        upgraded["batch_stats"] = "running"
    upgraded["backbone"] = backbone
    return upgraded


def load_representation(checkpoint_path: str | Path) -> Representation:
    """The trained representation h_λ of a checkpoint, as a plain ``torch.nn.Module``.

    The module's ``forward(images, support=None)`` maps (M, C, H, W) float images to
    (M, d) features: for Omniglot (M, 1, 28, 28) images preprocessed as
    :func:`metalearn.data.load_omniglot_image` does (ink = 1, background = 0) to (M, 256).
    ``support`` holds the episode's support images, normalized as the model was trained
    (its ``batch_stats``, see :class:`~metalearn.models.Representation`):

    * inductive checkpoints (``support``, ``running``): a query embedded alone gets the same
      features as in a batch with the same ``support``, so one image at a time is fine;
    * transductive checkpoints (``episode``, ``split``, ``meta_batch``): an image's features
      depend on the other images of the call (BatchNorm uses their statistics); a query
      embedded alone does *not* get the features it gets in its episode, so embed a whole
      episode at once.

    Returned in ``eval()`` mode on the CPU, in the checkpoint's floating dtype;
    ``.protocol`` says which of the two it is.

    Example:
        >>> net = load_representation("logs/train/runs/.../checkpoints/last.ckpt")
        >>> support = torch.stack([load_omniglot_image(p) for p in support_paths])
        >>> features = net(load_omniglot_image(query_path)[None], support=support)
    """
    checkpoint = read_checkpoint(checkpoint_path)
    hyper_parameters = checkpoint["hyper_parameters"]
    batch_stats = hyper_parameters.get("batch_stats", "episode")
    net = build_backbone(hyper_parameters["backbone"], batch_stats)
    prefix = "backbone."
    state = {
        key[len(prefix) :]: value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(prefix)
    }
    dtypes = [value.dtype for value in state.values() if value.is_floating_point()]
    net.to(dtypes[0] if dtypes else torch.float32).load_state_dict(state)
    return Representation(net, batch_stats).eval()


#: Model settings that change the parameters' shapes or meaning: a checkpoint whose values
#: differ cannot be resumed with the current config.
#: Hydra's instantiation keys: how a config is built, not a setting of the run.
HYDRA_KEYS = ("_target_", "_recursive_", "_convert_", "_partial_")

STRUCTURAL_KEYS = ("backbone", "learn_inner_lr", "inner_lr_param")


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def config_differences(
    trained: Mapping[str, Any],
    current: Mapping[str, Any],
    keys: Sequence[str],
    group: str = "model",
) -> list[str]:
    """``"model.key: checkpoint A, config B"`` for every differing leaf under ``keys``."""
    differences = []
    for key in keys:
        old = _flatten(trained.get(key), f"{group}.{key}")
        new = _flatten(current.get(key), f"{group}.{key}")
        for leaf in sorted(set(old) | set(new)):
            if old.get(leaf) != new.get(leaf):
                differences.append(
                    f"{leaf}: checkpoint {old.get(leaf)!r}, config {new.get(leaf)!r}"
                )
    return differences


#: Modules that held the learners before each got its own file; checkpoints written then
#: name them (``metalearn.lightning.module.HyperRepresentation``).
_LEGACY_LEARNER_MODULES = ("metalearn.lightning.module.", "metalearn.lightning.baselines.")


def learner_class(checkpoint: Mapping[str, Any]) -> type:
    """The LightningModule class a checkpoint was trained with (``model_target``; the
    hyper-representation for checkpoints that predate it)."""
    target = str(checkpoint.get("model_target", "metalearn.lightning.HyperRepresentation"))
    if target.startswith(_LEGACY_LEARNER_MODULES):
        target = "metalearn.lightning." + target.rsplit(".", 1)[1]
    return hydra.utils.get_class(target)


def learner_defaults(cls: type) -> dict[str, Any]:
    """The constructor defaults of a learner class and of its bases: the value of every
    setting a config, or a checkpoint written before the setting existed, leaves out."""
    defaults: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for name, parameter in inspect.signature(init).parameters.items():
            if parameter.default is not inspect.Parameter.empty:
                defaults[name] = parameter.default
    return defaults


def _trained_and_configured(
    checkpoint: Mapping[str, Any], model_config: Mapping[str, Any]
) -> tuple[type, type, dict[str, Any], dict[str, Any]]:
    """The checkpoint's and the config's learner classes and settings, each completed with
    its class's defaults."""
    trained_class = learner_class(checkpoint)
    target = model_config.get("_target_")
    configured_class = trained_class if target is None else _class_of(target)
    trained = {**learner_defaults(trained_class), **checkpoint["hyper_parameters"]}
    configured = dict(model_config)
    if isinstance(configured_class, type):
        configured = {**learner_defaults(configured_class), **configured}
    return trained_class, configured_class, trained, configured


def check_resumable(checkpoint: Mapping[str, Any], model_config: Mapping[str, Any]) -> list[str]:
    """Raise :class:`ConfigError` when the checkpoint's model differs structurally from
    ``model_config``; return the other differences (worth a warning)."""
    trained_class, configured_class, trained, configured = _trained_and_configured(
        checkpoint, model_config
    )
    if configured_class is not trained_class:
        raise ConfigError(
            f"the checkpoint holds a {trained_class.__name__}, the config a "
            f"{model_config['_target_']}: "
            f"choose the model (or algorithm) the checkpoint was trained with"
        )
    structural = config_differences(trained, configured, STRUCTURAL_KEYS)
    stats = (trained.get("batch_stats"), configured.get("batch_stats"))
    if stats[0] != stats[1] and "running" in stats:  # running averages are buffers
        structural.append(f"model.batch_stats: checkpoint {stats[0]!r}, config {stats[1]!r}")
    if structural:
        raise ConfigError(
            "the checkpoint was trained with a different model config: " + "; ".join(structural)
        )
    others = [k for k in trained if k not in STRUCTURAL_KEYS and k in configured]
    return config_differences(trained, configured, others)


#: Data settings of the machine, not of the run: never compared when resuming.
LOCAL_DATA_KEYS = (
    "data_dir",
    "cache_dir",
    "split_dir",
    "download",
    "num_workers",
    "device_sampling",
)


def datamodule_target(checkpoint: Mapping[str, Any]) -> str | None:
    """The DataModule class that trained the checkpoint (its saved state), if recorded."""
    return next(
        (v["target"] for v in checkpoint.values() if isinstance(v, dict) and "target" in v), None
    )


def _class_of(target: Any) -> Any:
    try:
        return hydra.utils.get_object(str(target))
    except Exception:
        return target


def run_differences(
    checkpoint: Mapping[str, Any], model_config: Mapping[str, Any], data_config: Mapping[str, Any]
) -> list[str]:
    """Every model and data setting in which the run that wrote ``checkpoint`` differs
    from the given (resolved) ``model`` and ``data`` configs, as
    ``"data.shots: checkpoint 1, config 5"``; machine paths are not compared."""
    trained_class, configured_class, trained, configured = _trained_and_configured(
        checkpoint, model_config
    )
    differences = []
    if configured_class is not trained_class:
        differences.append(
            f"model: checkpoint {trained_class.__name__}, config {model_config['_target_']}"
        )
    model_keys = sorted({*trained, *configured} - set(HYDRA_KEYS))
    differences += config_differences(trained, configured, model_keys, "model")
    data_target = datamodule_target(checkpoint)
    configured = data_config.get("_target_", data_target)
    if data_target is not None and _class_of(data_target) is not _class_of(configured):
        differences.append(f"data: checkpoint {data_target}, config {data_config.get('_target_')}")
    data_trained = checkpoint.get("datamodule_hyper_parameters") or {}
    data_keys = sorted({*data_trained, *data_config} - {"_target_", *LOCAL_DATA_KEYS})
    if data_trained:
        differences += config_differences(data_trained, data_config, data_keys, "data")
    return differences


def find_last_checkpoint(
    output_dir: str | Path,
    runs_dir: str | Path,
    differences: Callable[[Mapping[str, Any]], list[str]] | None = None,
) -> Path:
    """Resolve ``ckpt_path=last``: this run folder's ``checkpoints/last.ckpt`` when it
    exists, else the newest ``*/checkpoints/last.ckpt`` under ``runs_dir`` whose run has
    the same settings (``differences(checkpoint)`` empty).

    Raises:
        ConfigError: no run to resume, or none with these settings (naming the newest run
            and how its settings differ).
    """
    own = Path(output_dir) / "checkpoints" / "last.ckpt"
    if own.is_file():
        return own
    found = sorted(Path(runs_dir).glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ConfigError(
            f"ckpt_path=last: no checkpoints/last.ckpt in {output_dir} or under {runs_dir}; "
            f"give the checkpoint's path instead"
        )
    if differences is None:
        return found[-1]
    newest: list[str] | None = None
    for path in reversed(found):
        try:
            differing = differences(read_checkpoint(path))
        except ConfigError:
            continue  # unreadable: not a run to resume
        if not differing:
            return path
        newest = newest if newest is not None else differing
    shown = "; ".join((newest or ["unreadable checkpoint"])[:3])
    more = f" (and {len(newest) - 3} more)" if newest and len(newest) > 3 else ""
    raise ConfigError(
        f"ckpt_path=last: no run under {runs_dir} has these settings; the newest, "
        f"{found[-1].parent.parent.name}, differs in {shown}{more}; continue a run with "
        f"hydra.run.dir=<its folder> ckpt_path=last, or start a new one without ckpt_path"
    )
