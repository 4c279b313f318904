"""The linear-head learner: the hyper-representation (Franceschi et al. 2018, Sec. 3.2) and
ANIL (Raghu et al. 2020), which differ only in where the head starts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from torch import Tensor

from metalearn.data.episodes import EpisodeBatch
from metalearn.lightning.episodic import BatchStats, EpisodeChunk, Nonfinite
from metalearn.lightning.inner_loop import HeadInit, InnerLoopLearner

__all__ = ["HyperRepresentation", "ANIL"]


class HyperRepresentation(InnerLoopLearner):
    """Bilevel meta-learning of a representation with per-episode linear heads.

    Outer variables: the backbone h_λ, optionally the inner learning rate η, and with
    ``head_init="learned"`` the head's start. Inner variables: one linear softmax head per
    episode, trained by ``inner_steps`` steps of gradient descent on the support set
    (:func:`metalearn.bilevel.fit_linear_heads`, all episodes at once, one backbone pass per
    meta-batch). Outer objective: mean query cross-entropy over the meta-batch; its
    ``.backward()`` is the exact reverse-mode hypergradient of the T-step problem.

    ``head_init="zero"`` (the default) is the paper's method: every head starts at zero.
    ``head_init="learned"`` is ANIL (see :class:`ANIL`, which has Raghu et al.'s defaults).

    Args:
        backbone: Hydra config (``_target_``) of the representation network.
        inner_steps: T in training.
        eval_inner_steps: T for validation and test (``None``: same as ``inner_steps``).
        inner_lr: initial inner learning rate η (> 0).
        learn_inner_lr: make η an outer variable (kept positive, see ``inner_lr_param``).
        inner_lr_param: ``"exp"`` (η = exp(ρ)) or ``"softplus"`` (η = log(1 + exp(ρ))).
        head_init: ``"zero"`` or ``"learned"``, see
            :data:`~metalearn.lightning.inner_loop.HeadInit`.
        ways: N of a learned head (``data.ways``; unused with a zero head).
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
        episode_chunk: episodes per backbone call (see
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
        head_init: HeadInit = "zero",
        ways: int | None = None,
        l2: float = 0.0,
        truncate: int | None = None,
        first_order: bool = False,
        batch_stats: BatchStats = "episode",
        optimizer: Mapping[str, Any] | None = None,
        lr_decay: float = 1e-5,
        nonfinite: Nonfinite = "raise",
        center_features: bool = False,
        compile: bool | str = False,
        episode_chunk: EpisodeChunk = "auto",
    ) -> None:
        super().__init__(
            backbone,
            inner_steps,
            eval_inner_steps,
            inner_lr,
            learn_inner_lr,
            inner_lr_param,
            head_init,
            ways,
            batch_stats,
            optimizer,
            lr_decay,
            nonfinite,
            compile,
            episode_chunk,
        )
        self.l2, self.truncate, self.first_order = l2, truncate, first_order
        self.center_features = center_features

    def episode_logits(
        self, batch: EpisodeBatch, steps: int, per_step: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Query logits (B, NQ, N) of the heads after ``steps`` inner steps, and the query
        accuracy after t = 0..steps steps (B, steps + 1) when ``per_step``."""
        learned = self.head_weight is not None
        return self.linear_head_logits(
            batch,
            steps,
            per_step,
            self.inner_lr,
            center_features=self.center_features,
            l2=self.l2,
            truncate=self.truncate,
            first_order=self.first_order,
            init=self.initial_head(batch.ways) if learned else None,
        )


class ANIL(HyperRepresentation):
    """Almost No Inner Loop (Raghu, Raghu, Bengio, Vinyals, ICLR 2020): the
    :class:`HyperRepresentation` with a learned head start, and MAML's Omniglot settings
    as defaults (T = 1 in training and 3 at test, η = 0.4 fixed).

    Only the linear head is adapted in the inner loop, on frozen features; the backbone and
    the head's start are trained in the outer loop on the query cross-entropy, through the
    T steps (second order unless ``first_order``). With ``head_init="zero"`` it is the
    hyper-representation. The other settings are :class:`HyperRepresentation`'s.

    Args:
        backbone: Hydra config (``_target_``) of the representation network.
        ways: N of the learned head start (``data.ways``).
        inner_steps: T in training.
        eval_inner_steps: T for validation and test (``None``: T).
        inner_lr: inner step size η.
        learn_inner_lr: make η an outer variable.
        head_init: ``"learned"`` (ANIL) or ``"zero"``.
        settings: any other :class:`HyperRepresentation` setting.
    """

    def __init__(
        self,
        backbone: Mapping[str, Any],
        ways: int = 5,
        inner_steps: int = 1,
        eval_inner_steps: int | None = 3,
        inner_lr: float = 0.4,
        learn_inner_lr: bool = False,
        head_init: HeadInit = "learned",
        **settings: Any,
    ) -> None:
        super().__init__(
            backbone,
            ways=ways,
            inner_steps=inner_steps,
            eval_inner_steps=eval_inner_steps,
            inner_lr=inner_lr,
            learn_inner_lr=learn_inner_lr,
            head_init=head_init,
            **settings,
        )
