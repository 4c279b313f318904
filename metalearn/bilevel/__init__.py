"""The bilevel core: inner solvers whose graph yields exact hypergradients (plain PyTorch)."""

from metalearn.bilevel.core import (
    METHODS,
    BilevelProblem,
    Hypergradient,
    Init,
    Method,
    Objective,
    forward_hypergradient,
    hypergradient,
    implicit_cg_hypergradient,
    implicit_fixed_point_hypergradient,
    reverse_hypergradient,
    unroll,
)
from metalearn.bilevel.dynamics import (
    Adam,
    Dynamics,
    GradientDescent,
    HeavyBall,
    Hyperparameter,
    HyperValue,
    OuterVariable,
    Tensors,
)
from metalearn.bilevel.heads import LearningRate, fit_linear_heads, head_gradient, head_logits

__all__ = [
    # The few-shot head solver: the fast special case.
    "LearningRate",
    "fit_linear_heads",
    "head_gradient",
    "head_logits",
    # The general core.
    "METHODS",
    "Adam",
    "BilevelProblem",
    "Dynamics",
    "GradientDescent",
    "HeavyBall",
    "HyperValue",
    "Hypergradient",
    "Hyperparameter",
    "Init",
    "Method",
    "Objective",
    "OuterVariable",
    "Tensors",
    "forward_hypergradient",
    "hypergradient",
    "implicit_cg_hypergradient",
    "implicit_fixed_point_hypergradient",
    "reverse_hypergradient",
    "unroll",
]
