"""Where BatchNorm statistics come from (``model.batch_stats``), and the evaluation protocol it implies."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Literal

import hydra.utils
import torch
from torch import Tensor, nn

from metalearn.errors import ConfigError

__all__ = [
    "BatchStats",
    "BATCH_STATS",
    "Protocol",
    "protocol_of",
    "build_backbone",
    "embed_episodes",
    "EpisodeChunk",
    "check_episode_chunk",
    "episodes_per_call",
    "Representation",
]

#: Where every BatchNorm layer of the backbone takes its statistics, in training and at
#: validation / test alike (the one setting for normalization, ``model.batch_stats``):
#:
#: * ``"episode"`` (transductive): per episode, over its support and query images together.
#: * ``"split"`` (transductive): per episode, support and query images separately (two
#:   passes; the paper's code and MAML's).
#: * ``"meta_batch"`` (transductive): over all images of the meta-batch at once.
#: * ``"support"`` (inductive): per episode, over its support images only, applied to the
#:   support and the query images (per layer and channel: mean and variance over the support
#:   images and positions).
#: * ``"running"`` (inductive): conventional BatchNorm: statistics of the whole meta-batch in
#:   training, running averages accumulated in training at validation / test (``eval()``).
#:
#: Transductive: a query image's features depend on the other query images of its episode.
#: Inductive: a query is classified from the support set and the model alone.
BatchStats = Literal["episode", "split", "meta_batch", "support", "running"]

#: The protocol of each :data:`BatchStats` value.
BATCH_STATS: dict[str, str] = {
    "episode": "transductive",
    "split": "transductive",
    "meta_batch": "transductive",
    "support": "inductive",
    "running": "inductive",
}

Protocol = Literal["transductive", "inductive"]


def protocol_of(batch_stats: str) -> str:
    """``"transductive"`` or ``"inductive"`` (see :data:`BatchStats`)."""
    check_batch_stats(batch_stats)
    return BATCH_STATS[batch_stats]


def check_batch_stats(batch_stats: Any, allowed: tuple[str, ...] = tuple(BATCH_STATS)) -> None:
    """Raise :class:`ConfigError` unless ``batch_stats`` is one of ``allowed``."""
    if batch_stats not in allowed:
        choices = ", ".join(f"{name} ({BATCH_STATS[name]})" for name in allowed)
        raise ConfigError(f"model.batch_stats must be one of {choices}; got {batch_stats!r}")


def build_backbone(config: Mapping[str, Any], batch_stats: str) -> nn.Module:
    """Instantiate the backbone config (``_target_``) for a :data:`BatchStats` setting.

    The backbone's BatchNorm mode follows from ``batch_stats`` (``norm="running"`` for
    ``"running"``, the default batch statistics otherwise), so a backbone config does not
    set ``norm``; one that does (checkpoints written before ``batch_stats`` held both) must
    agree with ``batch_stats``.
    """
    check_batch_stats(batch_stats)
    config = dict(config)
    norm = "running" if batch_stats == "running" else "batch"
    if config.pop("norm", norm) != norm:
        raise ConfigError(
            f"model.backbone.norm is set by model.batch_stats (running: conventional "
            f"BatchNorm with running averages; support, episode, split, meta_batch: batch "
            f"statistics), and {batch_stats!r} needs norm {norm!r}: remove "
            f"model.backbone.norm"
        )
    extra = {"norm": "running"} if batch_stats == "running" else {}
    backbone: nn.Module = hydra.utils.instantiate(config, **extra)
    if (
        batch_stats == "support"
        and "support_size" not in inspect.signature(backbone.forward).parameters
    ):
        raise ConfigError(
            f"model.batch_stats=support needs a backbone whose forward takes support_size "
            f"(the number of leading images that give the BatchNorm statistics); "
            f"{type(backbone).__name__}.forward does not"
        )
    return backbone


#: ``model.episode_chunk``: how many episodes of a meta-batch one backbone call embeds.
#: ``"auto"``: one at a time on the CPU, the whole meta-batch on other devices; an integer
#: k >= 1: k at a time; ``None``: the whole meta-batch in one call.
#:
#: With statistics per episode or per set (:data:`PER_EPISODE_STATS`) an episode's features
#: do not depend on the other episodes, so the chunk changes only the speed (the features
#: agree to float rounding; ``tests/test_models.py``). On a CPU one call per episode and one
#: per meta-batch cost the same when freed host memory is kept (``extras.keep_host_memory``,
#: :mod:`metalearn.utils.host_memory`); under glibc's default allocator the larger blocks of
#: a whole meta-batch are faulted in afresh at every step and one call was up to 2.95x
#: slower (docs/benchmarks.md), so ``auto`` embeds one episode per call there. A GPU is
#: launch-bound at these sizes and wants one call.
EpisodeChunk = int | None | Literal["auto"]

#: The ``batch_stats`` settings under which embedding a meta-batch in chunks of episodes
#: gives the same features: every BatchNorm statistic is taken within one episode.
PER_EPISODE_STATS = ("episode", "split", "support")


def check_episode_chunk(episode_chunk: Any, batch_stats: str) -> None:
    """Raise :class:`ConfigError` unless ``episode_chunk`` is an :data:`EpisodeChunk` that
    leaves the features of a ``batch_stats`` model unchanged."""
    if episode_chunk is None or episode_chunk == "auto":
        return
    if isinstance(episode_chunk, bool) or not isinstance(episode_chunk, int) or episode_chunk < 1:
        raise ConfigError(
            f"model.episode_chunk must be auto, null (the whole meta-batch) or an integer "
            f">= 1, got {episode_chunk!r}"
        )
    if batch_stats not in PER_EPISODE_STATS:
        raise ConfigError(
            f"model.episode_chunk={episode_chunk} would change the features: "
            f"model.batch_stats={batch_stats} takes BatchNorm statistics over the whole "
            f"meta-batch in training; use model.episode_chunk=auto or null"
        )


def episodes_per_call(
    episode_chunk: EpisodeChunk, batch_stats: str, device: torch.device
) -> int | None:
    """The episodes one backbone call embeds (``None``: all) for an :data:`EpisodeChunk`
    setting on ``device``; ``"auto"`` gives 1 on the CPU when ``batch_stats`` allows it."""
    if episode_chunk != "auto":
        return episode_chunk
    if device.type == "cpu" and batch_stats in PER_EPISODE_STATS:
        return 1
    return None


def embed_episodes(
    backbone: nn.Module,
    support: Tensor,
    query: Tensor,
    batch_stats: str,
    chunk: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Backbone features of B episodes' support (B, S, ...) and query (B, Q, ...) images,
    with the BatchNorm statistics of ``batch_stats`` (:data:`BatchStats`).

    ``chunk`` (``None``: all B; see :func:`episodes_per_call`) embeds the meta-batch that
    many episodes per backbone call, which gives the same features when the statistics are
    per episode or per set (:data:`PER_EPISODE_STATS`; a ``ValueError`` otherwise).

    Returns:
        ``(support features (B, S, d), query features (B, Q, d))``.
    """
    if chunk is not None and chunk < support.shape[0]:
        if batch_stats not in PER_EPISODE_STATS:
            raise ValueError(
                f"batch_stats={batch_stats!r} normalizes over the whole meta-batch: it cannot "
                f"be embedded {chunk} episode(s) at a time"
            )
        parts = [
            embed_episodes(backbone, s, q, batch_stats)
            for s, q in zip(support.split(chunk), query.split(chunk), strict=True)
        ]
        return torch.cat([s for s, _ in parts]), torch.cat([q for _, q in parts])
    if batch_stats == "split":
        return backbone(support), backbone(query)
    images = torch.cat([support, query], dim=1)
    if batch_stats == "meta_batch":
        features = backbone(images.flatten(0, 1)).unflatten(0, images.shape[:2])
    elif batch_stats == "support":
        features = backbone(images, support_size=support.shape[1])
    else:  # episode; running (the backbone ignores the grouping)
        features = backbone(images)
    return features.split([support.shape[1], query.shape[1]], dim=1)


class Representation(nn.Module):
    """A trained representation h_λ as a deployed few-shot classifier uses it.

    ``forward(images, support=None)`` maps (M, C, H, W) float images to (M, d) features,
    normalizing every BatchNorm layer as the model was trained (``batch_stats``):

    * ``"support"`` (inductive): with the statistics of ``support`` (the episode's support
      images, (S, C, H, W)); of ``images`` themselves when ``support`` is None. A query
      embedded alone gets exactly the features it gets in a batch with the same support.
    * ``"running"`` (inductive): with the running averages; ``support`` is ignored, and
      every image's features depend on that image only.
    * ``"episode"``, ``"meta_batch"`` (transductive): with the statistics of ``support`` and
      ``images`` together (``images`` alone when ``support`` is None). An image's features
      depend on the other images of the call: embed a whole episode at once.
    * ``"split"`` (transductive): with the statistics of ``images`` (``support`` is
      ignored). An image embedded alone gets different features than in its query set.

    Attributes:
        backbone: the network.
        batch_stats: the setting above.
        protocol: ``"inductive"`` or ``"transductive"``.
    """

    def __init__(self, backbone: nn.Module, batch_stats: str) -> None:
        super().__init__()
        check_batch_stats(batch_stats)
        self.backbone, self.batch_stats = backbone, batch_stats
        self.protocol = protocol_of(batch_stats)
        self.feature_dim = getattr(backbone, "feature_dim", None)

    def forward(self, images: Tensor, support: Tensor | None = None) -> Tensor:
        """(M, C, H, W) images -> (M, d) features; ``support``: (S, C, H, W) or None."""
        if support is None or self.batch_stats in ("split", "running"):
            return self.backbone(images)
        _, features = embed_episodes(self.backbone, support[None], images[None], self.batch_stats)
        return features[0]

    def extra_repr(self) -> str:
        return f"batch_stats={self.batch_stats!r} ({self.protocol})"
