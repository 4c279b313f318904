"""Representation networks (the outer variables of the hyper-representation model)."""

from metalearn.models.conv import ConvBackbone, EpisodeBatchNorm2d, NormMode
from metalearn.models.resnet import ResidualBackbone, ResidualBlock, ResNet12, SnailResNet

__all__ = [
    "ConvBackbone",
    "EpisodeBatchNorm2d",
    "NormMode",
    "ResNet12",
    "ResidualBackbone",
    "ResidualBlock",
    "SnailResNet",
]
