"""The "classical" joint training the paper contrasts with (Franceschi et al. 2018, Sec. 4.3)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from metalearn.bilevel import head_logits
from metalearn.data.episodes import EpisodeBatch, EpisodeSampler
from metalearn.errors import ConfigError, MetalearnError
from metalearn.lightning.episodic import (
    BatchStats,
    EpisodeChunk,
    EpisodicModule,
    Nonfinite,
    query_metrics,
)
from metalearn.lightning.inner_loop import feature_dim

__all__ = ["ClassicalJointTraining"]


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
        episode_chunk: episodes per backbone call (see
            :class:`~metalearn.lightning.episodic.EpisodicModule`).
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
        episode_chunk: EpisodeChunk = "auto",
    ) -> None:
        super().__init__(
            backbone, batch_stats, optimizer, lr_decay, nonfinite, compile, episode_chunk
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
        dim = feature_dim(self.backbone)
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
        return self.optimizer_and_schedule(groups)

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
        """Per-episode mean cross-entropy and accuracy of the pool heads on support ∪ query
        of the pool episodes of a training meta-batch (:meth:`pool_batch`)."""
        batch = self.pool_batch(batch)
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
