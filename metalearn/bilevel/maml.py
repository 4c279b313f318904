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
    "PredictQuery",
    "ParamsCallback",
    "gradient_descent",
    "maml_episodes",
    "maml_logits",
]

#: The functional parameters of a model: name -> tensor (``torch.func.functional_call``).
Params = dict[str, Tensor]

#: ``predict(params, images)``: logits (M, N) of one episode's M images under ``params``.
Predict = Callable[[Params, Tensor], Tensor]

#: ``predict_query(params, support, query)``: logits (Q, N) of one episode's Q query images
#: under ``params``, given its support images (S, ...) (e.g. for BatchNorm statistics taken
#: from the support set).
PredictQuery = Callable[[Params, Tensor, Tensor], Tensor]

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


def maml_logits(
    predict: Predict,
    params: Params,
    support: Tensor,
    support_labels: Tensor,
    query: Tensor,
    steps: int,
    lr: LearningRate,
    first_order: bool = False,
    query_labels: Tensor | None = None,
    chunk_size: int | None = None,
    predict_query: PredictQuery | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Adapt ``params`` to each of B episodes by T steps of MAML; the query logits.

    Every episode starts from the same ``params`` and takes ``steps`` gradient steps on the
    mean cross-entropy of ``predict`` on its support set; the adapted parameters score its
    query set. The episodes are vectorized with :func:`torch.func.vmap`, so ``predict``
    sees one episode at a time: (S, ...) support or (Q, ...) query images. A module with
    batch statistics (BatchNorm) therefore normalizes each episode's support set and query
    set separately, as in Finn et al.'s code, unless ``predict_query`` scores the query
    images another way (e.g. with the support set's statistics).

    Args:
        predict: ``predict(params, images (M, ...)) -> logits (M, N)``.
        params: the initialization θ_0 (shared by all episodes).
        support: (B, S, ...) support inputs (float).
        support_labels: (B, S) integer labels.
        query: (B, Q, ...) query inputs.
        steps: T, inner steps.
        lr: inner step size η (float or 0-d tensor, may require grad).
        first_order: first-order MAML (each inner gradient treated as a constant).
        query_labels: (B, Q) labels; given, the query accuracy after t = 0..T steps is
            returned too.
        chunk_size: episodes per vectorized chunk (``None``: all B at once); bounds memory.
        predict_query: ``predict_query(params, support (S, ...), query (Q, ...))`` ->
            (Q, N) logits; ``None``: ``predict(params, query)``.

    Returns:
        ``(logits (B, Q, N), accuracy_per_step (B, T + 1) or None)``.
    """
    per_step = query_labels is not None

    def score(current: Params, xs: Tensor, xq: Tensor) -> Tensor:
        return predict(current, xq) if predict_query is None else predict_query(current, xs, xq)

    def episode(xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> tuple[Tensor, Tensor]:
        curve: list[Tensor] = []

        def track(step: int, current: Params) -> None:
            if step < steps:  # the last one is the final accuracy below
                curve.append((score(current, xs, xq).argmax(-1) == yq).float().mean())

        adapted = gradient_descent(
            lambda p: F.cross_entropy(predict(p, xs), ys),
            params,
            steps,
            lr,
            first_order=first_order,
            callback=track if per_step else None,
        )
        logits = score(adapted, xs, xq)
        curve.append((logits.argmax(-1) == yq).float().mean())
        return logits, torch.stack(curve)

    labels = query_labels if query_labels is not None else query.new_zeros(query.shape[:2]).long()
    logits, curve = torch.func.vmap(episode, chunk_size=chunk_size)(
        support, support_labels, query, labels
    )
    return logits, curve if per_step else None


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
    """Per-episode query loss and accuracy of :func:`maml_logits` (same arguments;
    ``per_step``: also the query accuracy after t = 0..T steps).

    Returns:
        ``(loss (B,), accuracy (B,), accuracy_per_step (B, T + 1) or None)``.
    """
    logits, curve = maml_logits(
        predict,
        params,
        support,
        support_labels,
        query,
        steps,
        lr,
        first_order=first_order,
        query_labels=query_labels if per_step else None,
        chunk_size=chunk_size,
    )
    loss = F.cross_entropy(logits.transpose(1, 2), query_labels, reduction="none").mean(1)
    accuracy = (logits.argmax(-1) == query_labels).float().mean(1)
    return loss, accuracy, curve
