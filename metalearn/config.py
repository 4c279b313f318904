"""Typed configuration: every setting checked before anything runs.

Hydra accepts any value for any key, so a wrong type used to surface late (a crash inside
torch) or never (``disjoint=no`` is a non-empty string, so true). The types are declared
once, where each setting is consumed:

* a group with a ``_target_`` (``data``, ``model``, ``model.backbone``, ``trainer``,
  callbacks, loggers, ...) takes the types of its target's constructor signature, so a
  new setting of a metalearn class is typed by adding it to ``__init__``;
* the top-level keys of ``train.yaml`` and ``eval.yaml`` and the ``extras`` group are
  declared by the dataclasses below (:class:`TrainSettings`, :class:`EvalSettings`,
  :class:`ExtrasSettings`).

:func:`check_config` walks a composed config and raises :class:`ConfigError` with one line
naming the key, the value and what is expected. Booleans are ``true`` / ``false`` only;
an integer is accepted where a float is expected, never the reverse.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import hydra.utils
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from metalearn.errors import ConfigError
from metalearn.models.normalization import BATCH_STATS, BatchStats

__all__ = [
    "instantiate_group",
    "TrainSettings",
    "EvalSettings",
    "ExtrasSettings",
    "check_config",
    "check_settings",
    "check_target",
    "check_value",
    "EVAL_DATA",
    "register_configs",
    "settings_of",
]

#: What each value of a choice means, shown next to it in errors.
_LABELS: dict[Any, Mapping[str, str]] = {BatchStats: BATCH_STATS}


@dataclasses.dataclass
class ExtrasSettings:
    """``extras``: what the entry points do besides the run itself."""

    print_config: bool = True
    keep_host_memory: bool = True


@dataclasses.dataclass
class TrainSettings:
    """Top-level keys of ``conf/train.yaml`` (besides the config groups)."""

    task_name: str = "train"
    tags: list[str] = dataclasses.field(default_factory=list)
    seed: int | None = 0
    train: bool = True
    test: bool = True
    ckpt_path: str | None = None
    output_file: str = "eval.json"
    runner: Mapping[str, Any] | None = None
    hpo: Mapping[str, Any] | None = None


@dataclasses.dataclass
class EvalSettings:
    """Top-level keys of ``conf/eval.yaml`` (besides the config groups)."""

    task_name: str = "eval"
    tags: list[str] = dataclasses.field(default_factory=list)
    seed: int | None = 0
    ckpt_path: str = ""
    ways: int | list[int] | None = None
    shots: int | list[int] | None = None
    query_shots: int | None = None
    split: str | None = None
    disjoint: bool | None = None
    inner_steps: int | list[int] | None = None
    batch_stats: BatchStats | None = None
    compile: bool | str = False
    episodes: int = 600
    output_file: str = "eval.json"


#: evaluate.py's ``data`` group: this machine's data paths, given to the checkpoint's
#: DataModule where its class takes them. Every other ``data.KEY=VALUE`` given to
#: evaluate.py (``data.eval_seed=1``, ``data.images_per_class=300``) overrides the data
#: settings saved in the checkpoint. Not a struct: any key may be set without ``+``.
EVAL_DATA: dict[str, Any] = {
    "data_dir": "${paths.data_dir}",
    "cache_dir": "${paths.cache_dir}",
    "split_dir": "${paths.data_dir}/omniglot/splits/vinyals",
    "download": True,
    "num_workers": 0,
}


def register_configs() -> None:
    """Add metalearn's Python-defined config nodes to Hydra's ConfigStore (the entry
    points call this before Hydra composes): ``eval_data``, evaluate.py's ``data``."""
    node = OmegaConf.create(EVAL_DATA)
    OmegaConf.set_struct(node, False)
    ConfigStore.instance().store(name="eval_data", node=node, package="data")


#: Keys Hydra's instantiate reads itself.
_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


def _describe(annotation: Any) -> str:
    """``true or false``, ``an integer or null``, ``one of a, b``: what a type accepts."""
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return "an integer"
    if annotation is float:
        return "a number"
    if annotation in (str, Path):
        return "a string"
    if annotation is type(None):
        return "null"
    if origin is Literal:
        labels = _LABELS.get(annotation, {})
        return "one of " + ", ".join(
            f"{v} ({labels[v]})" if v in labels else str(v) for v in typing.get_args(annotation)
        )
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation) if not _foreign(a))
    if origin in (list, tuple, Sequence) or annotation in (list, tuple):
        args = typing.get_args(annotation)
        return f"a list (each item {_describe(args[0])})" if args else "a list"
    if origin in (dict, Mapping) or annotation in (dict, Mapping):
        return "a mapping"
    return getattr(annotation, "__name__", str(annotation))


def _foreign(annotation: Any) -> bool:
    """A class this module does not check (``torch.Tensor``, ``Accelerator``)."""
    return (
        inspect.isclass(annotation)
        and annotation not in (bool, int, float, str, Path, type(None), list, tuple, dict, object)
        and typing.get_origin(annotation) is None
    )


def _matches(value: Any, annotation: Any) -> bool:
    """Whether ``value`` (plain containers) is of type ``annotation``; forms this does not
    know (classes of other libraries, type variables) accept any value."""
    if annotation is Any or annotation is inspect.Parameter.empty or annotation is object:
        return True
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation is Path or annotation is type(None) or annotation is None:
        return isinstance(value, str) if annotation is Path else value is None
    if origin is Literal:
        return any(
            value == option and type(value) is type(option)
            for option in typing.get_args(annotation)
        )
    if origin in (Union, types.UnionType):
        # In a union, a class of another library (``float | Tensor``) takes no YAML scalar.
        options = typing.get_args(annotation)
        scalar = value is None or isinstance(value, (bool, int, float, str))
        return any(_matches(value, a) for a in options if not (scalar and _foreign(a)))
    if origin in (list, tuple, Sequence) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        if origin is tuple and len(args) > 1:
            return len(value) == len(args) and all(map(_matches, value, args))
        return not args or all(_matches(item, args[0]) for item in value)
    if origin in (dict, Mapping) or annotation in (dict, Mapping):
        return isinstance(value, Mapping)
    return True


def check_value(key: str, value: Any, annotation: Any) -> None:
    """Raise :class:`ConfigError` unless ``value`` is of type ``annotation``."""
    if isinstance(value, Mapping) and "_target_" in value:
        check_target(key, value)
        return
    if not _matches(value, annotation):
        shown = "null" if value is None else repr(value) if isinstance(value, str) else value
        raise ConfigError(f"{key}={shown}: expected {_describe(annotation)}")


def _type_of_default(default: Any) -> Any:
    """The type a setting without a readable annotation takes, from its default: a flag
    stays a flag, a number a number (an integer default also takes floats)."""
    if isinstance(default, bool):
        return bool
    if isinstance(default, (int, float)):
        return float
    return Any


def _parameters(target: Any) -> tuple[dict[str, Any], bool]:
    """Name -> type of the settings a class or function takes, following ``**kwargs``
    up the class hierarchy; and whether it takes any other keyword too."""
    functions = (
        [cls.__dict__["__init__"] for cls in target.__mro__ if "__init__" in cls.__dict__]
        if inspect.isclass(target)
        else [target]
    )
    found: dict[str, Any] = {}
    for function in functions:
        try:
            signature = inspect.signature(function)
        except (TypeError, ValueError):
            return found, True
        try:
            hints = typing.get_type_hints(function)
        except Exception:  # annotations that do not resolve here: names only
            hints = {}
        var_keyword = False
        for name, parameter in signature.parameters.items():
            if parameter.kind is parameter.VAR_KEYWORD:
                var_keyword = True
            elif name != "self" and parameter.kind is not parameter.VAR_POSITIONAL:
                found.setdefault(name, hints.get(name, _type_of_default(parameter.default)))
        if not var_keyword:
            return found, False
        if function is object.__init__:
            break
    return found, True


def settings_of(target: str) -> set[str]:
    """The settings a ``_target_`` takes (the parameter names of its constructor)."""
    return set(_parameters(hydra.utils.get_object(target))[0])


def check_target(key: str, node: Mapping[str, Any]) -> None:
    """Check the settings of a ``_target_`` group against its target's signature."""
    target_name = node["_target_"]
    try:
        target = hydra.utils.get_object(str(target_name))
    except Exception:
        raise ConfigError(
            f"{key}._target_={target_name}: cannot be imported; check the spelling"
        ) from None
    parameters, open_ended = _parameters(target)
    for name, value in node.items():
        if name in _HYDRA_KEYS:
            continue
        where = f"{key}.{name}"
        if name not in parameters:
            if open_ended:
                continue
            raise ConfigError(
                f"{where} is not a setting of {target_name}; its settings are "
                + ", ".join(sorted(parameters))
            )
        check_value(where, value, parameters[name])
    for name, value in node.items():
        if name not in _HYDRA_KEYS and isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, Mapping) and "_target_" in item:
                    check_target(f"{key}.{name}[{index}]", item)


def check_settings(values: Mapping[str, Any], schema: type, prefix: str = "") -> None:
    """Check the keys of ``values`` that ``schema`` (a dataclass) declares."""
    hints = typing.get_type_hints(schema)
    for field in dataclasses.fields(schema):
        if field.name in values:
            check_value(prefix + field.name, values[field.name], hints[field.name])


def _check_trainer(trainer: Mapping[str, Any]) -> None:
    """Trainer settings that are well typed but impossible for episodic training."""
    interval = trainer.get("val_check_interval")
    if interval is not None and not (
        (isinstance(interval, int) and interval >= 1)
        or (isinstance(interval, float) and 0.0 < interval <= 1.0)
    ):
        raise ConfigError(
            f"trainer.val_check_interval={interval}: give the outer steps between validations "
            f"(an integer >= 1)"
        )
    accumulate = trainer.get("accumulate_grad_batches", 1)
    if accumulate != 1:
        raise ConfigError(
            f"trainer.accumulate_grad_batches={accumulate}: not supported (every batch is a "
            f"meta-batch of episodes); raise data.meta_batch instead"
        )


def check_config(cfg: DictConfig | Mapping[str, Any], schema: type) -> None:
    """Check a composed train (``schema=TrainSettings``) or evaluation
    (``EvalSettings``) config: its top-level keys, ``extras``, and every group with a
    ``_target_`` (data, model, trainer, callbacks, logger).

    Raises:
        ConfigError: the first wrong setting, as ``key=value: expected ...``.
    """
    plain: dict[str, Any]
    if isinstance(cfg, DictConfig):
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(
                f"{missing[0]} has no value (??? in the config): set it as {missing[0]}=..."
            )
        try:
            plain = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
        except Exception as err:
            raise ConfigError(f"cannot resolve the config: {err}".replace("\n", " ")) from None
    else:
        plain = dict(cfg)
    check_settings(plain, schema)
    if isinstance(plain.get("extras"), Mapping):
        check_settings(plain["extras"], ExtrasSettings, "extras.")
    if plain.get("runner"):
        return  # hyperparameter-optimization runs read only their `hpo` settings
    for group in ("data", "model", "trainer"):
        node = plain.get(group)
        if isinstance(node, Mapping) and "_target_" in node:
            check_target(group, node)
    for group in ("callbacks", "logger"):
        for name, node in (plain.get(group) or {}).items():
            if isinstance(node, Mapping) and "_target_" in node:
                check_target(f"{group}.{name}", node)
    if isinstance(plain.get("trainer"), Mapping):
        _check_trainer(plain["trainer"])


def instantiate_group(group: Mapping[str, Any] | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a callbacks / logger group, dropping None."""
    if not group:
        return []
    objects = (
        hydra.utils.instantiate(conf) for conf in group.values() if conf and "_target_" in conf
    )
    return [obj for obj in objects if obj is not None]
