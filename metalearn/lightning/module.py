"""LightningModule of the hyper-representation model (Franceschi et al. 2018, Sec. 3.2)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.data.episodes import EpisodeBatch
from metalearn.errors import ConfigError
from metalearn.lightning.episodic import BatchStats, EpisodicModule, Nonfinite, plain

__all__ = ["HyperRepresentation"]


class HyperRepresentation(EpisodicModule):
    """Bilevel meta-learning of a representation with per-episode linear heads.

    Outer variables: the backbone h_λ and, optionally, the inner learning rate η.
    Inner variables: one linear softmax head per episode, started at zero and trained by
    ``inner_steps`` steps of gradient descent on the support set
    (:func:`metalearn.bilevel.fit_linear_heads`). Outer objective: mean query
    cross-entropy over the meta-batch; its ``.backward()`` is the exact reverse-mode
    hypergradient of the T-step problem.

    Args:
        backbone: Hydra config (``_target_``) of the representation network.
        inner_steps: T in training.
        eval_inner_steps: T for validation and test (``None``: same as ``inner_steps``).
        inner_lr: initial inner learning rate η (> 0).
        learn_inner_lr: make η an outer variable (kept positive, see ``inner_lr_param``).
        inner_lr_param: ``"exp"`` (η = exp(ρ)) or ``"softplus"`` (η = log(1 + exp(ρ))).
        l2: L2 penalty of the inner problem on the head weights.
        truncate: backpropagate through the last ``truncate`` inner steps only.
        first_order: drop second-order terms of the hypergradient.
        batch_stats: grouping of BatchNorm statistics, see :data:`BatchStats`.
        optimizer: Hydra config of the outer optimizer, ``_partial_: true`` (params bound here).
        lr_decay: inverse-time decay of the outer learning rate per step (0: constant).
        nonfinite: what to do when the outer loss is inf or NaN (a diverging inner loop):
            ``"raise"`` stops training with a message naming the step and the inner lr;
            ``"skip"`` skips that meta-batch's update (never trains on NaN).
        center_features: subtract the mean of each episode's support features from its
            support and query features before the inner solve (part of the representation;
            uses the support set only). ReLU features are all positive, and their common
            mean direction otherwise dominates the curvature of the inner problem.
        compile: ``torch.compile`` the meta-step (see
            :class:`~metalearn.lightning.episodic.EpisodicModule`).
    """

    def __init__(
        self,
        backbone: Mapping[str, Any],
        inner_steps: int = 5,
        eval_inner_steps: int | None = None,
        inner_lr: float = 0.1,
        learn_inner_lr: bool = True,
        inner_lr_param: Literal["exp", "softplus"] = "exp",
        l2: float = 0.0,
        truncate: int | None = None,
        first_order: bool = False,
        batch_stats: BatchStats = "episode",
        optimizer: Mapping[str, Any] | None = None,
        lr_decay: float = 1e-5,
        nonfinite: Nonfinite = "raise",
        center_features: bool = False,
        compile: bool | str = False,
    ) -> None:
        super().__init__(backbone, batch_stats, optimizer, lr_decay, nonfinite, compile)
        self.save_hyperparameters(
            {
                "backbone": plain(backbone),
                "inner_steps": inner_steps,
                "eval_inner_steps": eval_inner_steps,
                "inner_lr": inner_lr,
                "learn_inner_lr": learn_inner_lr,
                "inner_lr_param": inner_lr_param,
                "l2": l2,
                "truncate": truncate,
                "first_order": first_order,
                "batch_stats": batch_stats,
                "optimizer": self.optimizer_config,
                "lr_decay": lr_decay,
                "nonfinite": nonfinite,
                "center_features": center_features,
                "compile": compile,
            }
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
        self.inner_steps, self.eval_inner_steps = inner_steps, eval_inner_steps
        self.inner_lr_param, self.l2, self.truncate = inner_lr_param, l2, truncate
        self.first_order, self.center_features = first_order, center_features
        raw = math.log(inner_lr) if inner_lr_param == "exp" else math.log(math.expm1(inner_lr))
        self.inner_lr_raw = nn.Parameter(torch.tensor(raw), requires_grad=learn_inner_lr)

    @property
    def inner_lr(self) -> Tensor:
        """The inner learning rate η as a positive 0-d tensor (differentiable)."""
        if self.inner_lr_param == "exp":
            return self.inner_lr_raw.exp()
        return F.softplus(self.inner_lr_raw)

    @property
    def eval_steps(self) -> int:
        return self.inner_steps if self.eval_inner_steps is None else self.eval_inner_steps

    def episode_logits(
        self, batch: EpisodeBatch, steps: int, per_step: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Query logits (B, NQ, N) of the heads after ``steps`` inner steps, and the query
        accuracy after t = 0..steps steps (B, steps + 1) when ``per_step``."""
        return self.linear_head_logits(
            batch,
            steps,
            per_step,
            self.inner_lr,
            center_features=self.center_features,
            l2=self.l2,
            truncate=self.truncate,
            first_order=self.first_order,
        )

    def divergence_advice(self) -> str:
        return (
            f"with inner lr {self.inner_lr.item():.4g} the inner loop diverges; lower "
            f"model.inner_lr (or the outer learning rate)"
        )

    def training_step(self, batch: EpisodeBatch, batch_idx: int) -> Tensor:
        loss, accuracy, _ = self.episode_forward(batch, self.inner_steps)
        loss = loss.mean()
        if not self.check_finite(loss, batch):
            return loss  # every rank runs backward; the update is skipped
        self.log_train(loss, accuracy)
        self.log("train/inner_lr", self.inner_lr.detach(), batch_size=len(accuracy))
        return loss
