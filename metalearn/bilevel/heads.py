"""Batched inner solver for episode heads: T steps of gradient descent on B linear classifiers.

This is the inner problem of the hyper-representation model of Franceschi et al., "Bilevel
Programming for Hyperparameter Optimization and Meta-Learning" (ICML 2018), Sec. 3: for
every episode j the inner variables are a linear softmax classifier ``(W_j, b_j)`` on the
features ``h_λ(x)`` of the episode's support set, started at zero and trained by ``T`` steps
of gradient descent,

    w_t = Φ(w_{t-1}, λ) = w_{t-1} - η ∇_w L_j(w_{t-1}),
    L_j(W, b) = mean_s CE(softmax(x_s W + b), y_s) + l2/2 ||W||².

The gradient of the mean cross-entropy is written in closed form,
``∇_W L = Xᵀ (softmax(XW + b) - Y) / S + l2 W`` and ``∇_b L = 1ᵀ (softmax(XW + b) - Y) / S``,
so the T steps are a handful of batched matrix products per step and need no autograd of
their own. When the inputs require grad the graph of the T steps is kept: one ordinary
``.backward()`` of an outer loss on the returned heads is the exact reverse-mode
hypergradient of the T-step problem (the paper's Algorithm 1); autograd forms the
Hessian-vector products, never a Hessian.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["fit_linear_heads", "head_gradient", "head_logits", "LearningRate", "StepCallback"]

#: A step size: a Python float, a 0-d tensor, or a tensor of shape (B,) (one per episode).
#: A tensor that requires grad makes the step size an outer variable.
LearningRate = float | Tensor

#: ``callback(t, weight, bias)``: sees the heads after t inner steps.
StepCallback = Callable[[int, Tensor, Tensor], None]


def head_logits(features: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Logits of B linear heads on their episodes' features.

    Args:
        features: (B, M, d) features of M examples per episode.
        weight: (B, d, N) head weights.
        bias: (B, N) head biases.

    Returns:
        (B, M, N) logits ``features @ weight + bias``.
    """
    return torch.baddbmm(bias.unsqueeze(1), features, weight)


def head_gradient(
    features: Tensor, targets: Tensor, weight: Tensor, bias: Tensor, l2: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Closed-form gradient of the regularized mean cross-entropy of B linear heads.

    Args:
        features: (B, S, d) support features.
        targets: (B, S, N) one-hot support labels, same dtype as ``features``.
        weight: (B, d, N) head weights.
        bias: (B, N) head biases.
        l2: strength of the ``l2/2 ||W||²`` penalty (the bias is not penalized).

    Returns:
        ``(grad_weight, grad_bias)`` with shapes (B, d, N) and (B, N).
    """
    residual = (torch.softmax(head_logits(features, weight, bias), dim=-1) - targets) / (
        features.shape[1]
    )
    grad_weight = torch.bmm(features.transpose(1, 2), residual)
    if l2:
        grad_weight = grad_weight + l2 * weight
    return grad_weight, residual.sum(dim=1)


def _check_inputs(
    support_features: Tensor,
    support_labels: Tensor,
    ways: int,
    steps: int,
    lr: LearningRate,
    truncate: int | None,
    init: tuple[Tensor, Tensor] | None = None,
) -> None:
    if support_features.dim() != 3:
        raise ValueError(
            f"support_features must have shape (B, S, d), got {tuple(support_features.shape)}"
        )
    if support_labels.shape != support_features.shape[:2]:
        raise ValueError(
            f"support_labels must have shape {tuple(support_features.shape[:2])}, "
            f"got {tuple(support_labels.shape)}"
        )
    if support_labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(
            f"support_labels must be integer class indices, got {support_labels.dtype}"
        )
    if ways < 1:
        raise ValueError(f"ways must be >= 1, got {ways}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if truncate is not None and truncate < 0:
        raise ValueError(f"truncate must be None or >= 0, got {truncate}")
    if isinstance(lr, Tensor) and lr.dim() > 0 and lr.shape != support_features.shape[:1]:
        raise ValueError(
            f"a tensor lr must be 0-d or have shape (B,) = {tuple(support_features.shape[:1])}, "
            f"got {tuple(lr.shape)}"
        )
    if init is not None:
        weight, bias = init
        batch, _, dim = support_features.shape
        if weight.shape not in ((dim, ways), (batch, dim, ways)) or bias.shape not in (
            (ways,),
            (batch, ways),
        ):
            raise ValueError(
                f"the head initialization has shapes {tuple(weight.shape)} and "
                f"{tuple(bias.shape)}; {batch} episodes with {dim}-d features and {ways} ways "
                f"need ({dim}, {ways}) or ({batch}, {dim}, {ways}), and ({ways},) or ({batch}, {ways})"
            )


def fit_linear_heads(
    support_features: Tensor,
    support_labels: Tensor,
    ways: int,
    steps: int,
    lr: LearningRate,
    l2: float = 0.0,
    truncate: int | None = None,
    first_order: bool = False,
    callback: StepCallback | None = None,
    init: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Train B linear softmax heads from zero by ``steps`` steps of gradient descent.

    All B episodes are solved at once with batched matrix products. Each head minimizes
    ``mean_s CE(x_s W + b, y_s) + l2/2 ||W||²`` over its own support set, starting at
    ``W = 0, b = 0``, with the update ``w_t = w_{t-1} - lr * ∇L(w_{t-1})``.

    Differentiability: if grad mode is on and ``support_features`` or ``lr`` requires grad,
    the graph of the (last ``truncate``) steps is kept, and backpropagating an outer loss
    through the returned heads gives the exact reverse-mode hypergradient of the T-step
    problem with respect to the features (hence the backbone) and ``lr``. Under
    ``torch.no_grad()`` (evaluation) the heads are computed without a graph and returned
    detached; the inner gradient is in closed form, so no autograd is needed for that.

    Args:
        support_features: (B, S, d) features of the S support examples of each episode.
        support_labels: (B, S) integer labels in ``[0, ways)``.
        ways: number of classes N of every episode.
        steps: number of inner gradient steps T (0 returns the zero heads).
        lr: inner step size η: float, 0-d tensor or (B,) tensor; may require grad.
        l2: L2 penalty on W (not on b); ``l2 > 0`` makes the inner problem strongly convex.
        truncate: backpropagate through the last ``truncate`` steps only (truncated
            reverse mode); the earlier steps run without a graph. ``None`` keeps all steps.
        first_order: treat each inner gradient as a constant (drop the second-order
            terms); the heads then depend on ``lr`` but not on the features through the
            inner steps.
        callback: called as ``callback(t, weight, bias)`` with the heads after t steps, for
            t = 0 (the zero heads) .. ``steps``; for monitoring (e.g. query accuracy against
            the inner step), it must not modify the tensors.
        init: start from ``(weight, bias)`` instead of zero: (d, ways) and (ways,) shared by
            the episodes, or (B, d, ways) and (B, ways); e.g. a learned initialization
            (ANIL: Raghu et al. 2020 adapt only the head, from a meta-learned one). When it
            requires grad the returned heads depend on it through the kept steps.

    Returns:
        ``(weight, bias)`` of shapes (B, d, ways) and (B, ways), in the features' dtype.

    Example:
        >>> x, y = torch.randn(4, 5, 8), torch.arange(5).repeat(4, 1)
        >>> w, b = fit_linear_heads(x, y, ways=5, steps=5, lr=0.5)
        >>> w.shape, b.shape
        (torch.Size([4, 8, 5]), torch.Size([4, 5]))
    """
    _check_inputs(support_features, support_labels, ways, steps, lr, truncate, init)
    batch, _, dim = support_features.shape
    features = support_features
    targets = F.one_hot(support_labels.long(), ways).to(features.dtype)
    if init is None:
        weight, bias = features.new_zeros(batch, dim, ways), features.new_zeros(batch, ways)
    else:
        weight = init[0].to(features.dtype).expand(batch, dim, ways)
        bias = init[1].to(features.dtype).expand(batch, ways)
    lr_w: LearningRate
    lr_b: LearningRate
    if isinstance(lr, Tensor):
        lr = lr.to(features.dtype)
        lr_w, lr_b = (lr, lr) if lr.dim() == 0 else (lr.view(-1, 1, 1), lr.view(-1, 1))
    else:
        lr_w = lr_b = lr

    needs_graph = torch.is_grad_enabled() and (
        features.requires_grad
        or (isinstance(lr, Tensor) and lr.requires_grad)
        or (init is not None and (init[0].requires_grad or init[1].requires_grad))
    )
    first_tracked = 0 if truncate is None else max(steps - truncate, 0)
    if callback is not None:
        callback(0, weight, bias)
    for step in range(steps):
        track = needs_graph and step >= first_tracked
        with torch.set_grad_enabled(track):
            grad_weight, grad_bias = head_gradient(features, targets, weight, bias, l2)
            if first_order:
                grad_weight, grad_bias = grad_weight.detach(), grad_bias.detach()
            weight = weight - lr_w * grad_weight
            bias = bias - lr_b * grad_bias
        if callback is not None:
            callback(step + 1, weight, bias)
    if not needs_graph:
        weight, bias = weight.detach(), bias.detach()
    return weight, bias
