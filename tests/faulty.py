"""A test-only learner whose training loss is NaN at chosen steps (on chosen ranks)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from metalearn.data.episodes import EpisodeBatch
from metalearn.lightning import HyperRepresentation


class NaNAtSteps(HyperRepresentation):
    """:class:`HyperRepresentation` with a NaN query loss at the global steps ``nan_steps``
    of training, on rank ``nan_rank`` only (None: every rank)."""

    def __init__(
        self, nan_steps: list[int] | None = None, nan_rank: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.nan_steps, self.nan_rank = list(nan_steps or []), nan_rank

    def episode_forward(
        self, batch: EpisodeBatch, steps: int, per_step: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        loss, accuracy, curve = super().episode_forward(batch, steps, per_step)
        hit = self.training and self.global_step in self.nan_steps
        if hit and self.nan_rank in (None, self.global_rank):
            loss = loss * float("nan")
        return loss, accuracy, curve
