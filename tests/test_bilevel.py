"""Math tests of the batched head solver and its hypergradients, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import jacobian

from metalearn.bilevel import fit_linear_heads, head_gradient, head_logits


@pytest.fixture(autouse=True)
def _float64():
    """Every tensor of these tests is float64 (restored afterwards for the other tests)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def make_problem(batch=3, ways=3, shots=2, queries=2, dim=4, seed=0):
    """A tiny few-shot problem: support/query features and labels for `batch` episodes."""
    gen = torch.Generator().manual_seed(seed)
    support = torch.randn(batch, ways * shots, dim, generator=gen)
    query = torch.randn(batch, ways * queries, dim, generator=gen)
    support_labels = torch.arange(ways).repeat_interleave(shots).repeat(batch, 1)
    query_labels = torch.arange(ways).repeat_interleave(queries).repeat(batch, 1)
    return support, support_labels, query, query_labels


def outer_loss(weight, bias, query, query_labels):
    logits = head_logits(query, weight, bias)
    return F.cross_entropy(logits.flatten(0, 1), query_labels.flatten())


# ----------------------------------------------------------------------------------------
# A reference written the slow way: one episode, the state w = (vec W, b) as a flat vector,
# the step map Φ(w, x, η) = w - η ∇L(w), and the paper's Algorithm 1 (reverse-mode):
#   α_T = ∂E/∂w_T;  for t = T..1:  g += B_tᵀ α_t,  α_{t-1} = A_tᵀ α_t,
# with A_t = ∂Φ/∂w and B_t = ∂Φ/∂λ evaluated at (w_{t-1}, λ) as explicit Jacobians.
# ----------------------------------------------------------------------------------------


def flat_step(state, x, lr, labels, ways, l2):
    dim = x.shape[-1]
    weight = state[: dim * ways].view(1, dim, ways)
    bias = state[dim * ways :].view(1, ways)
    targets = F.one_hot(labels, ways).to(x.dtype).unsqueeze(0)
    grad_w, grad_b = head_gradient(x.unsqueeze(0), targets, weight, bias, l2)
    return torch.cat([(weight - lr * grad_w).flatten(), (bias - lr * grad_b).flatten()])


def flat_loss(state, query, query_labels, ways):
    dim = query.shape[-1]
    weight = state[: dim * ways].view(1, dim, ways)
    bias = state[dim * ways :].view(1, ways)
    return outer_loss(weight, bias, query.unsqueeze(0), query_labels.unsqueeze(0))


def algorithm1(x, labels, query, query_labels, ways, steps, lr, l2=0.0, last=None):
    """Reverse-mode hypergradient (w.r.t. support features x and lr) by explicit Jacobians.

    `last` keeps only the last `last` steps of the recursion (truncated reverse mode).
    """
    dim = x.shape[-1]
    lr = torch.as_tensor(lr, dtype=x.dtype)
    states = [x.new_zeros(dim * ways + ways)]
    for _ in range(steps):
        states.append(flat_step(states[-1], x, lr, labels, ways, l2))
    alpha = torch.autograd.grad(
        flat_loss(states[-1].requires_grad_(), query, query_labels, ways), states[-1]
    )[0]
    grad_x, grad_lr = torch.zeros_like(x), torch.zeros(())
    first = 1 if last is None else steps - last + 1
    for t in range(steps, first - 1, -1):
        prev = states[t - 1].detach()
        a_t, b_x, b_lr = jacobian(
            lambda s, xx, e: flat_step(s, xx, e, labels, ways, l2), (prev, x, lr)
        )
        grad_x += torch.einsum("i,i...->...", alpha, b_x)
        grad_lr += alpha @ b_lr
        alpha = a_t.T @ alpha
    return grad_x, grad_lr


def autograd_hypergradient(x, labels, query, query_labels, ways, steps, lr, **kwargs):
    x = x.clone().requires_grad_()
    lr = torch.tensor(float(lr), requires_grad=True)
    weight, bias = fit_linear_heads(x, labels, ways, steps, lr, **kwargs)
    loss = outer_loss(weight, bias, query, query_labels)
    return torch.autograd.grad(loss, (x, lr))


# ----------------------------------------------------------------------------------------


def test_shapes_dtype_and_zero_steps():
    support, labels, _, _ = make_problem(batch=2, ways=3, dim=5)
    weight, bias = fit_linear_heads(support.float(), labels, 3, steps=4, lr=0.1)
    assert weight.shape == (2, 5, 3) and bias.shape == (2, 3)
    assert weight.dtype == torch.float32
    weight, bias = fit_linear_heads(support, labels, 3, steps=0, lr=0.1)
    assert torch.count_nonzero(weight) == 0 and torch.count_nonzero(bias) == 0


def test_gradcheck_tiny_problem():
    support, labels, query, query_labels = make_problem(batch=2, ways=2, shots=2, dim=3)
    lr = torch.tensor(0.7, requires_grad=True)
    support.requires_grad_()

    def fn(x, eta):
        weight, bias = fit_linear_heads(x, labels, 2, steps=3, lr=eta, l2=0.1)
        return weight, bias

    assert torch.autograd.gradcheck(fn, (support, lr))
    assert torch.autograd.gradgradcheck(fn, (support, lr))


def test_batched_equals_per_episode_loop():
    support, labels, query, query_labels = make_problem(batch=4, ways=3, shots=3, dim=6)
    support.requires_grad_()
    lr = torch.tensor(0.3, requires_grad=True)
    weight, bias = fit_linear_heads(support, labels, 3, steps=6, lr=lr, l2=0.05)
    loss = outer_loss(weight, bias, query, query_labels) * len(support)
    grads = torch.autograd.grad(loss, (support, lr))

    loop_lr_grad = torch.zeros(())
    for j in range(len(support)):
        x = support[j : j + 1].detach().requires_grad_()
        lr_j = lr.detach().clone().requires_grad_()
        w_j, b_j = fit_linear_heads(x, labels[j : j + 1], 3, steps=6, lr=lr_j, l2=0.05)
        torch.testing.assert_close(w_j[0], weight[j], rtol=0, atol=1e-12)
        torch.testing.assert_close(b_j[0], bias[j], rtol=0, atol=1e-12)
        loss_j = outer_loss(w_j, b_j, query[j : j + 1], query_labels[j : j + 1])
        g_x, g_lr = torch.autograd.grad(loss_j, (x, lr_j))
        torch.testing.assert_close(g_x[0], grads[0][j], rtol=1e-10, atol=1e-12)
        loop_lr_grad += g_lr
    torch.testing.assert_close(loop_lr_grad, grads[1], rtol=1e-10, atol=1e-12)


def test_per_episode_learning_rates():
    support, labels, _, _ = make_problem(batch=3)
    rates = torch.tensor([0.1, 0.5, 1.0])
    weight, _ = fit_linear_heads(support, labels, 3, steps=3, lr=rates)
    for j, rate in enumerate(rates):
        w_j, _ = fit_linear_heads(support[j : j + 1], labels[j : j + 1], 3, 3, float(rate))
        torch.testing.assert_close(w_j[0], weight[j])


@pytest.mark.parametrize("l2", [0.0, 0.2])
def test_hypergradient_equals_algorithm1(l2):
    support, labels, query, query_labels = make_problem(batch=1, ways=3, shots=2, dim=4)
    x, y, q, qy = support[0], labels[0], query[0], query_labels[0]
    ref_x, ref_lr = algorithm1(x, y, q, qy, ways=3, steps=5, lr=0.8, l2=l2)
    got_x, got_lr = autograd_hypergradient(support, labels, query, query_labels, 3, 5, 0.8, l2=l2)
    torch.testing.assert_close(got_x[0], ref_x, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got_lr, ref_lr, rtol=1e-9, atol=1e-12)


def test_truncated_hypergradient_equals_truncated_recursion():
    support, labels, query, query_labels = make_problem(batch=1, ways=3, shots=2, dim=4, seed=1)
    x, y, q, qy = support[0], labels[0], query[0], query_labels[0]
    for keep in (1, 3):
        ref_x, ref_lr = algorithm1(x, y, q, qy, ways=3, steps=6, lr=0.5, last=keep)
        got_x, got_lr = autograd_hypergradient(
            support, labels, query, query_labels, 3, 6, 0.5, truncate=keep
        )
        torch.testing.assert_close(got_x[0], ref_x, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got_lr, ref_lr, rtol=1e-9, atol=1e-12)
    # K = T (and K > T) is the full reverse mode.
    full = autograd_hypergradient(support, labels, query, query_labels, 3, 6, 0.5)
    for keep in (6, 10):
        trunc = autograd_hypergradient(
            support, labels, query, query_labels, 3, 6, 0.5, truncate=keep
        )
        for a, b in zip(full, trunc, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_one_step_closed_form():
    """T = 1 from zero: W_1 = -η Xᵀ(1/N - Y)/S, so dE/dη = -<∂E/∂W_1, g_0> - <∂E/∂b_1, g_b0>."""
    support, labels, query, query_labels = make_problem(batch=2, ways=4, shots=1, dim=3, seed=2)
    lr = 0.9
    targets = F.one_hot(labels, 4).double()
    g_w = support.transpose(1, 2) @ (0.25 - targets) / support.shape[1]
    g_b = (0.25 - targets).sum(1) / support.shape[1]
    weight, bias = fit_linear_heads(support, labels, 4, steps=1, lr=lr)
    torch.testing.assert_close(weight, -lr * g_w)
    torch.testing.assert_close(bias, -lr * g_b)
    w1 = (-lr * g_w).requires_grad_()
    b1 = (-lr * g_b).requires_grad_()
    d_w, d_b = torch.autograd.grad(outer_loss(w1, b1, query, query_labels), (w1, b1))
    expected = -(d_w * g_w).sum() - (d_b * g_b).sum()
    _, got_lr = autograd_hypergradient(support, labels, query, query_labels, 4, 1, lr)
    torch.testing.assert_close(got_lr, expected)


def test_first_order_drops_second_order_terms():
    support, labels, query, query_labels = make_problem(batch=2, ways=3, shots=2, dim=4, seed=3)
    x = support.clone().requires_grad_()
    lr = torch.tensor(0.6, requires_grad=True)
    weight, bias = fit_linear_heads(x, labels, 3, steps=4, lr=lr, first_order=True)
    # Exact heads, first-order graph: W_T = -η Σ_t stopgrad(g_t), hence dE/dη = -Σ_t <∂E/∂w_T, g_t>.
    exact_w, exact_b = fit_linear_heads(support, labels, 3, steps=4, lr=0.6)
    torch.testing.assert_close(weight, exact_w)
    torch.testing.assert_close(bias, exact_b)
    loss = outer_loss(weight, bias, query, query_labels)
    (g_lr,) = torch.autograd.grad(loss, (lr,), retain_graph=True)
    assert weight.requires_grad
    assert torch.autograd.grad(loss, (x,), allow_unused=True)[0] is None
    d_w, d_b = torch.autograd.grad(
        outer_loss(exact_w.requires_grad_(), exact_b.requires_grad_(), query, query_labels),
        (exact_w, exact_b),
    )
    targets = F.one_hot(labels, 3).double()
    w, b, expected = torch.zeros(2, 4, 3), torch.zeros(2, 3), torch.zeros(())
    for _ in range(4):
        gw, gb = head_gradient(support, targets, w, b)
        expected -= (d_w * gw).sum() + (d_b * gb).sum()
        w, b = w - 0.6 * gw, b - 0.6 * gb
    torch.testing.assert_close(g_lr, expected)


def test_no_grad_returns_detached_heads():
    support, labels, _, _ = make_problem()
    x = support.clone().requires_grad_()
    lr = torch.tensor(0.5, requires_grad=True)
    with torch.no_grad():
        weight, bias = fit_linear_heads(x, labels, 3, steps=5, lr=lr)
    assert not weight.requires_grad and not bias.requires_grad
    ref_w, ref_b = fit_linear_heads(x, labels, 3, steps=5, lr=lr)
    assert ref_w.requires_grad
    torch.testing.assert_close(weight, ref_w.detach())
    torch.testing.assert_close(bias, ref_b.detach())
    with torch.inference_mode():
        inf_w, _ = fit_linear_heads(support, labels, 3, steps=5, lr=0.5)
    torch.testing.assert_close(inf_w, ref_w.detach())


def strongly_convex_problem():
    support, labels, query, query_labels = make_problem(batch=1, ways=3, shots=3, dim=4, seed=4)
    return support * 0.7, labels, query, query_labels, 0.5  # l2 = 0.5


def test_converges_to_minimizer():
    support, labels, _, _, l2 = strongly_convex_problem()
    weight, bias = fit_linear_heads(support, labels, 3, steps=500, lr=0.5, l2=l2)
    grad_w, grad_b = head_gradient(support, F.one_hot(labels, 3).double(), weight, bias, l2)
    assert grad_w.norm() < 1e-12 and grad_b.norm() < 1e-12
    # Gradient descent from zero keeps the biases summing to zero (softmax shift invariance).
    assert bias.sum().abs() < 1e-12


def implicit_hypergradient(support, labels, query, query_labels, l2):
    """Hypergradient of E(w*(x)) w.r.t. the support features by the implicit function theorem.

    At the minimizer ∇_w L(w*, x) = 0, so dE/dx = -(∂²L/∂x∂w)ᵀ H⁺ ∂E/∂w with H = ∂²L/∂w².
    The pseudo-inverse handles the bias direction 1 (softmax is shift invariant), along
    which H is singular; ∂E/∂w and the mixed term are orthogonal to it.
    """
    ways, dim = 3, support.shape[-1]
    weight, bias = fit_linear_heads(support, labels, ways, steps=3000, lr=0.5, l2=l2)
    state = torch.cat([weight.flatten(), bias.flatten()])
    targets = F.one_hot(labels, ways).double()

    def inner_grad(s, x):
        w, b = s[: dim * ways].view(1, dim, ways), s[dim * ways :].view(1, ways)
        gw, gb = head_gradient(x, targets, w, b, l2)
        return torch.cat([gw.flatten(), gb.flatten()])

    hessian = jacobian(lambda s: inner_grad(s, support), state)
    s = state.clone().requires_grad_()
    (d_e,) = torch.autograd.grad(flat_loss(s, query[0], query_labels[0], ways), s)
    v = torch.linalg.pinv(hessian, hermitian=True) @ d_e
    x = support.clone().requires_grad_()
    (g_x,) = torch.autograd.grad(-(inner_grad(state, x) * v).sum(), x)
    return g_x


def test_hypergradient_converges_to_implicit_hypergradient():
    support, labels, query, query_labels, l2 = strongly_convex_problem()
    exact = implicit_hypergradient(support, labels, query, query_labels, l2)
    errors = []
    for steps in (5, 20, 50, 100, 500):
        x = support.clone().requires_grad_()
        weight, bias = fit_linear_heads(x, labels, 3, steps=steps, lr=0.5, l2=l2)
        (g_x,) = torch.autograd.grad(outer_loss(weight, bias, query, query_labels), x)
        errors.append(float((g_x - exact).norm() / exact.norm()))
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-4, errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(support_features=torch.zeros(3, 4)), "support_features"),
        (dict(support_labels=torch.zeros(2, 5, dtype=torch.long)), "support_labels"),
        (dict(support_labels=torch.zeros(2, 6)), "integer"),
        (dict(steps=-1), "steps"),
        (dict(truncate=-2), "truncate"),
        (dict(lr=torch.ones(3)), "lr"),
    ],
)
def test_input_errors(kwargs, match):
    args = dict(
        support_features=torch.zeros(2, 6, 4),
        support_labels=torch.zeros(2, 6, dtype=torch.long),
        ways=3,
        steps=2,
        lr=0.1,
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fit_linear_heads(**args)
