"""What the learners with an inner loop share: T, the inner learning rate, the head's start."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.errors import ConfigError
from metalearn.lightning.episodic import BatchStats, EpisodeChunk, EpisodicModule, Nonfinite

__all__ = ["HEAD_INITS", "HeadInit", "InnerLoopLearner", "feature_dim"]

#: Where the linear head starts every episode: ``"zero"`` (the hyper-representation: a
#: zero head, not learned, any number of ways) or ``"learned"`` (ANIL, MAML: an outer
#: variable started at zero, which fixes the number of ways).
HeadInit = Literal["zero", "learned"]
HEAD_INITS = ("zero", "learned")


def feature_dim(backbone: nn.Module) -> int:
    """The backbone's ``feature_dim`` (d), which a linear head needs."""
    dim = getattr(backbone, "feature_dim", None)
    if not isinstance(dim, int):
        raise ConfigError(
            f"{type(backbone).__name__} has no integer `feature_dim`; the linear head needs it"
        )
    return dim


class InnerLoopLearner(EpisodicModule):
    """Base of the hyper-representation, ANIL and MAML: an inner loop of ``inner_steps``
    steps (``eval_inner_steps`` at validation and test) with a positive inner learning rate,
    from a zero or a learned linear head.

    The inner learning rate is ``η = exp(inner_lr_raw)`` (``inner_lr_param="exp"``) or
    ``softplus(inner_lr_raw)``; an outer variable when ``learn_inner_lr``. With
    ``head_init="learned"`` the head's start ``(head_weight (d, N), head_bias (N,))`` is an
    outer variable started at zero, for N = ``ways`` in training and evaluation.

    Args:
        backbone, batch_stats, optimizer, lr_decay, nonfinite, compile, episode_chunk: see
            :class:`~metalearn.lightning.episodic.EpisodicModule`.
        inner_steps: T in training.
        eval_inner_steps: T for validation and test (``None``: same as ``inner_steps``).
        inner_lr: initial inner learning rate η (> 0).
        learn_inner_lr: make η an outer variable.
        inner_lr_param: ``"exp"`` or ``"softplus"``: how η is kept positive.
        head_init: see :data:`HeadInit`.
        ways: N of a learned head (ignored with ``head_init="zero"``).
    """

    def __init__(
        self,
        backbone: Mapping[str, Any],
        inner_steps: int,
        eval_inner_steps: int | None,
        inner_lr: float,
        learn_inner_lr: bool,
        inner_lr_param: Literal["exp", "softplus"],
        head_init: HeadInit,
        ways: int | None,
        batch_stats: BatchStats,
        optimizer: Mapping[str, Any] | None,
        lr_decay: float,
        nonfinite: Nonfinite,
        compile: bool | str,
        episode_chunk: EpisodeChunk = "auto",
    ) -> None:
        super().__init__(
            backbone, batch_stats, optimizer, lr_decay, nonfinite, compile, episode_chunk
        )
        if inner_steps < 1 or (eval_inner_steps is not None and eval_inner_steps < 1):
            raise ConfigError(
                f"model.inner_steps and model.eval_inner_steps must be >= 1, got "
                f"{inner_steps} and {eval_inner_steps}"
            )
        if not inner_lr > 0:
            raise ConfigError(f"model.inner_lr must be > 0, got {inner_lr}")
        if inner_lr_param not in ("exp", "softplus"):
            raise ConfigError(
                f"model.inner_lr_param must be 'exp' or 'softplus', got {inner_lr_param!r}"
            )
        if head_init not in HEAD_INITS:
            raise ConfigError(f"model.head_init must be 'learned' or 'zero', got {head_init!r}")
        if head_init == "learned" and (ways is None or ways < 2):
            raise ConfigError(f"model.ways must be >= 2 with a learned head, got {ways}")
        if ways is None:  # a zero head fits any number of ways; data.ways is the episodes'
            self.amend_hparams(drop=["ways"])
        self.inner_steps, self.eval_inner_steps = inner_steps, eval_inner_steps
        self.inner_lr_param, self.head_init = inner_lr_param, head_init
        raw = math.log(inner_lr) if inner_lr_param == "exp" else math.log(math.expm1(inner_lr))
        self.inner_lr_raw = nn.Parameter(torch.tensor(raw), requires_grad=learn_inner_lr)
        self.head_weight: nn.Parameter | None
        self.head_bias: nn.Parameter | None
        if head_init == "learned":
            assert ways is not None
            self.head_weight = nn.Parameter(torch.zeros(feature_dim(self.backbone), ways))
            self.head_bias = nn.Parameter(torch.zeros(ways))
        else:
            self.register_parameter("head_weight", None)
            self.register_parameter("head_bias", None)

    @property
    def inner_lr(self) -> Tensor:
        """The inner learning rate η as a positive 0-d tensor (differentiable)."""
        if self.inner_lr_param == "exp":
            return self.inner_lr_raw.exp()
        return F.softplus(self.inner_lr_raw)

    @property
    def eval_steps(self) -> int:
        return self.inner_steps if self.eval_inner_steps is None else self.eval_inner_steps

    def initial_head(self, ways: int) -> tuple[Tensor, Tensor]:
        """The head's start ``(weight (d, N), bias (N,))`` for N-way episodes."""
        if self.head_weight is None or self.head_bias is None:
            zeros = self.inner_lr_raw.new_zeros
            return zeros(feature_dim(self.backbone), ways), zeros(ways)
        if self.head_weight.shape[1] != ways:
            raise ConfigError(
                f"the learned head initialization has {self.head_weight.shape[1]} classes "
                f"(model.ways) but the episodes have {ways} ways; train with "
                f"model.ways={ways}, or use model.head_init=zero (any number of ways)"
            )
        return self.head_weight, self.head_bias

    def divergence_advice(self) -> str:
        return (
            f"with inner lr {self.inner_lr.item():.4g} the inner loop diverges; lower "
            f"model.inner_lr (or the outer learning rate)"
        )

    def log_train(self, loss: Tensor, accuracy: Tensor) -> None:
        """Also log ``train/inner_lr``."""
        super().log_train(loss, accuracy)
        self.log("train/inner_lr", self.inner_lr.detach(), batch_size=len(accuracy))
