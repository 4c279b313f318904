"""Hypergradients of bilevel problems: reverse (full or truncated), forward and implicit modes.

The bilevel problem of Franceschi et al., "Bilevel Programming for Hyperparameter
Optimization and Meta-Learning" (ICML 2018), Sec. 2, is

    min_λ E(w*(λ), λ)    with    w*(λ) = argmin_w L(w, λ),

with outer variables λ and inner variables w (each a tuple of tensors of any shapes), the
inner objective L (``inner_loss``) and the outer objective E (``outer_loss``). Its Sec. 3
replaces ``w*(λ)`` by ``w_T(λ)``, the result of T steps of an optimization dynamics

    s_0 = (Φ_0(λ), a_0),    s_t = Φ_t(s_{t-1}, λ),    s_t = (w_t, a_t),

(:mod:`metalearn.bilevel.dynamics`), and minimizes the approximate objective
``f_T(λ) = E(w_T(λ), λ)``; under strong convexity of L its minimizers converge to those of
the exact problem as T grows (ICML 2018, Sec. 3, the convergence theorem). With the
Jacobians ``A_t = ∂Φ_t/∂s_{t-1}`` and ``B_t = ∂Φ_t/∂λ`` at ``(s_{t-1}, λ)``,

    ∇f_T(λ) = ∂E/∂λ + Σ_{t=0..T} B_tᵀ A_{t+1}ᵀ ··· A_Tᵀ ∂E/∂s_T,    B_0 = ∂s_0/∂λ.

This module computes it, or approximates ``∇_λ E(w*(λ), λ)``, by four methods (the reverse
mode also truncated) behind one call signature, :func:`hypergradient` (``method=...``):

- ``"reverse"`` (:func:`reverse_hypergradient`): reverse mode, Franceschi et al.,
  "Forward and Reverse Gradient-Based Hyperparameter Optimization" (ICML 2017), Alg. 1,
  and ICML 2018, Alg. 1 (written there for hyper-representations): store ``s_0..s_T``,
  then ``α_T = ∂E/∂s_T`` and, for t = T..1, ``g += B_tᵀ α_t``, ``α_{t-1} = A_tᵀ α_t``,
  each pair one vector-Jacobian product through a recomputed step (Hessian-vector
  products, never a Hessian). Exact for the T-step problem; memory O(T · |s|).
- ``"reverse"`` with ``truncate=K``: the same recursion over the last K steps only (the
  dependence of ``s_{T-K}`` on λ is dropped; Shaban et al., AISTATS 2019). ``K >= T`` is
  the full reverse mode, bit for bit.
- ``"forward"`` (:func:`forward_hypergradient`): forward mode, ICML 2017, Alg. 2: carry
  the tangents ``Z_t = ds_t/dλ_i = A_t Z_{t-1} + B_t e_i`` of every scalar component
  ``λ_i`` along with ``s_t``, each a Jacobian-vector product (by the double-vjp trick),
  and return ``∂E/∂λ_i + <∂E/∂w_T, Z_T^w>``. Exact for the T-step problem; memory
  independent of T, time proportional to the number of scalars in λ (few hyperparameters).
- ``"implicit_cg"`` and ``"implicit_fixed_point"`` (:func:`implicit_cg_hypergradient`,
  :func:`implicit_fixed_point_hypergradient`): the implicit function theorem at the
  inner solution: if ``∇_w L(w*, λ) = 0`` with ``H = ∇²_w L(w*, λ)`` invertible,

      ∇_λ E(w*(λ), λ) = ∂E/∂λ - (∂²L/∂λ∂w)ᵀ v,    H v = ∂E/∂w,

  with ``w*`` approximated by ``w_T`` and the linear system solved by conjugate gradient
  or by the fixed-point (Richardson / Neumann series) iteration
  ``v_{k+1} = v_k - α (H v_k - ∂E/∂w)``, i.e. ``v_K = α Σ_{k<K} (I - αH)^k ∂E/∂w``,
  with Hessian-vector products only.

Implicit methods assume that the dynamics converged to a stationary point of the inner
objective; T is then only the number of steps used to reach it, and the number of CG or
fixed-point iterations is a separate parameter (``solver_steps``). They differentiate the
solution, not the dynamics: the initialization Φ_0 and the dynamics' hyperparameters
(step size, momentum, ...) get a zero hypergradient by construction, and a λ that enters
only through them gets zero. The unrolled methods differentiate the T-step dynamics itself.

All methods return the hypergradient as new tensors (nothing is accumulated into
``.grad``); the outer variables passed in are detached internally. For training loops
that want an ordinary ``.backward()`` instead, :func:`unroll` returns ``w_T`` with the
graph of the T steps (the graph-keeping form of the reverse mode).

Example (ridge regression, λ = (log ρ,)):
    >>> from metalearn.bilevel import GradientDescent
    >>> x, y = torch.randn(20, 3), torch.randn(20)
    >>> problem = BilevelProblem(
    ...     inner_loss=lambda w, lam: ((x @ w[0] - y) ** 2).mean() / 2
    ...     + lam[0].exp() / 2 * w[0].pow(2).sum(),
    ...     outer_loss=lambda w, lam: ((x @ w[0] + 1 - y) ** 2).mean(),
    ...     dynamics=GradientDescent(lr=0.5),
    ...     init=(torch.zeros(3),),
    ... )
    >>> result = hypergradient(problem, (torch.tensor(0.0),), steps=50, method="forward")
    >>> result.grads[0].shape, result.inner[0].shape
    (torch.Size([]), torch.Size([3]))
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

from metalearn.bilevel.dynamics import Dynamics, Tensors

__all__ = [
    "Objective",
    "Init",
    "Method",
    "METHODS",
    "BilevelProblem",
    "Hypergradient",
    "unroll",
    "hypergradient",
    "reverse_hypergradient",
    "forward_hypergradient",
    "implicit_cg_hypergradient",
    "implicit_fixed_point_hypergradient",
]

#: An objective ``(w, λ) -> scalar``: the inner loss L or the outer loss E. It receives the
#: inner and the outer variables as tuples of tensors and returns a 0-d tensor.
Objective = Callable[[Tensors, Tensors], Tensor]

#: The initialization Φ_0: constant tensors (used detached), or a callable ``λ -> w_0``
#: (e.g. ``lambda lam: (lam[0],)`` for a learned initialization).
Init = Sequence[Tensor] | Callable[[Tensors], Sequence[Tensor]]

#: A hypergradient method, see the module docstring.
Method = Literal["reverse", "forward", "implicit_cg", "implicit_fixed_point"]

#: The names of the hypergradient methods.
METHODS: tuple[str, ...] = get_args(Method)

_LinearMap = Callable[[Tensors], Tensors]


@dataclass(frozen=True)
class BilevelProblem:
    """A bilevel problem with an iterative inner solver: what every method differentiates.

    Args:
        inner_loss: L(w, λ), a scalar; the dynamics descend it.
        outer_loss: E(w, λ), a scalar, evaluated at ``w_T``.
        dynamics: the inner optimizer Φ_t (:class:`GradientDescent`, ``HeavyBall``,
            ``Adam``), whose hyperparameters may be outer variables.
        init: Φ_0, constant tensors or a callable of λ giving ``w_0``; the optimizer's
            auxiliary variables start at zero.
    """

    inner_loss: Objective
    outer_loss: Objective
    dynamics: Dynamics
    init: Init

    def __post_init__(self) -> None:
        if not callable(self.inner_loss) or not callable(self.outer_loss):
            raise ValueError("inner_loss and outer_loss must be callables (w, λ) -> scalar")
        if not isinstance(self.dynamics, Dynamics):
            raise ValueError(
                "dynamics must be a Dynamics (GradientDescent, HeavyBall, Adam), "
                f"got {type(self.dynamics).__name__}"
            )
        if not callable(self.init):
            _as_tensors(self.init, "init")

    def initial_inner(self, outer: Tensors) -> Tensors:
        """``w_0 = Φ_0(λ)``: the constant ``init`` detached, or ``init(λ)``."""
        if callable(self.init):
            inner = _as_tensors(self.init(outer), "init(outer)")
        else:
            inner = tuple(w.detach() for w in _as_tensors(self.init, "init"))
        if not inner:
            raise ValueError("init gives no inner variables: it must give at least one tensor")
        return inner


class Hypergradient(NamedTuple):
    """What every hypergradient method returns.

    Attributes:
        grads: ``∇_λ E``, one tensor per outer variable, shaped like it.
        inner: ``w_T``, the inner variables after the T steps (detached).
        value: ``E(w_T, λ)``, the outer objective (detached, 0-d).
    """

    grads: Tensors
    inner: Tensors
    value: Tensor


# ----------------------------------------------------------------------------------------
# Validation and small autograd helpers.
# ----------------------------------------------------------------------------------------


def _as_tensors(values: Sequence[Tensor], what: str) -> Tensors:
    if isinstance(values, Tensor) or not isinstance(values, Sequence):
        raise ValueError(f"{what} must be a tuple or list of tensors, got {type(values).__name__}")
    for i, value in enumerate(values):
        if not isinstance(value, Tensor):
            raise ValueError(f"{what}[{i}] must be a tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise ValueError(f"{what}[{i}] must be a floating-point tensor, got {value.dtype}")
    return tuple(values)


def _check_int(value: int, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _validate(outer: Sequence[Tensor], steps: int) -> Tensors:
    """The outer variables as a tuple, after checking them, ``steps`` and the grad mode."""
    if torch.is_inference_mode_enabled():
        raise ValueError(
            "the bilevel core needs autograd for the inner gradients: it cannot run under "
            "torch.inference_mode(); use torch.no_grad() (or Lightning's "
            "inference_mode=False) instead"
        )
    values = _as_tensors(outer, "outer")
    if not values:
        raise ValueError("outer must hold at least one tensor (the outer variables λ)")
    _check_int(steps, "steps", 0)
    return values


def _prepare(outer: Sequence[Tensor], steps: int) -> Tensors:
    """Validated outer variables, detached into fresh leaves that require grad."""
    return _leaves(_validate(outer, steps))


def _scalar(value: object, what: str) -> Tensor:
    if not isinstance(value, Tensor) or value.dim() != 0:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{what} must return a 0-d tensor, got {shape}")
    return value


def _leaves(tensors: Tensors) -> Tensors:
    return tuple(x.detach().requires_grad_() for x in tensors)


def _vjp(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    cotangents: Sequence[Tensor],
    *,
    create_graph: bool = False,
    retain_graph: bool | None = None,
) -> Tensors:
    """``Σ_k cotangent_kᵀ ∂output_k/∂inputs``; zeros for inputs that no output depends on."""
    pairs = [(o, c) for o, c in zip(outputs, cotangents, strict=True) if o.requires_grad]
    if not pairs:
        return tuple(torch.zeros_like(x) for x in inputs)
    grads = torch.autograd.grad(
        [o for o, _ in pairs],
        list(inputs),
        [c for _, c in pairs],
        create_graph=create_graph,
        retain_graph=retain_graph,
        allow_unused=True,
        materialize_grads=True,
    )
    return tuple(grads)


def _dot(a: Tensors, b: Tensors) -> Tensor:
    total = a[0].new_zeros(())
    for x, y in zip(a, b, strict=True):
        total = total + (x * y).sum()
    return total


def _inner_grad(
    problem: BilevelProblem, inner: Tensors, outer: Tensors, create_graph: bool
) -> tuple[Tensors, Tensors]:
    """``(w, ∇_w L(w, λ))``, with any constant ``w`` made a leaf so that it can be differentiated."""
    inner = tuple(w if w.requires_grad else w.detach().requires_grad_() for w in inner)
    with torch.enable_grad():
        loss = _scalar(problem.inner_loss(inner, outer), "inner_loss")
        grad = _vjp((loss,), inner, (torch.ones_like(loss),), create_graph=create_graph)
    return inner, grad


def _step(
    problem: BilevelProblem,
    step: int,
    inner: Tensors,
    aux: Tensors,
    outer: Tensors,
    create_graph: bool,
) -> tuple[Tensors, Tensors]:
    """``s_t = Φ_t(s_{t-1}, λ)``; without ``create_graph`` the new state carries no graph."""
    inner, grad = _inner_grad(problem, inner, outer, create_graph)
    with torch.set_grad_enabled(create_graph):
        hyper = problem.dynamics.hyperparameters(outer)
        new_inner, new_aux = problem.dynamics.update(step, inner, aux, grad, hyper)
    if len(new_inner) != len(inner) or any(
        a.shape != b.shape for a, b in zip(new_inner, inner, strict=True)
    ):
        raise ValueError(
            f"{type(problem.dynamics).__name__}.update changed the shapes of the inner "
            f"variables: {[tuple(w.shape) for w in inner]} -> "
            f"{[tuple(w.shape) for w in new_inner]}"
        )
    return tuple(new_inner), tuple(new_aux)


def _trajectory(
    problem: BilevelProblem, outer: Tensors, steps: int
) -> Iterator[tuple[Tensors, Tensors]]:
    """``s_0, s_1, ..., s_T`` without a graph (λ is used detached)."""
    constant = tuple(x.detach() for x in outer)
    with torch.no_grad():
        # A copy: a learned w_0 = λ[0] would otherwise share the caller's storage.
        inner = tuple(w.clone() for w in problem.initial_inner(constant))
        aux = problem.dynamics.init_aux(inner)
    yield inner, aux
    for step in range(1, steps + 1):
        inner, aux = _step(problem, step, inner, aux, constant, create_graph=False)
        yield inner, aux


def _final(problem: BilevelProblem, outer: Tensors, steps: int) -> tuple[Tensors, Tensors]:
    return deque(_trajectory(problem, outer, steps), maxlen=1)[0]


def _outer_gradients(
    problem: BilevelProblem, inner: Tensors, outer: Tensors
) -> tuple[Tensor, Tensors, Tensors]:
    """``(E(w, λ), ∂E/∂w, ∂E/∂λ)`` at the given (constant) inner variables."""
    inner = _leaves(inner)
    with torch.enable_grad():
        value = _scalar(problem.outer_loss(inner, outer), "outer_loss")
        grads = _vjp((value,), inner + outer, (torch.ones_like(value),))
    return value.detach(), grads[: len(inner)], grads[len(inner) :]


# ----------------------------------------------------------------------------------------
# The graph-keeping unroll.
# ----------------------------------------------------------------------------------------


def unroll(
    problem: BilevelProblem,
    outer: Sequence[Tensor],
    steps: int,
    *,
    truncate: int | None = None,
) -> Tensors:
    """Run the T steps of the dynamics and return ``w_T``, with its graph when one is wanted.

    If grad mode is on and some outer variable requires grad, the graph of the last
    ``truncate`` steps (all of them, and Φ_0, when ``truncate`` is None or >= T) is kept,
    and an ordinary ``.backward()`` of an outer loss on the result accumulates the
    reverse-mode hypergradient of the T-step problem into the outer variables' ``.grad``
    (it equals :func:`reverse_hypergradient` up to rounding). Memory grows with T as the
    graphs of the steps (and their inner gradients) are kept. Otherwise, e.g. under
    ``torch.no_grad()``, ``w_T`` is returned detached.

    Args:
        problem: the bilevel problem.
        outer: the outer variables λ (the tensors themselves, not copies, are used).
        steps: the number of inner steps T >= 0.
        truncate: keep the graph of the last ``truncate`` steps only (truncated reverse).

    Returns:
        ``w_T``, one tensor per inner variable.
    """
    if truncate is not None:
        _check_int(truncate, "truncate", 0)
    outer = _validate(outer, steps)
    track = torch.is_grad_enabled() and any(x.requires_grad for x in outer)
    first = 0 if truncate is None else max(steps - truncate, 0)
    constant = tuple(x.detach() for x in outer)
    with torch.set_grad_enabled(track and first == 0):
        inner = problem.initial_inner(outer if track and first == 0 else constant)
        aux = problem.dynamics.init_aux(inner)
    for step in range(1, steps + 1):
        graph = track and step > first
        inner, aux = _step(problem, step, inner, aux, outer if graph else constant, graph)
    return inner if track else tuple(w.detach() for w in inner)


# ----------------------------------------------------------------------------------------
# Reverse and forward mode: exact for the T-step problem.
# ----------------------------------------------------------------------------------------


def reverse_hypergradient(
    problem: BilevelProblem,
    outer: Sequence[Tensor],
    steps: int,
    *,
    truncate: int | None = None,
) -> Hypergradient:
    """Reverse-mode hypergradient of ``E(w_T(λ), λ)`` (ICML 2017 Alg. 1; ICML 2018 Alg. 1).

    The forward pass stores the states ``s_0..s_T`` (without a graph); the backward pass
    runs ``α_T = ∂E/∂s_T``, and for t = T..T-K+1 recomputes the step ``Φ_t(s_{t-1}, λ)``
    with its graph and takes one vector-Jacobian product, ``(α_{t-1}, g_t) = (A_tᵀ α_t,
    B_tᵀ α_t)``; finally ``∇f_T = ∂E/∂λ + Σ_t g_t (+ (∂w_0/∂λ)ᵀ α_0 when K >= T)``. The
    second-order terms are Hessian-vector products formed by autograd. Memory: the T + 1
    states and one step's graph.

    Args:
        problem: the bilevel problem.
        outer: the outer variables λ.
        steps: the number of inner steps T >= 0.
        truncate: K, backpropagate through the last K steps only (None: all of them).

    Returns:
        The :class:`Hypergradient` (exact for the T-step problem when K >= T).
    """
    if truncate is not None:
        _check_int(truncate, "truncate", 0)
    outer = _prepare(outer, steps)
    first = 0 if truncate is None else max(steps - truncate, 0)
    states: list[tuple[Tensors, Tensors]] = []
    for step, state in enumerate(_trajectory(problem, outer, steps)):
        if step >= first:
            states.append(state)
    inner_final, aux_final = states[-1]
    value, alpha_inner, total = _outer_gradients(problem, inner_final, outer)
    alpha_aux = tuple(torch.zeros_like(a) for a in aux_final)
    grads = list(total)
    for step in range(steps, first, -1):
        inner_prev, aux_prev = (_leaves(part) for part in states[step - 1 - first])
        with torch.enable_grad():
            inner, aux = _step(problem, step, inner_prev, aux_prev, outer, create_graph=True)
            back = _vjp(inner + aux, inner_prev + aux_prev + outer, alpha_inner + alpha_aux)
        n, m = len(inner_prev), len(aux_prev)
        alpha_inner, alpha_aux = back[:n], back[n : n + m]
        grads = [g + b for g, b in zip(grads, back[n + m :], strict=True)]
    if first == 0:
        with torch.enable_grad():
            inner0 = problem.initial_inner(outer)
            back = _vjp(inner0, outer, alpha_inner)
        grads = [g + b for g, b in zip(grads, back, strict=True)]
    return Hypergradient(tuple(grads), inner_final, value)


def _jvps(outputs: Tensors, inputs: Tensors, tangents: Iterable[Tensors]) -> list[Tensors]:
    """``J v`` for each tangent ``v`` (J = ∂outputs/∂inputs), by the double-vjp trick.

    ``u ↦ Jᵀu`` is linear, so ``J v = ∂/∂u <Jᵀu, v>``: one graph of ``Jᵀu`` at a dummy ``u``,
    then one backward through it per tangent. No forward-mode AD rules are needed, only
    the double backward that the Hessian-vector products need anyway.
    """
    live = [k for k, o in enumerate(outputs) if o.requires_grad]
    zeros = tuple(torch.zeros_like(o) for o in outputs)
    if not live:
        return [zeros for _ in tangents]
    dummies = [torch.zeros_like(outputs[k], requires_grad=True) for k in live]
    transposed = torch.autograd.grad(
        [outputs[k] for k in live], list(inputs), dummies, create_graph=True, allow_unused=True
    )
    used = [(g, k) for k, g in enumerate(transposed) if g is not None and g.requires_grad]
    results = []
    for tangent in tangents:
        products = list(zeros)
        if used:
            live_products = torch.autograd.grad(
                [g for g, _ in used],
                dummies,
                [tangent[k] for _, k in used],
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )
            for k, product in zip(live, live_products, strict=True):
                products[k] = product
        results.append(tuple(products))
    return results


def _basis(outer: Tensors) -> Iterator[Tensors]:
    """The unit tangents ``e_i`` of λ, one per scalar component, in ``torch.cat`` order."""
    for k, x in enumerate(outer):
        for j in range(x.numel()):
            unit = torch.zeros_like(x).view(-1)
            unit[j] = 1.0
            yield tuple(
                unit.view_as(x) if i == k else torch.zeros_like(y) for i, y in enumerate(outer)
            )


def forward_hypergradient(
    problem: BilevelProblem,
    outer: Sequence[Tensor],
    steps: int,
) -> Hypergradient:
    """Forward-mode hypergradient of ``E(w_T(λ), λ)`` (ICML 2017, Alg. 2, Forward-HG).

    For every scalar component ``λ_i`` (P of them in all) the tangent ``Z_t = ds_t/dλ_i``
    of the state, inner and auxiliary variables, is carried along the dynamics:
    ``Z_0 = (∂w_0/∂λ_i, 0)``, ``Z_t = A_t Z_{t-1} + B_t e_i`` (a Jacobian-vector product of
    the step, by the double-vjp trick, see :func:`_jvps`), and at the end
    ``∂f_T/∂λ_i = ∂E/∂λ_i + <∂E/∂w_T, Z_T^w>``. Memory: P tangents of the state's size,
    independent of T; time: P Jacobian-vector products per step. Meant for a few scalar
    hyperparameters (step size, momentum, L2 strength); it works for any λ but is slow
    when P is large, where :func:`reverse_hypergradient` is the method.

    Args:
        problem: the bilevel problem.
        outer: the outer variables λ.
        steps: the number of inner steps T >= 0.

    Returns:
        The :class:`Hypergradient` (exact for the T-step problem).
    """
    outer = _prepare(outer, steps)
    with torch.enable_grad():
        inner0 = problem.initial_inner(outer)
        inner_tangents = _jvps(inner0, outer, _basis(outer))
    inner = tuple(w.detach() for w in inner0)
    aux = problem.dynamics.init_aux(inner)
    tangents = [t + tuple(torch.zeros_like(a) for a in aux) for t in inner_tangents]
    for step in range(1, steps + 1):
        inner_prev, aux_prev = _leaves(inner), _leaves(aux)
        with torch.enable_grad():
            inner, aux = _step(problem, step, inner_prev, aux_prev, outer, create_graph=True)
            directions = (z + e for z, e in zip(tangents, _basis(outer), strict=True))
            tangents = _jvps(inner + aux, inner_prev + aux_prev + outer, directions)
        inner, aux = tuple(w.detach() for w in inner), tuple(a.detach() for a in aux)
    value, d_inner, direct = _outer_gradients(problem, inner, outer)
    indirect = torch.stack([_dot(d_inner, z[: len(inner)]) for z in tangents])
    flat = torch.cat([g.reshape(-1) for g in direct]) + indirect.to(direct[0].dtype)
    grads = tuple(
        part.view_as(x)
        for part, x in zip(flat.split([x.numel() for x in outer]), outer, strict=True)
    )
    return Hypergradient(grads, inner, value)


# ----------------------------------------------------------------------------------------
# Implicit differentiation at the inner solution.
# ----------------------------------------------------------------------------------------


def _implicit(
    problem: BilevelProblem,
    outer: Tensors,
    steps: int,
    solve: Callable[[_LinearMap, Tensors], Tensors],
) -> Hypergradient:
    """``∂E/∂λ - (∂²L/∂λ∂w)ᵀ v`` with ``H v = ∂E/∂w`` solved by ``solve(hvp, ∂E/∂w)`` at w_T."""
    inner_final, _ = _final(problem, outer, steps)
    value, d_inner, direct = _outer_gradients(problem, inner_final, outer)
    inner = _leaves(inner_final)
    with torch.enable_grad():
        loss = _scalar(problem.inner_loss(inner, outer), "inner_loss")
        grad = _vjp((loss,), inner, (torch.ones_like(loss),), create_graph=True)

        def hvp(vector: Tensors) -> Tensors:
            return _vjp(grad, inner, vector, retain_graph=True)

        solution = solve(hvp, d_inner)
        mixed = _vjp(grad, outer, solution)
    grads = tuple(d - m for d, m in zip(direct, mixed, strict=True))
    return Hypergradient(grads, inner_final, value)


def _conjugate_gradient(hvp: _LinearMap, rhs: Tensors, iterations: int, tol: float) -> Tensors:
    """Solve ``H x = rhs`` by CG from ``x = 0``; stop when ``||r|| <= tol ||rhs||``.

    Raises:
        ValueError: if a search direction has non-positive curvature ``pᵀHp <= 0`` (or
            NaN): H is not positive definite, and CG would return garbage.
    """
    solution = tuple(torch.zeros_like(b) for b in rhs)
    residual, direction = rhs, rhs
    rr = float(_dot(residual, residual))
    threshold = tol**2 * rr
    for iteration in range(iterations):
        if rr <= threshold:
            break
        product = hvp(direction)
        curvature = float(_dot(direction, product))
        if not curvature > 0.0:
            raise ValueError(
                "implicit_cg: the Hessian of inner_loss at w_T is not positive definite "
                f"(pᵀHp = {curvature:.3e} <= 0 at CG iteration {iteration}), so w_T is not a "
                "strict local minimum and the implicit hypergradient is undefined there. Run "
                "more inner steps, make the inner problem strongly convex (e.g. an L2 term), "
                "or use method='reverse'"
            )
        step = rr / curvature
        solution = tuple(x + step * p for x, p in zip(solution, direction, strict=True))
        residual = tuple(r - step * hp for r, hp in zip(residual, product, strict=True))
        rr_next = float(_dot(residual, residual))
        direction = tuple(r + (rr_next / rr) * p for r, p in zip(residual, direction, strict=True))
        rr = rr_next
    return solution


def _fixed_point(hvp: _LinearMap, rhs: Tensors, lr: float, iterations: int, tol: float) -> Tensors:
    """Solve ``H v = rhs`` by ``v_{k+1} = v_k + lr (rhs - H v_k)`` from ``v_0 = 0``.

    The residual ``r_k = (I - lr H)^k rhs`` cannot grow when ``0 < lr < 2 / λ_max(H)`` and
    H is positive semi-definite; a residual grown past ``||rhs||`` means it diverges.

    Raises:
        ValueError: if the residual grows (H has a negative eigenvalue, or lr is too large).
    """
    solution = tuple(torch.zeros_like(b) for b in rhs)
    residual = rhs
    norm0 = math.sqrt(float(_dot(rhs, rhs)))
    for iteration in range(iterations):
        norm = math.sqrt(float(_dot(residual, residual)))
        if norm <= tol * norm0:
            break
        if not norm <= (1.0 + 1e-3) * norm0:
            raise ValueError(
                f"implicit_fixed_point diverges: the residual grew from {norm0:.3e} to "
                f"{norm:.3e} in {iteration} iterations. It converges when the Hessian H of "
                f"inner_loss at w_T is positive definite and 0 < solver_lr < 2 / λ_max(H); "
                f"reduce solver_lr (now {lr}) or check that w_T is a minimum"
            )
        solution = tuple(v + lr * r for v, r in zip(solution, residual, strict=True))
        residual = tuple(b - hv for b, hv in zip(rhs, hvp(solution), strict=True))
    return solution


def _check_solver(solver_steps: int, solver_tol: float) -> None:
    _check_int(solver_steps, "solver_steps", 0)
    if not (isinstance(solver_tol, int | float) and 0.0 <= solver_tol < math.inf):
        raise ValueError(f"solver_tol must be a finite float >= 0, got {solver_tol!r}")


def implicit_cg_hypergradient(
    problem: BilevelProblem,
    outer: Sequence[Tensor],
    steps: int,
    *,
    solver_steps: int = 100,
    solver_tol: float = 1e-10,
) -> Hypergradient:
    """Implicit hypergradient at ``w_T``, with ``H v = ∂E/∂w`` solved by conjugate gradient.

    Assumes ``w_T`` (after T steps of the dynamics) is a stationary point of the inner
    loss with a positive definite Hessian H (e.g. a strongly convex inner problem); the
    initialization and the dynamics' hyperparameters get a zero hypergradient. CG runs at
    most ``solver_steps`` Hessian-vector products and stops when the residual
    ``||∂E/∂w - H v|| <= solver_tol ||∂E/∂w||``; in exact arithmetic it is exact after
    ``dim(w)`` iterations. If a search direction with ``pᵀHp <= 0`` appears (H not
    positive definite, e.g. w_T not at a minimum or a concave inner loss), it raises a
    ValueError rather than return garbage; an indefinite H whose negative directions CG
    never meets goes unnoticed (CG then solves the system all the same).

    Args:
        problem: the bilevel problem.
        outer: the outer variables λ.
        steps: the number of inner steps T used to reach the inner solution.
        solver_steps: the most CG iterations.
        solver_tol: the relative residual at which CG stops.

    Returns:
        The :class:`Hypergradient` (an approximation of the exact bilevel hypergradient).
    """
    outer = _prepare(outer, steps)
    _check_solver(solver_steps, solver_tol)
    return _implicit(
        problem,
        outer,
        steps,
        lambda hvp, rhs: _conjugate_gradient(hvp, rhs, solver_steps, solver_tol),
    )


def implicit_fixed_point_hypergradient(
    problem: BilevelProblem,
    outer: Sequence[Tensor],
    steps: int,
    *,
    solver_lr: float,
    solver_steps: int = 100,
    solver_tol: float = 1e-10,
) -> Hypergradient:
    """Implicit hypergradient at ``w_T``, with ``H v = ∂E/∂w`` solved by fixed-point iteration.

    The iteration ``v_{k+1} = v_k - α (H v_k - ∂E/∂w)`` from ``v_0 = 0`` gives the truncated
    Neumann series ``v_K = α Σ_{k<K} (I - αH)^k ∂E/∂w`` of ``H⁻¹ ∂E/∂w``; it converges
    linearly when ``0 < α < 2 / λ_max(H)`` and H is positive definite (with gradient
    descent dynamics, α = the inner step size is the fixed point of the dynamics' own
    Jacobian). Same assumptions as :func:`implicit_cg_hypergradient`. A growing residual
    (α too large or H indefinite) raises a ValueError.

    Args:
        problem: the bilevel problem.
        outer: the outer variables λ.
        steps: the number of inner steps T used to reach the inner solution.
        solver_lr: the step α of the iteration (required: its right scale is 1 / ||H||).
        solver_steps: the number of iterations K (Hessian-vector products).
        solver_tol: the relative residual at which the iteration stops early.

    Returns:
        The :class:`Hypergradient` (an approximation of the exact bilevel hypergradient).
    """
    outer = _prepare(outer, steps)
    _check_solver(solver_steps, solver_tol)
    if not (
        isinstance(solver_lr, int | float)
        and not isinstance(solver_lr, bool)
        and 0.0 < solver_lr < math.inf
    ):
        raise ValueError(f"solver_lr must be a finite float > 0, got {solver_lr!r}")
    return _implicit(
        problem,
        outer,
        steps,
        lambda hvp, rhs: _fixed_point(hvp, rhs, float(solver_lr), solver_steps, solver_tol),
    )


# ----------------------------------------------------------------------------------------
# One call signature for all methods.
# ----------------------------------------------------------------------------------------


def hypergradient(
    problem: BilevelProblem,
    outer: Sequence[Tensor],
    steps: int,
    *,
    method: Method = "reverse",
    truncate: int | None = None,
    solver_steps: int | None = None,
    solver_tol: float | None = None,
    solver_lr: float | None = None,
) -> Hypergradient:
    """The hypergradient ``∇_λ E`` of a bilevel problem by any method, with one signature.

    Args:
        problem: the bilevel problem (inner and outer losses, dynamics, initialization).
        outer: the outer variables λ, a tuple or list of floating-point tensors.
        steps: the number of inner steps T >= 0. For the implicit methods, the steps used
            to reach the inner solution.
        method: ``"reverse"``, ``"forward"``, ``"implicit_cg"`` or ``"implicit_fixed_point"``
            (see the module docstring).
        truncate: ``"reverse"`` only: backpropagate through the last K steps (None: all).
        solver_steps: implicit methods only: the most CG / fixed-point iterations
            (default 100).
        solver_tol: implicit methods only: the relative residual that stops the solver
            (default 1e-10).
        solver_lr: ``"implicit_fixed_point"`` only, and required there: its step α.

    Returns:
        The :class:`Hypergradient` ``(grads, inner, value)``.

    Raises:
        ValueError: for an unknown method, an option that the method does not take, or
            invalid values (see the methods).
    """
    if method not in METHODS:
        raise ValueError(f"unknown hypergradient method {method!r}; choose one of {METHODS}")
    if truncate is not None and method != "reverse":
        raise ValueError(f"truncate applies to method='reverse' only, not to method={method!r}")
    implicit = method in ("implicit_cg", "implicit_fixed_point")
    if not implicit and (solver_steps is not None or solver_tol is not None):
        raise ValueError(
            "solver_steps and solver_tol apply to the implicit methods only, not to "
            f"method={method!r}"
        )
    if solver_lr is not None and method != "implicit_fixed_point":
        raise ValueError(
            f"solver_lr applies to method='implicit_fixed_point' only, not to method={method!r}"
        )
    if method == "reverse":
        return reverse_hypergradient(problem, outer, steps, truncate=truncate)
    if method == "forward":
        return forward_hypergradient(problem, outer, steps)
    solver_steps = 100 if solver_steps is None else solver_steps
    solver_tol = 1e-10 if solver_tol is None else solver_tol
    if method == "implicit_cg":
        return implicit_cg_hypergradient(
            problem, outer, steps, solver_steps=solver_steps, solver_tol=solver_tol
        )
    if solver_lr is None:
        raise ValueError(
            "method='implicit_fixed_point' needs solver_lr, the step α of "
            "v <- v - α (H v - ∂E/∂w); it converges for 0 < α < 2 / λ_max(H), e.g. the "
            "step size of converging gradient-descent dynamics"
        )
    return implicit_fixed_point_hypergradient(
        problem,
        outer,
        steps,
        solver_lr=solver_lr,
        solver_steps=solver_steps,
        solver_tol=solver_tol,
    )
