"""Console output: the composed config as a tree, and one-line errors for users."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from metalearn.errors import MetalearnError

__all__ = [
    "print_config_tree",
    "exit_on_user_error",
    "user_error",
    "check_group_choices",
    "check_output_dirs",
]

T = TypeVar("T")

_ORDER = ("data", "model", "callbacks", "logger", "trainer", "paths", "extras")


def print_config_tree(cfg: DictConfig) -> None:
    """Print the resolved config as a rich tree, main groups first."""
    import rich
    import rich.syntax
    import rich.tree

    tree = rich.tree.Tree("CONFIG", guide_style="dim")
    keys = [k for k in _ORDER if k in cfg] + [k for k in cfg if k not in _ORDER]
    for key in keys:
        branch = tree.add(str(key), guide_style="dim")
        value = cfg[key]
        text = (
            OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        )
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)


def user_error(err: BaseException) -> MetalearnError | None:
    """The :class:`MetalearnError` behind ``err``: Hydra's instantiate wraps exceptions,
    and a rank started by ``ddp_spawn`` sends its exception back as the text of its
    traceback, whose last line names the class and the message."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, MetalearnError):
            return seen
        from_rank = _error_of_spawned_rank(seen)
        if from_rank is not None:
            return from_rank
        seen = seen.__cause__ or seen.__context__
    return None


def _error_of_spawned_rank(err: BaseException) -> MetalearnError | None:
    """Rebuild the :class:`MetalearnError` a spawned rank raised (torch's
    ``ProcessRaisedException`` carries only its formatted traceback)."""
    if type(err).__name__ != "ProcessRaisedException":
        return None
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    name, _, message = lines[-1].partition(": ") if lines else ("", "", "")
    module, _, qualname = name.rpartition(".")
    if not module.startswith("metalearn."):
        return None
    cls = getattr(sys.modules.get(module), qualname, None)
    if isinstance(cls, type) and issubclass(cls, MetalearnError):
        return cls(message)
    return None


def _is_launched_rank() -> bool:
    """A process that plain ``ddp`` started by re-running the command on this node: local
    rank 0 prints the error for the node."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0) > 0


def exit_on_user_error(fn: Callable[..., T]) -> Callable[..., T]:
    """Turn a :class:`MetalearnError` into one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            cause = user_error(err)
            if cause is None:
                raise
            if not _is_launched_rank():
                print(f"error: {cause}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper


def check_group_choices(
    conf_dir: str | Path, overrides: list[str], fixed: dict[str, str] | None = None
) -> None:
    """Exit with one line listing the choices when a command-line override names an
    unknown option of a config group (``experiment=foo``, ``data=bar``, ``model=...``).

    The options and the parsing are Hydra's own (its config loader's group listing, its
    override parser); this only turns Hydra's several-line report into one line, before
    Hydra composes anything. Sweeps (``experiment=a,b``, ``choice(a,b)``) are checked value
    by value; ``null``, deletions and other sweep functions are left to Hydra. ``fixed``
    maps the groups this entry point does not let a user choose to the message that says
    why.
    """
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return  # a syntax error: Hydra reports it with its position
    for override in parsed:
        group = override.key_or_group
        if fixed and group in fixed:
            print(f"error: {override.input_line}: {fixed[group]}", file=sys.stderr)
            raise SystemExit(2)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        for override in parsed:
            listed = override.value_type in (ValueType.CHOICE_SWEEP, ValueType.SIMPLE_CHOICE_SWEEP)
            if override.is_delete() or (override.is_sweep_override() and not listed):
                continue
            known = loader.get_group_options(override.key_or_group)
            if not known:
                continue  # not a config group (data.ways=5)
            choices = (
                list(override.sweep_string_iterator())
                if override.is_sweep_override()
                else [override.value()]
            )
            for choice in choices:
                if choice is not None and choice != "null" and choice not in known:
                    print(
                        f"error: unknown {override.key_or_group} '{choice}'; "
                        f"available: {', '.join(sorted(known))}",
                        file=sys.stderr,
                    )
                    raise SystemExit(2)


#: The settings that place a run's folder, checked before Hydra creates it.
_OUTPUT_KEYS = ("hydra.run.dir", "hydra.sweep.dir", "paths.log_dir")


def check_output_dirs(arguments: list[str], default_log_dir: str | Path) -> None:
    """Exit with one line when the run folder cannot be created: ``hydra.run.dir``
    (``hydra.sweep.dir`` with ``-m``) or else ``paths.log_dir`` from the command line, or
    the default log folder, under a file, on a read-only or full device, or otherwise
    impossible.

    Hydra creates the run folder before any of metalearn's code runs and reports a
    failure as a traceback; this creates it first. Values with ``${...}``
    interpolations are left to Hydra.
    """
    multirun = any(argument in ("-m", "--multirun") for argument in arguments)
    given = {}
    for argument in arguments:
        key, sep, value = argument.lstrip("+").partition("=")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]  # a quoted value, as Hydra reads it (plain ddp passes one)
        if sep and key in _OUTPUT_KEYS and value:
            given[key] = value
    run_key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    key = run_key if run_key in given else "paths.log_dir"
    value = given.get(key, str(default_log_dir))
    if "${" in value:
        return
    try:
        Path(value).expanduser().mkdir(parents=True, exist_ok=True)
    except OSError as err:
        reason = err.strerror or str(err)
        where = f" ({err.filename})" if err.filename and str(err.filename) != value else ""
        print(
            f"error: {key}={value}: cannot create this folder for the run: {reason}{where}; "
            f"choose a writable folder",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
