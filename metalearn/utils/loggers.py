"""Logger factories; wandb never needs the network or an account to run."""

from __future__ import annotations

import csv
import logging
import netrc
import os
import warnings
from collections.abc import Sequence
from typing import Any

from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning.loggers import CSVLogger as LightningCSVLogger

__all__ = ["CSVLogger", "wandb_credentials_available", "resolve_wandb_mode", "wandb_logger"]

log = logging.getLogger(__name__)


class CSVLogger(LightningCSVLogger):
    """Lightning's ``CSVLogger`` that keeps the history of a resumed run.

    Lightning deletes an existing ``metrics.csv`` when its writer starts, so resuming a run
    in its own folder (``ckpt_path=last``) would lose every metric logged before the
    interruption. When :attr:`resume_step` is set (the pipeline sets it to the
    checkpoint's global step), the rows logged before that step are kept and the resumed
    run appends to them; the rows after it were lost with the interruption and are logged
    again. Without it (a fresh run) the file starts empty, as with Lightning's logger.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Keep the rows of ``metrics.csv`` with ``step`` below this (``None``: keep none).
        self.resume_step: int | None = None

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is not None:
            return self._experiment
        path = os.path.join(self.log_dir, "metrics.csv")
        kept: tuple[list[str], list[dict[str, str]]] | None = None
        if self.resume_step is not None and os.path.isfile(path):
            with open(path, newline="") as handle:
                reader = csv.DictReader(handle)
                rows = [row for row in reader if _step(row) < self.resume_step]
                kept = (list(reader.fieldnames or []), rows)
            # Written beside the file first: the writer below deletes metrics.csv.
            with open(path + ".kept", "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=kept[0])
                writer.writeheader()
                writer.writerows(kept[1])
        experiment = super().experiment
        if kept is not None:
            os.replace(path + ".kept", path)
            experiment.metrics_keys = sorted(kept[0])
        return experiment


def _step(row: dict[str, str]) -> float:
    try:
        return float(row.get("step") or -1)
    except ValueError:
        return -1


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
    init_timeout: float = 10.0,
    **kwargs: Any,
) -> Any:
    """A Lightning ``WandbLogger``, offline when there are no credentials.

    An online run that cannot reach the server gives up after ``init_timeout`` seconds
    (wandb's own default waits 90 s and retries beyond it). Returns ``None`` (no logger,
    with a warning) when wandb cannot start, so a broken wandb setup never stops training.
    """
    import wandb
    from pytorch_lightning.loggers import WandbLogger

    mode = resolve_wandb_mode(mode)
    os.makedirs(save_dir, exist_ok=True)
    if mode == "online":
        log.info(
            "wandb: starting an online run (giving up after %g s: logger.wandb.init_timeout)",
            init_timeout,
        )
        settings = kwargs.pop("settings", None) or wandb.Settings()
        settings.init_timeout = init_timeout
        kwargs["settings"] = settings
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
        limit = f" within logger.wandb.init_timeout={init_timeout:g} s" if mode == "online" else ""
        message = " ".join(str(err).split())
        warnings.warn(
            f"wandb could not start{limit} ({message}); training continues without it",
            stacklevel=2,
        )
        return None
    return logger
