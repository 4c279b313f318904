"""Prototypical Networks (Snell, Swersky, Zemel, NeurIPS 2017) in the episodic harness."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from metalearn.data.episodes import EpisodeBatch
from metalearn.lightning.episodic import EpisodicModule

__all__ = ["PrototypicalNetwork", "prototype_logits"]


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


class PrototypicalNetwork(EpisodicModule):
    """Prototypical Networks (Snell, Swersky, Zemel, NeurIPS 2017).

    Each class is represented by the mean of its support features (its prototype); a query
    is classified by a softmax over minus its squared Euclidean distances to the
    prototypes; the backbone is trained on the query cross-entropy. No inner loop: the
    evaluation curve has one point (``eval_steps == 0``).

    Its settings are :class:`~metalearn.lightning.episodic.EpisodicModule`'s (backbone,
    BatchNorm statistics, optimizer, decay, non-finite losses, compile, episode chunk).
    """

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
