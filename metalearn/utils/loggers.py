"""Logger factories; wandb never needs the network or an account to run."""

from __future__ import annotations

import netrc
import os
import warnings
from collections.abc import Sequence
from typing import Any

__all__ = ["wandb_credentials_available", "resolve_wandb_mode", "wandb_logger"]


def wandb_credentials_available() -> bool:
    """True when a wandb API key is set in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
        hosts = netrc.netrc(path).hosts
    except (OSError, netrc.NetrcParseError):
        return False
    return any("wandb" in host for host in hosts)


def resolve_wandb_mode(mode: str | None) -> str:
    """The wandb mode to use: ``mode`` if given, else WANDB_MODE, else online with
    credentials and offline without."""
    if mode:
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if wandb_credentials_available() else "offline"


def wandb_logger(
    project: str = "metalearn",
    entity: str | None = None,
    group: str | None = None,
    name: str | None = None,
    tags: Sequence[str] | None = None,
    save_dir: str = ".",
    mode: str | None = None,
    log_model: bool = False,
    **kwargs: Any,
) -> Any:
    """A Lightning ``WandbLogger``, offline when there are no credentials.

    Returns ``None`` (no logger, with a warning) when wandb cannot start, so a broken
    wandb setup never stops training.
    """
    from pytorch_lightning.loggers import WandbLogger

    mode = resolve_wandb_mode(mode)
    os.makedirs(save_dir, exist_ok=True)
    try:
        logger = WandbLogger(
            project=project,
            entity=entity,
            group=group,
            name=name,
            tags=list(tags) if tags else None,
            save_dir=save_dir,
            mode=mode,
            log_model=log_model,
            **kwargs,
        )
        logger.experiment  # noqa: B018  (start the run now, so failures surface here)
    except Exception as err:  # wandb raises many types; none of them may stop training
        warnings.warn(f"wandb could not start ({err}); training continues without it", stacklevel=2)
        return None
    return logger
