"""Model-Agnostic Meta-Learning (Finn, Abbeel, Levine, ICML 2017) in the episodic harness."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from metalearn.bilevel.maml import Params, maml_logits
from metalearn.data.episodes import EpisodeBatch
from metalearn.errors import ConfigError
from metalearn.lightning.episodic import BatchStats, EpisodeChunk, Nonfinite
from metalearn.lightning.inner_loop import HeadInit, InnerLoopLearner
from metalearn.models.normalization import episodes_per_call

__all__ = ["MAML", "MAML_BATCH_STATS"]

#: MAML's BatchNorm settings: vmap sees one episode's set at a time and cannot update
#: running statistics.
MAML_BATCH_STATS = ("split", "support")


class MAML(InnerLoopLearner):
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
        learn_inner_lr: make η an outer variable.
        inner_lr_param: ``"exp"`` (η = exp(ρ)) or ``"softplus"``.
        first_order: first-order MAML (drop the second-order terms).
        head_init: ``"learned"`` (Finn et al.: the head is part of θ_0; here started at
            zero) or ``"zero"`` (a zero head at the start of every episode, any ways).
        episode_chunk: episodes per vectorized chunk (``None``: the whole meta-batch; an
            integer; ``"auto"``: one on the CPU, all elsewhere); a smaller value bounds the
            memory of large evaluation batches.
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
    mixed_precision_unsupported = (
        "MAML's inner gradient (torch.func.grad under torch.func.vmap) fails under autocast "
        "(the backward of the backbone meets float32 and bfloat16 tensors)"
    )

    def __init__(
        self,
        backbone: Mapping[str, Any],
        ways: int = 5,
        inner_steps: int = 1,
        eval_inner_steps: int | None = 3,
        inner_lr: float = 0.4,
        learn_inner_lr: bool = False,
        inner_lr_param: Literal["exp", "softplus"] = "exp",
        first_order: bool = False,
        head_init: HeadInit = "learned",
        episode_chunk: EpisodeChunk = None,
        batch_stats: BatchStats = "split",
        optimizer: Mapping[str, Any] | None = None,
        lr_decay: float = 1e-5,
        nonfinite: Nonfinite = "raise",
        compile: bool | str = False,
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
        if batch_stats not in MAML_BATCH_STATS:
            raise ConfigError(
                f"MAML adapts the backbone per episode under torch.func.vmap, so BatchNorm "
                f"statistics are per episode and set: model.batch_stats must be split "
                f"(transductive) or support (inductive), got {batch_stats!r}"
            )
        self.first_order = first_order

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
            chunk_size=episodes_per_call(
                self.episode_chunk, self.batch_stats, batch.support.device
            ),
            predict_query=self.predict_query if self.batch_stats == "support" else None,
        )
