"""Functional MAML and ANIL inner loops (plain PyTorch), batched over episodes.

MAML (Finn, Abbeel, Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
Networks", ICML 2017) adapts *all* parameters θ of a network by T steps of gradient descent
on an episode's support loss,

    θ_t = θ_{t-1} - η ∇_θ L_support(θ_{t-1}),    θ_0 = the meta-learned initialization,

and meta-learns θ_0 (and optionally η) on the query loss of θ_T. In the bilevel language of
Franceschi et al. (ICML 2018) θ_0 is the outer variable entering only through the
initialization Φ_0 of the inner dynamics; the meta-gradient is the reverse-mode
hypergradient through the T steps (second order: Hessian-vector products), or its
first-order approximation that treats each ∇_θ L_support as a constant.

ANIL (Raghu, Raghu, Bengio, Vinyals, "Rapid Learning or Feature Reuse?", ICLR 2020) adapts
only the linear head on frozen features: the batched closed-form loop of
:func:`metalearn.bilevel.fit_linear_heads` started from the learned head (its ``init``)
instead of zero.

Here the gradient steps are taken with :func:`torch.func.grad` on a functional model and
the B episodes of a meta-batch are vectorized with :func:`torch.func.vmap` (one batched
pass per step instead of a Python loop; a conv layer becomes a grouped convolution). The
result composes with ordinary autograd: a ``.backward()`` of the returned query losses is
the exact meta-gradient. Under ``torch.no_grad()`` (evaluation) the inner gradients are
still computed (``torch.func.grad`` is a function transform, independent of the outer grad
mode) and no outer graph is built.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from metalearn.bilevel.heads import LearningRate

__all__ = [
    "Params",
    "Predict",
    "ParamsCallback",
    "gradient_descent",
    "maml_episodes",
]

#: The functional parameters of a model: name -> tensor (``torch.func.functional_call``).
Params = dict[str, Tensor]

#: ``predict(params, images)``: logits (M, N) of one episode's M images under ``params``.
Predict = Callable[[Params, Tensor], Tensor]

#: ``callback(t, params)``: sees the parameters after t inner steps (monitoring only).
ParamsCallback = Callable[[int, Params], None]


def gradient_descent(
    loss_fn: Callable[[Params], Tensor],
    params: Params,
    steps: int,
    lr: LearningRate,
    first_order: bool = False,
    callback: ParamsCallback | None = None,
) -> Params:
    """``steps`` steps of gradient descent ``θ_t = θ_{t-1} - lr ∇loss_fn(θ_{t-1})`` on a dict.

    The gradients are taken with :func:`torch.func.grad`, so this works inside
    :func:`torch.func.vmap` and under ``torch.no_grad()``. When grad mode is on and
    ``params`` or ``lr`` require grad, the returned parameters keep the graph of all steps
    (second order) unless ``first_order``, which detaches each inner gradient.

    Args:
        loss_fn: scalar loss of the parameters (e.g. the support cross-entropy).
        params: the initial parameters θ_0 (every entry is adapted).
        steps: T >= 0.
        lr: step size η: float or 0-d tensor (may require grad).
        first_order: drop the second-order terms of the meta-gradient.
        callback: ``callback(t, θ_t)`` for t = 0..T.

    Returns:
        θ_T as a new dict.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    gradient = torch.func.grad(loss_fn)
    if callback is not None:
        callback(0, params)
    for step in range(steps):
        grads = gradient(params)
        if first_order:
            grads = {name: g.detach() for name, g in grads.items()}
        params = {name: p - lr * grads[name] for name, p in params.items()}
        if callback is not None:
            callback(step + 1, params)
    return params


def maml_episodes(
    predict: Predict,
    params: Params,
    support: Tensor,
    support_labels: Tensor,
    query: Tensor,
    query_labels: Tensor,
    steps: int,
    lr: LearningRate,
    first_order: bool = False,
    per_step: bool = False,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Adapt ``params`` to each of B episodes by T steps of MAML; query loss and accuracy.

    Every episode starts from the same ``params`` and takes ``steps`` gradient steps on the
    mean cross-entropy of ``predict`` on its support set; the adapted parameters are scored
    on its query set. The episodes are vectorized with :func:`torch.func.vmap`, so
    ``predict`` sees one episode at a time: (S, ...) support or (Q, ...) query images.
    A module with batch statistics (BatchNorm) therefore normalizes each episode's support
    set and query set separately, as in Finn et al.'s code.

    Args:
        predict: ``predict(params, images (M, ...)) -> logits (M, N)``.
        params: the initialization θ_0 (shared by all episodes).
        support: (B, S, ...) support inputs (float).
        support_labels: (B, S) integer labels.
        query: (B, Q, ...) query inputs.
        query_labels: (B, Q) integer labels.
        steps: T, inner steps.
        lr: inner step size η (float or 0-d tensor, may require grad).
        first_order: first-order MAML (each inner gradient treated as a constant).
        per_step: also return the query accuracy after t = 0..T steps.
        chunk_size: episodes per vectorized chunk (``None``: all B at once); bounds memory.

    Returns:
        ``(loss (B,), accuracy (B,), accuracy_per_step (B, T + 1) or None)``.
    """

    def episode(xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        curve: list[Tensor] = []

        def track(step: int, current: Params) -> None:
            if step < steps:  # the last one is the final accuracy below
                curve.append((predict(current, xq).argmax(-1) == yq).float().mean())

        adapted = gradient_descent(
            lambda p: F.cross_entropy(predict(p, xs), ys),
            params,
            steps,
            lr,
            first_order=first_order,
            callback=track if per_step else None,
        )
        logits = predict(adapted, xq)
        loss = F.cross_entropy(logits, yq)
        accuracy = (logits.argmax(-1) == yq).float().mean()
        curve.append(accuracy)
        return loss, accuracy, torch.stack(curve)

    loss, accuracy, curve = torch.func.vmap(episode, chunk_size=chunk_size)(
        support, support_labels, query, query_labels
    )
    return loss, accuracy, curve if per_step else None
