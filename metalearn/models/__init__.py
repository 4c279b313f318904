"""Representation networks (the outer variables of the hyper-representation model)."""

from metalearn.models.conv import ConvBackbone, EpisodeBatchNorm2d, NormMode

__all__ = ["ConvBackbone", "EpisodeBatchNorm2d", "NormMode"]
