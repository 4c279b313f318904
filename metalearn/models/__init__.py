"""Representation networks (the outer variables of the hyper-representation model)."""

from metalearn.models.conv import ConvBackbone, EpisodeBatchNorm2d, NormMode
from metalearn.models.normalization import (
    BATCH_STATS,
    BatchStats,
    Representation,
    build_backbone,
    embed_episodes,
    protocol_of,
)
from metalearn.models.resnet import ResidualBackbone, ResidualBlock, ResNet12, SnailResNet

__all__ = [
    "BATCH_STATS",
    "BatchStats",
    "Representation",
    "build_backbone",
    "embed_episodes",
    "protocol_of",
    "ConvBackbone",
    "EpisodeBatchNorm2d",
    "NormMode",
    "ResNet12",
    "ResidualBackbone",
    "ResidualBlock",
    "SnailResNet",
]
