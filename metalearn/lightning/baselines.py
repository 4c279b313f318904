"""Baselines in the same harness: Prototypical Networks, MAML, ANIL, classical joint training.

Every learner here is an :class:`~metalearn.lightning.episodic.EpisodicModule`: the same
backbones (from the Hydra config), the same uint8 episodes and the same evaluation protocol
(fixed episodes, mean ± 95% CI, accuracy after each inner step) as the paper's
:class:`~metalearn.lightning.module.HyperRepresentation`, so numbers are comparable.
Choose one with ``algorithm=<name>`` (``conf/algorithm/``).

How they relate to the hyper-representation (Franceschi et al., ICML 2018): all learn a
representation h_λ across episodes. ProtoNets replace the inner problem by a closed-form
classifier (class means); MAML adapts the whole network in the inner loop; ANIL adapts
only the head, from a *learned* initialization: with a zero initialization ANIL is exactly
the hyper-representation. The classical approach drops the inner/outer split altogether.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import hydra.utils
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.bilevel import head_logits
from metalearn.bilevel.maml import Params, maml_logits
from metalearn.data.episodes import EpisodeBatch, EpisodeSampler
from metalearn.errors import ConfigError, MetalearnError
from metalearn.lightning.episodic import (
    BatchStats,
    EpisodicModule,
    InverseTimeDecay,
    Nonfinite,
    plain,
    query_metrics,
)

__all__ = [
    "PrototypicalNetwork",
    "MAML",
    "ANIL",
    "ClassicalJointTraining",
    "prototype_logits",
]

HEAD_INITS = ("learned", "zero")

#: MAML's BatchNorm settings: vmap sees one episode's set at a time and cannot update
#: running statistics.
MAML_BATCH_STATS = ("split", "support")


def prototype_logits(
    support_features: Tensor, support_labels: Tensor, query_features: Tensor, ways: int
) -> Tensor:
    """Prototypical-network logits: minus the squared Euclidean distance to class means.

    Args:
        support_features: (B, S, d).
        support_labels: (B, S) integer labels in ``[0, ways)``.
        query_features: (B, Q, d).
        ways: N.

    Returns:
        (B, Q, N) logits ``-||f(x_q) - c_n||²`` with prototypes
        ``c_n = mean of the support features of class n`` (Snell et al. 2017, Eq. 1-2).
    """
    onehot = F.one_hot(support_labels.long(), ways).to(support_features.dtype)  # (B, S, N)
    counts = onehot.sum(1).clamp_min(1).unsqueeze(-1)  # (B, N, 1)
    prototypes = torch.bmm(onehot.transpose(1, 2), support_features) / counts  # (B, N, d)
    # ||q - c||² = ||q||² - 2 q·c + ||c||², as batched matrix products (no (B, Q, N, d) tensor).
    squared = (
        query_features.pow(2).sum(-1, keepdim=True)
        - 2 * torch.bmm(query_features, prototypes.transpose(1, 2))
        + prototypes.pow(2).sum(-1).unsqueeze(1)
    )
    return -squared


def _feature_dim(backbone: nn.Module) -> int:
    dim = getattr(backbone, "feature_dim", None)
    if not isinstance(dim, int):
        raise ConfigError(
            f"{type(backbone).__name__} has no integer `feature_dim`; the linear head needs it"
        )
    return dim


class PrototypicalNetwork(EpisodicModule):
    """Prototypical Networks (Snell, Swersky, Zemel, NeurIPS 2017).

    Each class is represented by the mean of its support features (its prototype); a query
    is classified by a softmax over minus its squared Euclidean distances to the
    prototypes; the backbone is trained on the query cross-entropy. No inner loop: the
    evaluation curve has one point (``eval_steps == 0``).

    Args:
        backbone: Hydra config (``_target_``) of the representation network.
        batch_stats: grouping of BatchNorm statistics, see :data:`BatchStats`.
        optimizer: Hydra config of the optimizer, ``_partial_: true``.
        lr_decay: inverse-time decay of the learning rate per step (0: constant).
        nonfinite: ``"raise"`` or ``"skip"`` on an inf/NaN training loss.
    """

    def __init__(
        self,
        backbone: Mapping[str, Any],
        batch_stats: BatchStats = "episode",
        optimizer: Mapping[str, Any] | None = None,
        lr_decay: float = 1e-5,
        nonfinite: Nonfinite = "raise",
        compile: bool | str = False,
    ) -> None:
        super().__init__(backbone, batch_stats, optimizer, lr_decay, nonfinite, compile)
        self.save_hyperparameters(
            {
                "backbone": plain(backbone),
                "batch_stats": batch_stats,
                "optimizer": self.optimizer_config,
                "lr_decay": lr_decay,
                "nonfinite": nonfinite,
                "compile": compile,
            }
        )

    def episode_logits(
        self, batch: EpisodeBatch, steps: int = 0, per_step: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Query logits (B, NQ, N); the curve is the accuracy (B, 1)."""
        support_features, query_features = self.embed(batch.support, batch.query)
        logits = prototype_logits(
            support_features, batch.support_labels, query_features, batch.ways
        )
        if not per_step:
            return logits, None
        return logits, (logits.argmax(-1) == batch.query_labels).float().mean(1, keepdim=True)

    def training_step(self, batch: EpisodeBatch, batch_idx: int) -> Tensor:
        loss, accuracy, _ = self.episode_forward(batch, 0)
        loss = loss.mean()
        if not self.check_finite(loss, batch):
            return loss  # every rank runs backward; the update is skipped
        self.log_train(loss, accuracy)
        return loss


class _InnerLoopLearner(EpisodicModule):
    """Shared by MAML and ANIL: T / eval T, the inner learning rate, the head initialization.

    The inner learning rate is ``η = exp(inner_lr_raw)`` (positive; an outer variable when
    ``learn_inner_lr``), the same parametrization as :class:`HyperRepresentation`'s
    default. The linear head's initialization is ``"learned"``: an outer variable
    ``(head_weight (d, N), head_bias (N,))`` started at zero, which fixes N (``ways``) for
    training and evaluation; or ``"zero"``: always zero, not learned, any number of ways.
    """

    def __init__(
        self,
        backbone: Mapping[str, Any],
        ways: int,
        inner_steps: int,
        eval_inner_steps: int | None,
        inner_lr: float,
        learn_inner_lr: bool,
        head_init: str,
        batch_stats: BatchStats,
        optimizer: Mapping[str, Any] | None,
        lr_decay: float,
        nonfinite: Nonfinite,
        compile: bool | str = False,
    ) -> None:
        super().__init__(backbone, batch_stats, optimizer, lr_decay, nonfinite, compile)
        if inner_steps < 1 or (eval_inner_steps is not None and eval_inner_steps < 1):
            raise ConfigError(
                f"model.inner_steps and model.eval_inner_steps must be >= 1, got "
                f"{inner_steps} and {eval_inner_steps}"
            )
        if not inner_lr > 0:
            raise ConfigError(f"model.inner_lr must be > 0, got {inner_lr}")
        if head_init not in HEAD_INITS:
            raise ConfigError(f"model.head_init must be 'learned' or 'zero', got {head_init!r}")
        if head_init == "learned" and ways < 2:
            raise ConfigError(f"model.ways must be >= 2 with a learned head, got {ways}")
        self.inner_steps, self.eval_inner_steps = inner_steps, eval_inner_steps
        self.head_init = head_init
        self.inner_lr_raw = nn.Parameter(
            torch.tensor(math.log(inner_lr)), requires_grad=learn_inner_lr
        )
        dim = _feature_dim(self.backbone)
        self.head_weight: nn.Parameter | None
        self.head_bias: nn.Parameter | None
        if head_init == "learned":
            self.head_weight = nn.Parameter(torch.zeros(dim, ways))
            self.head_bias = nn.Parameter(torch.zeros(ways))
        else:
            self.register_parameter("head_weight", None)
            self.register_parameter("head_bias", None)

    @property
    def inner_lr(self) -> Tensor:
        """The inner learning rate η as a positive 0-d tensor (differentiable)."""
        return self.inner_lr_raw.exp()

    @property
    def eval_steps(self) -> int:
        return self.inner_steps if self.eval_inner_steps is None else self.eval_inner_steps

    def initial_head(self, ways: int) -> tuple[Tensor, Tensor]:
        """The head initialization ``(weight (d, N), bias (N,))`` for N-way episodes."""
        if self.head_weight is None or self.head_bias is None:
            dim = _feature_dim(self.backbone)
            zeros = self.inner_lr_raw.new_zeros
            return zeros(dim, ways), zeros(ways)
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

    def training_step(self, batch: EpisodeBatch, batch_idx: int) -> Tensor:
        loss, accuracy, _ = self.episode_forward(batch, self.inner_steps)
        loss = loss.mean()
        if not self.check_finite(loss, batch):
            return loss  # every rank runs backward; the update is skipped
        self.log_train(loss, accuracy)
        self.log("train/inner_lr", self.inner_lr.detach(), batch_size=len(accuracy))
        return loss


class MAML(_InnerLoopLearner):
    """Model-Agnostic Meta-Learning (Finn, Abbeel, Levine, ICML 2017).

    The whole network, backbone and linear head, is adapted to each episode by
    ``inner_steps`` steps of gradient descent on the support cross-entropy, from the
    meta-learned initialization θ_0; θ_0 (and η when ``learn_inner_lr``) is trained on the
    query cross-entropy of the adapted networks. The meta-gradient is second order (the
    reverse-mode hypergradient through the T steps, Hessian-vector products) unless
    ``first_order`` (FOMAML). See :func:`metalearn.bilevel.maml.maml_episodes`.

    The B episodes of a meta-batch are adapted at once with ``torch.func.vmap`` over a
    functional call of the backbone. Each forward pass sees one episode's support set or
    its query set, so BatchNorm statistics are per episode and per set: ``batch_stats``
    is ``"split"`` (transductive, as in Finn et al.'s code) or ``"support"`` (inductive:
    the query images are normalized with the adapted network's statistics of the support
    set); vmap cannot update running statistics. Validation and test adapt with
    ``eval_inner_steps`` steps and build no outer graph.

    Args:
        backbone: Hydra config (``_target_``) of the representation network.
        ways: N of the learned head initialization (``data.ways``).
        inner_steps: T in training (Finn et al., Omniglot 5-way: 1).
        eval_inner_steps: T for validation and test (Finn et al.: 3; ``None``: T).
        inner_lr: inner step size η (Finn et al., Omniglot 5-way: 0.4).
        learn_inner_lr: make η an outer variable (η = exp(ρ)).
        first_order: first-order MAML (drop the second-order terms).
        head_init: ``"learned"`` (Finn et al.: the head is part of θ_0; here started at
            zero) or ``"zero"`` (a zero head at the start of every episode, any ways).
        episode_chunk: episodes per vectorized chunk (``None``: the whole meta-batch); a
            smaller value bounds the memory of large evaluation batches.
        batch_stats: ``"split"`` or ``"support"`` (see above).
        optimizer: Hydra config of the outer optimizer, ``_partial_: true``.
        lr_decay: inverse-time decay of the outer learning rate per step (0: constant).
        nonfinite: ``"raise"`` or ``"skip"`` on an inf/NaN training loss.
        compile: ``torch.compile`` the meta-step (see
            :class:`~metalearn.lightning.episodic.EpisodicModule`): not supported, see
            :attr:`compile_unsupported`.
    """

    compile_unsupported = (
        "MAML cannot be compiled: its inner loop differentiates with "
        "torch.autograd.grad(create_graph=True) under torch.func.vmap, which torch.compile "
        "does not trace"
    )

    def __init__(
        self,
        backbone: Mapping[str, Any],
        ways: int = 5,
        inner_steps: int = 1,
        eval_inner_steps: int | None = 3,
        inner_lr: float = 0.4,
        learn_inner_lr: bool = False,
        first_order: bool = False,
        head_init: str = "learned",
        episode_chunk: int | None = None,
        batch_stats: BatchStats = "split",
        optimizer: Mapping[str, Any] | None = None,
        lr_decay: float = 1e-5,
        nonfinite: Nonfinite = "raise",
        compile: bool | str = False,
    ) -> None:
        super().__init__(
            backbone,
            ways,
            inner_steps,
            eval_inner_steps,
            inner_lr,
            learn_inner_lr,
            head_init,
            batch_stats,
            optimizer,
            lr_decay,
            nonfinite,
            compile,
        )
        self.save_hyperparameters(
            {
                "backbone": plain(backbone),
                "ways": ways,
                "inner_steps": inner_steps,
                "eval_inner_steps": eval_inner_steps,
                "inner_lr": inner_lr,
                "learn_inner_lr": learn_inner_lr,
                "first_order": first_order,
                "head_init": head_init,
                "episode_chunk": episode_chunk,
                "batch_stats": batch_stats,
                "optimizer": self.optimizer_config,
                "lr_decay": lr_decay,
                "nonfinite": nonfinite,
                "compile": compile,
            }
        )
        if batch_stats not in MAML_BATCH_STATS:
            raise ConfigError(
                f"MAML adapts the backbone per episode under torch.func.vmap, so BatchNorm "
                f"statistics are per episode and set: model.batch_stats must be split "
                f"(transductive) or support (inductive), got {batch_stats!r}"
            )
        if episode_chunk is not None and episode_chunk < 1:
            raise ConfigError(f"model.episode_chunk must be >= 1 or null, got {episode_chunk}")
        self.first_order, self.episode_chunk = first_order, episode_chunk

    def initial_params(self, ways: int) -> Params:
        """θ_0 as a functional dict: ``backbone.<name>`` entries and ``head.weight`` (d, N),
        ``head.bias`` (N,)."""
        params: Params = {f"backbone.{name}": p for name, p in self.backbone.named_parameters()}
        params["head.weight"], params["head.bias"] = self.initial_head(ways)
        return params

    def predict(self, params: Params, images: Tensor) -> Tensor:
        """Logits (M, N) of one episode's images (M, C, H, W) under ``params``."""
        prefix = "backbone."
        body = {name[len(prefix) :]: p for name, p in params.items() if name.startswith(prefix)}
        features = torch.func.functional_call(self.backbone, body, (images,))
        return features @ params["head.weight"] + params["head.bias"]

    def predict_query(self, params: Params, support: Tensor, query: Tensor) -> Tensor:
        """Logits (Q, N) of one episode's query images under ``params``, BatchNorm
        statistics from its support images (S, C, H, W) (``batch_stats="support"``)."""
        prefix = "backbone."
        body = {name[len(prefix) :]: p for name, p in params.items() if name.startswith(prefix)}
        images = torch.cat([support, query])
        features = torch.func.functional_call(
            self.backbone, body, (images,), {"support_size": len(support)}
        )[len(support) :]
        return features @ params["head.weight"] + params["head.bias"]

    def episode_logits(
        self, batch: EpisodeBatch, steps: int, per_step: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Query logits (B, NQ, N) after ``steps`` MAML steps, and the accuracy after
        t = 0..steps steps (B, steps + 1) when ``per_step``."""
        return maml_logits(
            self.predict,
            self.initial_params(batch.ways),
            self._to_float(batch.support),
            batch.support_labels,
            self._to_float(batch.query),
            steps,
            self.inner_lr,
            first_order=self.first_order,
            query_labels=batch.query_labels if per_step else None,
            chunk_size=self.episode_chunk,
            predict_query=self.predict_query if self.batch_stats == "support" else None,
        )


class ANIL(_InnerLoopLearner):
    """Almost No Inner Loop (Raghu, Raghu, Bengio, Vinyals, ICLR 2020).

    Only the linear head is adapted in the inner loop, by ``inner_steps`` steps of
    gradient descent on the support cross-entropy of frozen features; the backbone and the
    head initialization are trained in the outer loop on the query cross-entropy, through
    the T steps (second order unless ``first_order``).

    Relation to the paper's method: this is the hyper-representation of Franceschi et al.
    (ICML 2018) with one more outer variable, the head initialization. With
    ``head_init="zero"`` and the same T, η, BatchNorm grouping and centering it computes
    exactly what :class:`~metalearn.lightning.module.HyperRepresentation` computes (a test
    checks it); the inner loop is the same batched closed-form solver
    (:func:`metalearn.bilevel.fit_linear_heads` from the learned head), one backbone pass
    per meta-batch.

    Args:
        backbone: Hydra config (``_target_``) of the representation network.
        ways: N of the learned head initialization (``data.ways``).
        inner_steps: T in training (Raghu et al. use MAML's settings: 1 for Omniglot 5-way).
        eval_inner_steps: T for validation and test (3; ``None``: T).
        inner_lr: inner step size η (0.4).
        learn_inner_lr: make η an outer variable (η = exp(ρ)).
        head_init: ``"learned"`` (ANIL; started at zero) or ``"zero"`` (the
            hyper-representation).
        l2: L2 penalty of the inner problem on the head weights.
        first_order: drop the second-order terms of the meta-gradient.
        center_features: subtract the mean of each episode's support features from its
            support and query features before the inner loop (as the hyper-representation's
            option of the same name).
        batch_stats: grouping of BatchNorm statistics, see :data:`BatchStats`.
        optimizer: Hydra config of the outer optimizer, ``_partial_: true``.
        lr_decay: inverse-time decay of the outer learning rate per step (0: constant).
        nonfinite: ``"raise"`` or ``"skip"`` on an inf/NaN training loss.
        compile: ``torch.compile`` the meta-step (see
            :class:`~metalearn.lightning.episodic.EpisodicModule`).
    """

    def __init__(
        self,
        backbone: Mapping[str, Any],
        ways: int = 5,
        inner_steps: int = 1,
        eval_inner_steps: int | None = 3,
        inner_lr: float = 0.4,
        learn_inner_lr: bool = False,
        head_init: str = "learned",
        l2: float = 0.0,
        first_order: bool = False,
        center_features: bool = False,
        batch_stats: BatchStats = "episode",
        optimizer: Mapping[str, Any] | None = None,
        lr_decay: float = 1e-5,
        nonfinite: Nonfinite = "raise",
        compile: bool | str = False,
    ) -> None:
        super().__init__(
            backbone,
            ways,
            inner_steps,
            eval_inner_steps,
            inner_lr,
            learn_inner_lr,
            head_init,
            batch_stats,
            optimizer,
            lr_decay,
            nonfinite,
            compile,
        )
        self.save_hyperparameters(
            {
                "backbone": plain(backbone),
                "ways": ways,
                "inner_steps": inner_steps,
                "eval_inner_steps": eval_inner_steps,
                "inner_lr": inner_lr,
                "learn_inner_lr": learn_inner_lr,
                "head_init": head_init,
                "l2": l2,
                "first_order": first_order,
                "center_features": center_features,
                "batch_stats": batch_stats,
                "optimizer": self.optimizer_config,
                "lr_decay": lr_decay,
                "nonfinite": nonfinite,
                "compile": compile,
            }
        )
        self.l2, self.first_order, self.center_features = l2, first_order, center_features

    def episode_logits(
        self, batch: EpisodeBatch, steps: int, per_step: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Query logits (B, NQ, N) after ``steps`` head steps, and the accuracy after
        t = 0..steps steps (B, steps + 1) when ``per_step``."""
        return self.linear_head_logits(
            batch,
            steps,
            per_step,
            self.inner_lr,
            center_features=self.center_features,
            l2=self.l2,
            first_order=self.first_order,
            init=self.initial_head(batch.ways),
        )


class ClassicalJointTraining(EpisodicModule):
    """The "classical" approach the paper contrasts with (Franceschi et al. 2018, Sec. 4.3).

    No inner/outer split: the representation h_λ and one linear head ``(W_j, b_j)`` per
    training episode of a fixed pool j = 0..J-1 are trained *jointly*, by the outer
    optimizer, on the sum of the episodes' training losses

        min_{λ, W_1..W_J, b_1..b_J}  Σ_j  mean_{(x, y) ∈ S_j ∪ Q_j} CE(h_λ(x) W_j + b_j, y),

    where S_j ∪ Q_j are all the labelled examples of episode j (without an outer problem
    there is no reason to hold its query set out). Each step takes the gradient of the mean
    of this loss over the B episodes of the meta-batch (stochastic gradient of the sum).

    The pool: training episode ids arrive from the normal training stream (ids
    ``s*B .. s*B+B-1`` at step s); episode id ``i`` is mapped to pool episode ``i mod J``,
    whose images are redrawn by the DataModule's training sampler (episodes are pure
    functions of their index, so pool episode j is always the same classes, labels and
    images; the order over the pool is cyclic). Head j's columns therefore always mean the
    same classes. The heads start as ``nn.Linear``'s do, uniform in ±1/√d (at zero heads
    the backbone's gradient ``(p - y) Wᵀ`` would vanish at every episode's first visit);
    ``head_lr`` gives them their own learning rate in the outer optimizer (a head gets a
    gradient only when its episode is in the batch, once every J / B steps; with Adam its
    moments still carry it a few steps after that).

    At validation and test, a new head is trained on the frozen features of each episode's
    support set from zero by ``eval_inner_steps`` steps of gradient descent with step
    ``eval_inner_lr`` (:func:`metalearn.bilevel.fit_linear_heads`, no graph), and scored on
    the query set: the same evaluation as the bilevel learners.

    Args:
        backbone: Hydra config (``_target_``) of the representation network.
        ways: N of the evaluation episodes (``data.ways``).
        train_ways: N of the training episodes (``data.train_ways``; ``None``: ``ways``):
            the heads' number of classes.
        pool_episodes: J, the number of training episodes (and heads).
        head_init: ``"uniform"`` (±1/√d, as ``nn.Linear``) or ``"zero"``.
        head_lr: learning rate of the heads in the outer optimizer (``None``: the
            optimizer's ``lr``).
        eval_inner_steps: gradient steps of the new head at validation / test.
        eval_inner_lr: step size of the new head's gradient descent.
        eval_l2: L2 penalty on the new head's weights.
        batch_stats: grouping of BatchNorm statistics, see :data:`BatchStats`.
        optimizer: Hydra config of the outer optimizer, ``_partial_: true``.
        lr_decay: inverse-time decay of the learning rates per step (0: constant).
        nonfinite: ``"raise"`` or ``"skip"`` on an inf/NaN training loss.
        compile: not supported, see :attr:`compile_unsupported`.
    """

    compile_unsupported = (
        "it covers the episode step of the meta-learners, and the classical baseline's "
        "training step (pool heads trained jointly with the backbone) is not one"
    )

    def __init__(
        self,
        backbone: Mapping[str, Any],
        ways: int = 5,
        train_ways: int | None = None,
        pool_episodes: int = 2000,
        head_init: str = "uniform",
        head_lr: float | None = None,
        eval_inner_steps: int = 100,
        eval_inner_lr: float = 0.1,
        eval_l2: float = 0.0,
        batch_stats: BatchStats = "episode",
        optimizer: Mapping[str, Any] | None = None,
        lr_decay: float = 1e-5,
        nonfinite: Nonfinite = "raise",
        compile: bool | str = False,
    ) -> None:
        super().__init__(backbone, batch_stats, optimizer, lr_decay, nonfinite, compile)
        self.save_hyperparameters(
            {
                "backbone": plain(backbone),
                "ways": ways,
                "train_ways": train_ways,
                "pool_episodes": pool_episodes,
                "head_init": head_init,
                "head_lr": head_lr,
                "eval_inner_steps": eval_inner_steps,
                "eval_inner_lr": eval_inner_lr,
                "eval_l2": eval_l2,
                "batch_stats": batch_stats,
                "optimizer": self.optimizer_config,
                "lr_decay": lr_decay,
                "nonfinite": nonfinite,
                "compile": compile,
            }
        )
        if pool_episodes < 1:
            raise ConfigError(f"model.pool_episodes must be >= 1, got {pool_episodes}")
        if head_init not in ("uniform", "zero"):
            raise ConfigError(f"model.head_init must be 'uniform' or 'zero', got {head_init!r}")
        if eval_inner_steps < 1:
            raise ConfigError(f"model.eval_inner_steps must be >= 1, got {eval_inner_steps}")
        if not eval_inner_lr > 0 or (head_lr is not None and not head_lr > 0):
            raise ConfigError(
                f"model.eval_inner_lr and model.head_lr must be > 0, got {eval_inner_lr} "
                f"and {head_lr}"
            )
        self.pool_episodes, self.head_lr = pool_episodes, head_lr
        self.eval_inner_steps, self.eval_inner_lr, self.eval_l2 = (
            eval_inner_steps,
            eval_inner_lr,
            eval_l2,
        )
        self.train_ways = train_ways or ways
        dim = _feature_dim(self.backbone)
        self.head_weight = nn.Parameter(torch.zeros(pool_episodes, dim, self.train_ways))
        self.head_bias = nn.Parameter(torch.zeros(pool_episodes, self.train_ways))
        if head_init == "uniform":  # nn.Linear's initialization, U(-1/sqrt(d), 1/sqrt(d))
            bound = 1 / math.sqrt(dim)
            nn.init.uniform_(self.head_weight, -bound, bound)
            nn.init.uniform_(self.head_bias, -bound, bound)
        #: The sampler of the training split (set from the DataModule on the first step).
        self.pool_sampler: EpisodeSampler | None = None

    @property
    def eval_steps(self) -> int:
        return self.eval_inner_steps

    def configure_optimizers(self) -> Any:
        """The outer optimizer with the heads in their own parameter group (``head_lr``)."""
        heads = [self.head_weight, self.head_bias]
        body = [p for p in self.parameters() if p.requires_grad and all(p is not h for h in heads)]
        head_group: dict[str, Any] = {"params": heads}
        if self.head_lr is not None:
            head_group["lr"] = self.head_lr
        groups: list[dict[str, Any]] = [{"params": body}, head_group]
        return self._optimizer_and_schedule(groups)

    def _optimizer_and_schedule(self, params: Any) -> Any:
        optimizer = hydra.utils.instantiate(self.optimizer_config)(params=params)
        if not self.lr_decay:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, InverseTimeDecay(self.lr_decay))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def _train_sampler(self) -> EpisodeSampler:
        if self.pool_sampler is None:
            trainer = self._trainer
            datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
            sampler = getattr(datamodule, "samplers", {}).get("train")
            if sampler is None:
                raise MetalearnError(
                    "classical joint training redraws its pool episodes from the DataModule's "
                    "training sampler (trainer.datamodule.samplers['train']); train it with "
                    "trainer.fit(model, datamodule=...) or set model.pool_sampler"
                )
            self.pool_sampler = sampler
        return self.pool_sampler

    def pool_batch(self, batch: EpisodeBatch) -> EpisodeBatch:
        """The pool episodes ``episode_ids mod J`` of a training meta-batch (their
        ``episode_ids`` are the pool ids)."""
        pool_ids = batch.episode_ids % self.pool_episodes
        if torch.equal(pool_ids, batch.episode_ids):
            return batch
        drawn = self._train_sampler().sample(pool_ids.tolist())
        return drawn._replace(
            support=drawn.support.to(self.device),
            support_labels=drawn.support_labels.to(self.device),
            query=drawn.query.to(self.device),
            query_labels=drawn.query_labels.to(self.device),
            episode_ids=drawn.episode_ids.to(self.device),
        )

    def training_loss(self, batch: EpisodeBatch) -> tuple[Tensor, Tensor]:
        """Per-episode mean cross-entropy and accuracy of the pool heads on support ∪ query.

        ``batch`` must hold pool episodes: its ``episode_ids`` select the heads (see
        :meth:`pool_batch`).
        """
        if batch.ways != self.train_ways:
            raise ConfigError(
                f"the pool heads have {self.train_ways} classes (model.train_ways) but the "
                f"training episodes have {batch.ways} ways"
            )
        pool_ids = batch.episode_ids.to(self.head_weight.device)
        support_features, query_features = self.embed(batch.support, batch.query)
        features = torch.cat([support_features, query_features], dim=1)
        labels = torch.cat([batch.support_labels, batch.query_labels], dim=1)
        logits = head_logits(features, self.head_weight[pool_ids], self.head_bias[pool_ids])
        return query_metrics(logits, labels)

    def episode_logits(
        self, batch: EpisodeBatch, steps: int, per_step: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Evaluation: a new head per episode on frozen features, ``steps`` GD steps;
        query logits (B, NQ, N) and the accuracy after t = 0..steps steps when ``per_step``."""
        return self.linear_head_logits(
            batch, steps, per_step, self.eval_inner_lr, detach_features=True, l2=self.eval_l2
        )

    def training_step(self, batch: EpisodeBatch, batch_idx: int) -> Tensor:
        loss, accuracy = self.training_loss(self.pool_batch(batch))
        loss = loss.mean()
        if not self.check_finite(loss, batch):
            return loss  # every rank runs backward; the update is skipped
        self.log_train(loss, accuracy)
        return loss
