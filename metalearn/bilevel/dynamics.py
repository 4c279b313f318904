"""Inner optimization dynamics Φ_t (gradient descent, heavy-ball, Adam) as pure update rules.

In the bilevel framework of Franceschi et al., "Bilevel Programming for Hyperparameter
Optimization and Meta-Learning" (ICML 2018), Sec. 3, the inner problem is replaced by T
steps of an optimization dynamics

    s_0 = (Φ_0(λ), a_0),    s_t = Φ_t(s_{t-1}, λ),    t = 1..T,

whose state ``s_t = (w_t, a_t)`` holds the inner variables ``w_t`` and the auxiliary
variables ``a_t`` of the optimizer (a velocity, Adam's moments); ``a_0`` is zero. A
:class:`Dynamics` here is the update rule only: given the step index ``t``, the state and
the inner gradient ``g_t = ∇_w L(w_{t-1}, λ)`` (computed by :mod:`metalearn.bilevel.core`),
it returns the next state, with plain differentiable tensor arithmetic, so the
hypergradient flows through ``w_t``, ``a_t`` and the optimizer's hyperparameters.

Each hyperparameter of a dynamics (step size, momentum, ...) is a :data:`Hyperparameter`:
a constant (a float or a tensor that does not require grad), or a callable of the outer
variables λ, typically :class:`OuterVariable` (``lr=OuterVariable(0)`` reads λ[0];
``lr=OuterVariable(0, torch.exp)`` reads ``exp(λ[0])``), which makes it an outer variable.
A value must be a scalar or broadcast against every inner tensor.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

__all__ = [
    "Tensors",
    "HyperValue",
    "Hyperparameter",
    "OuterVariable",
    "Dynamics",
    "GradientDescent",
    "HeavyBall",
    "Adam",
]

#: A tuple of tensors: the inner variables w, the outer variables λ, a gradient, a state.
Tensors = tuple[Tensor, ...]

#: The value of a hyperparameter at given outer variables: a float or a tensor (usually 0-d).
HyperValue = Tensor | float

#: A hyperparameter of a dynamics: a constant, or a callable ``λ -> value`` (an outer variable).
Hyperparameter = float | Tensor | Callable[[Tensors], HyperValue]


@dataclass(frozen=True)
class OuterVariable:
    """A hyperparameter read from the outer variables: ``transform(λ[index])``.

    Args:
        index: position of the tensor in the outer variables λ.
        transform: optional map applied to it, e.g. ``torch.exp`` for a log-parameterized
            positive step size or ``torch.sigmoid`` for a momentum in (0, 1).

    Example:
        >>> lam = (torch.tensor(-1.0),)
        >>> float(OuterVariable(0, torch.exp)(lam))  # doctest: +ELLIPSIS
        0.367...
    """

    index: int
    transform: Callable[[Tensor], Tensor] | None = None

    def __call__(self, outer: Tensors) -> Tensor:
        if not -len(outer) <= self.index < len(outer):
            raise ValueError(
                f"OuterVariable({self.index}) is out of range: there are {len(outer)} "
                "outer variables"
            )
        value = outer[self.index]
        return value if self.transform is None else self.transform(value)


def _check_hyperparameter(name: str, value: Hyperparameter) -> None:
    if isinstance(value, Tensor):
        if value.requires_grad:
            raise ValueError(
                f"hyperparameter {name!r} is a tensor that requires grad; a constant tensor "
                "would hide it from the hypergradient. Make it an outer variable instead: put "
                f"it in the outer variables λ and pass {name}=OuterVariable(i)"
            )
    elif isinstance(value, bool) or not (isinstance(value, int | float) or callable(value)):
        raise ValueError(
            f"hyperparameter {name!r} must be a float, a tensor or a callable of the outer "
            f"variables (e.g. OuterVariable(i)), got {type(value).__name__}"
        )
    elif not callable(value) and not math.isfinite(value):
        raise ValueError(f"hyperparameter {name!r} must be finite, got {value}")


def _check_unit_interval(name: str, value: Hyperparameter) -> None:
    if isinstance(value, int | float) and not 0.0 <= value < 1.0:
        raise ValueError(f"hyperparameter {name!r} must lie in [0, 1), got {value}")


class Dynamics(ABC):
    """One step ``s_t = Φ_t(s_{t-1}, λ)`` of an inner optimizer, as a pure function.

    Subclasses list their hyperparameters in ``hyperparameter_names`` (each an attribute
    holding a :data:`Hyperparameter`) and implement :meth:`update`; those with auxiliary
    variables also override :meth:`init_aux`. Nothing is updated in place, so autograd can
    differentiate a step with respect to the state and the hyperparameters.
    """

    hyperparameter_names: ClassVar[tuple[str, ...]] = ()

    def _check(self) -> None:
        for name in self.hyperparameter_names:
            _check_hyperparameter(name, getattr(self, name))

    def hyperparameters(self, outer: Tensors) -> dict[str, HyperValue]:
        """The hyperparameters' values at the outer variables λ (callables are called)."""
        values: dict[str, HyperValue] = {}
        for name in self.hyperparameter_names:
            value = getattr(self, name)
            values[name] = value(outer) if callable(value) else value
        return values

    def init_aux(self, inner: Tensors) -> Tensors:
        """The auxiliary variables ``a_0`` for inner variables ``w_0`` (zeros; none here)."""
        return ()

    @abstractmethod
    def update(
        self,
        step: int,
        inner: Tensors,
        aux: Tensors,
        grad: Tensors,
        hyper: Mapping[str, HyperValue],
    ) -> tuple[Tensors, Tensors]:
        """One step of the dynamics.

        Args:
            step: the step index ``t`` in ``1..T`` (Adam's bias correction uses it).
            inner: ``w_{t-1}``, one tensor per inner variable.
            aux: ``a_{t-1}``, as returned by :meth:`init_aux` or the previous step.
            grad: ``∇_w L(w_{t-1}, λ)``, shaped like ``inner``.
            hyper: the hyperparameters' values, from :meth:`hyperparameters`.

        Returns:
            ``(w_t, a_t)``, shaped like ``(inner, aux)``.
        """


@dataclass(frozen=True)
class GradientDescent(Dynamics):
    """Gradient descent: ``w_t = w_{t-1} - lr * g_t`` (no auxiliary variables).

    Args:
        lr: the step size η (a :data:`Hyperparameter`).
    """

    lr: Hyperparameter
    hyperparameter_names: ClassVar[tuple[str, ...]] = ("lr",)

    def __post_init__(self) -> None:
        self._check()

    def update(
        self,
        step: int,
        inner: Tensors,
        aux: Tensors,
        grad: Tensors,
        hyper: Mapping[str, HyperValue],
    ) -> tuple[Tensors, Tensors]:
        lr = hyper["lr"]
        return tuple(w - lr * g for w, g in zip(inner, grad, strict=True)), ()


@dataclass(frozen=True)
class HeavyBall(Dynamics):
    """Heavy-ball momentum, in the form of ``torch.optim.SGD(momentum=μ)`` (no dampening).

    ``v_t = μ v_{t-1} + g_t``, ``w_t = w_{t-1} - lr * v_t``, with ``v_0 = 0``; the auxiliary
    variables are the velocities ``v`` (one per inner tensor).

    Args:
        lr: the step size η.
        momentum: the momentum μ, usually in [0, 1).
    """

    lr: Hyperparameter
    momentum: Hyperparameter
    hyperparameter_names: ClassVar[tuple[str, ...]] = ("lr", "momentum")

    def __post_init__(self) -> None:
        self._check()
        _check_unit_interval("momentum", self.momentum)

    def init_aux(self, inner: Tensors) -> Tensors:
        return tuple(torch.zeros_like(w) for w in inner)

    def update(
        self,
        step: int,
        inner: Tensors,
        aux: Tensors,
        grad: Tensors,
        hyper: Mapping[str, HyperValue],
    ) -> tuple[Tensors, Tensors]:
        lr, momentum = hyper["lr"], hyper["momentum"]
        velocity = tuple(momentum * v + g for v, g in zip(aux, grad, strict=True))
        inner = tuple(w - lr * v for w, v in zip(inner, velocity, strict=True))
        return inner, velocity


@dataclass(frozen=True)
class Adam(Dynamics):
    """Adam (Kingma & Ba, 2015), in the form of ``torch.optim.Adam`` without weight decay.

    With ``m_0 = v_0 = 0`` and the step index ``t``:

        m_t = β1 m_{t-1} + (1 - β1) g_t,     v_t = β2 v_{t-1} + (1 - β2) g_t²,
        w_t = w_{t-1} - lr * (m_t / (1 - β1^t)) / (sqrt(v_t / (1 - β2^t) + eps_root) + eps).

    The auxiliary variables are ``(m, v)``: the first moments of every inner tensor, then
    the second moments. ``eps_root`` (not in ``torch.optim.Adam``, where it is 0) keeps the
    derivative of the square root finite where a gradient coordinate is exactly zero (its
    derivative there is infinite, and ``inf * 0`` would put NaNs in the hypergradient); the
    default 1e-16 changes the step by a relative ~1e-16 / v. Use ``eps_root=0`` to
    reproduce ``torch.optim.Adam`` exactly.

    Args:
        lr: the step size.
        beta1: decay of the first moment, in [0, 1).
        beta2: decay of the second moment, in [0, 1).
        eps: added to the denominator.
        eps_root: added under the square root (a constant, not a hyperparameter).
    """

    lr: Hyperparameter
    beta1: Hyperparameter = 0.9
    beta2: Hyperparameter = 0.999
    eps: Hyperparameter = 1e-8
    eps_root: float = 1e-16
    hyperparameter_names: ClassVar[tuple[str, ...]] = ("lr", "beta1", "beta2", "eps")

    def __post_init__(self) -> None:
        self._check()
        _check_unit_interval("beta1", self.beta1)
        _check_unit_interval("beta2", self.beta2)
        if not (math.isfinite(self.eps_root) and self.eps_root >= 0.0):
            raise ValueError(f"eps_root must be a finite float >= 0, got {self.eps_root}")

    def init_aux(self, inner: Tensors) -> Tensors:
        return tuple(torch.zeros_like(w) for w in inner + inner)

    def update(
        self,
        step: int,
        inner: Tensors,
        aux: Tensors,
        grad: Tensors,
        hyper: Mapping[str, HyperValue],
    ) -> tuple[Tensors, Tensors]:
        lr, beta1, beta2, eps = hyper["lr"], hyper["beta1"], hyper["beta2"], hyper["eps"]
        first, second = aux[: len(inner)], aux[len(inner) :]
        first = tuple(beta1 * m + (1 - beta1) * g for m, g in zip(first, grad, strict=True))
        second = tuple(beta2 * v + (1 - beta2) * g * g for v, g in zip(second, grad, strict=True))
        correction1 = 1 - beta1**step
        correction2 = 1 - beta2**step
        inner = tuple(
            w - lr * (m / correction1) / (torch.sqrt(v / correction2 + self.eps_root) + eps)
            for w, m, v in zip(inner, first, second, strict=True)
        )
        return inner, first + second
