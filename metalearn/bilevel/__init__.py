"""The bilevel core: inner solvers whose graph yields exact hypergradients (plain PyTorch)."""

from metalearn.bilevel.heads import LearningRate, fit_linear_heads, head_gradient, head_logits

__all__ = ["LearningRate", "fit_linear_heads", "head_gradient", "head_logits"]
