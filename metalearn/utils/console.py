"""Console output: the composed config as a tree, and one-line errors for users."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from metalearn.errors import MetalearnError

__all__ = ["print_config_tree", "exit_on_user_error", "user_error", "check_group_choices"]

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
    """The :class:`MetalearnError` behind ``err`` (Hydra's instantiate wraps exceptions)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, MetalearnError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


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
            print(f"error: {cause}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper


#: Config groups provided by Hydra or its plugins rather than by files under conf/.
_BUILTIN_CHOICES = {"hydra/launcher": {"basic", "submitit_local", "submitit_slurm"}}


def check_group_choices(
    conf_dir: str | Path, overrides: list[str], fixed: dict[str, str] | None = None
) -> None:
    """Exit with one line listing the choices when a command-line override names an
    unknown option of a config group (``experiment=foo``, ``data=bar``, ``model=...``).

    Hydra's own message for this is several lines of its internals; this check runs
    before Hydra composes anything. Sweeps (``experiment=a,b``) are checked value by value;
    ``null`` and sweep functions (``choice(...)``) are left to Hydra. ``fixed`` maps the
    groups this entry point does not let a user choose to the message that says why.
    """
    root = Path(conf_dir)
    for override in overrides:
        if "=" not in override or override.startswith(("~", "-")):
            continue
        key, value = override.split("=", 1)
        group = key.lstrip("+")
        if fixed and group in fixed:
            print(f"error: {group}={value}: {fixed[group]}", file=sys.stderr)
            raise SystemExit(2)
        folder = root / group
        known = {p.stem for p in folder.glob("*.yaml")} | _BUILTIN_CHOICES.get(group, set())
        if not folder.is_dir() or "(" in value:
            continue
        for choice in value.split(","):
            if choice and choice != "null" and choice not in known:
                print(
                    f"error: unknown {group} '{choice}'; available: {', '.join(sorted(known))}",
                    file=sys.stderr,
                )
                raise SystemExit(2)
