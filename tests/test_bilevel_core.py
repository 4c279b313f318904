"""Math tests of the general bilevel core (dynamics and hypergradient methods), in float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from metalearn.bilevel import (
    METHODS,
    Adam,
    BilevelProblem,
    GradientDescent,
    HeavyBall,
    OuterVariable,
    fit_linear_heads,
    forward_hypergradient,
    head_logits,
    hypergradient,
    implicit_cg_hypergradient,
    implicit_fixed_point_hypergradient,
    reverse_hypergradient,
    unroll,
)


@pytest.fixture(autouse=True)
def _float64_one_thread():
    """Every tensor of these tests is float64, and torch uses one thread: these problems are
    tiny, and a second thread fighting other processes for the cores made them ~30x slower
    on a loaded machine. Both are restored afterwards for the other tests."""
    previous_dtype, previous_threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(previous_dtype)
    torch.set_num_threads(previous_threads)


# ----------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------


def rel_error(got, expected):
    """``||got - expected|| / ||expected||`` over tuples of tensors."""
    num = math.sqrt(sum(float((a - b).pow(2).sum()) for a, b in zip(got, expected, strict=True)))
    den = math.sqrt(sum(float(b.pow(2).sum()) for b in expected))
    return num / den


def objective(problem, outer, steps):
    """The T-step outer objective ``f_T(λ) = E(w_T(λ), λ)``, without a graph."""
    with torch.no_grad():
        return float(problem.outer_loss(unroll(problem, outer, steps), tuple(outer)))


def finite_differences(problem, outer, steps, eps=1e-6):
    """Central differences of ``f_T`` with respect to every scalar in λ."""
    grads = []
    for k, x in enumerate(outer):
        grad = torch.zeros_like(x).view(-1)
        for j in range(x.numel()):
            values = []
            for sign in (1.0, -1.0):
                shifted = x.detach().clone().view(-1)
                shifted[j] += sign * eps
                moved = list(outer)
                moved[k] = shifted.view_as(x)
                values.append(objective(problem, moved, steps))
            grad[j] = (values[0] - values[1]) / (2 * eps)
        grads.append(grad.view_as(x))
    return tuple(grads)


def autograd_through_unroll(problem, outer, steps, truncate=None):
    """The graph-keeping reverse mode: ``.grad`` of E through :func:`unroll`."""
    outer = tuple(x.detach().clone().requires_grad_() for x in outer)
    inner = unroll(problem, outer, steps, truncate=truncate)
    loss = problem.outer_loss(inner, outer)
    if not loss.requires_grad:  # nothing tracked (truncate=0) and no direct dependence
        return tuple(torch.zeros_like(x) for x in outer)
    return torch.autograd.grad(loss, outer, allow_unused=True, materialize_grads=True)


def classification_data(n=8, d=3, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    y = torch.arange(n) % classes
    xv = torch.randn(n, d, generator=gen)
    yv = torch.arange(n).flip(0) % classes
    return x, y, xv, yv


def logistic_problem(dynamics, seed=0):
    """Multinomial logistic regression; λ = (lr, momentum or β1, log l2).

    L(W, b) = mean CE(xW + b, y) + exp(λ[2])/2 ||W||²; E = mean CE on a validation set.
    """
    x, y, xv, yv = classification_data(seed=seed)

    def inner_loss(w, lam):
        return F.cross_entropy(x @ w[0] + w[1], y) + lam[2].exp() / 2 * w[0].pow(2).sum()

    def outer_loss(w, lam):
        return F.cross_entropy(xv @ w[0] + w[1], yv)

    init = (torch.full((3, 3), 0.1), torch.zeros(3))
    outer = (torch.tensor(0.3), torch.tensor(0.6), torch.tensor(-1.0))
    return BilevelProblem(inner_loss, outer_loss, dynamics, init), outer


DYNAMICS = {
    "gd": lambda: GradientDescent(lr=OuterVariable(0)),
    "heavy_ball": lambda: HeavyBall(lr=OuterVariable(0), momentum=OuterVariable(1)),
    "adam": lambda: Adam(lr=OuterVariable(0), beta1=OuterVariable(1), beta2=0.99),
}


# ----------------------------------------------------------------------------------------
# The dynamics are the optimizers they claim to be.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dynamics, optimizer",
    [
        (GradientDescent(lr=0.2), lambda p: torch.optim.SGD(p, lr=0.2)),
        (HeavyBall(lr=0.2, momentum=0.7), lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.7)),
        (
            Adam(lr=0.05, beta1=0.8, beta2=0.95, eps=1e-6, eps_root=0.0),
            lambda p: torch.optim.Adam(p, lr=0.05, betas=(0.8, 0.95), eps=1e-6),
        ),
    ],
)
def test_dynamics_match_torch_optimizers(dynamics, optimizer):
    problem, _ = logistic_problem(dynamics)
    outer = (torch.tensor(0.0), torch.tensor(0.0), torch.tensor(-1.0))
    params = [w.clone().requires_grad_() for w in problem.init]
    opt = optimizer(params)
    for steps in range(1, 8):
        opt.zero_grad()
        problem.inner_loss(tuple(params), outer).backward()
        opt.step()
        got = unroll(problem, outer, steps)
        for a, b in zip(got, params, strict=True):
            torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------------------
# Exactness for the T-step problem: reverse = forward = autograd = finite differences.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DYNAMICS)
def test_reverse_forward_autograd_and_finite_differences_agree(name):
    problem, outer = logistic_problem(DYNAMICS[name]())
    steps = 6
    rev = reverse_hypergradient(problem, outer, steps)
    fwd = forward_hypergradient(problem, outer, steps)
    # lr, momentum / β1 (unused by gradient descent) and l2 all matter.
    used = (0, 2) if name == "gd" else (0, 1, 2)
    assert all(float(rev.grads[i].abs()) > 1e-6 for i in used)
    assert rel_error(fwd.grads, rev.grads) <= 1e-8
    assert rel_error(autograd_through_unroll(problem, outer, steps), rev.grads) <= 1e-12
    assert rel_error(finite_differences(problem, outer, steps), rev.grads) <= 1e-7
    torch.testing.assert_close(fwd.value, rev.value, rtol=1e-14, atol=0)
    for a, b in zip(fwd.inner, rev.inner, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)
    assert float(rev.value) == pytest.approx(objective(problem, outer, steps), rel=1e-14)


@pytest.mark.parametrize("name", DYNAMICS)
def test_gradcheck_of_the_unrolled_objective(name):
    problem, outer = logistic_problem(DYNAMICS[name]())
    outer = tuple(x.clone().requires_grad_() for x in outer)

    def f_T(*lam):
        return problem.outer_loss(unroll(problem, lam, 3), lam)

    assert torch.autograd.gradcheck(f_T, outer)


@pytest.mark.parametrize("name", DYNAMICS)
def test_truncated_reverse(name):
    problem, outer = logistic_problem(DYNAMICS[name](), seed=1)
    steps = 7
    full = reverse_hypergradient(problem, outer, steps)
    # Keeping K >= T steps is no truncation: autograd through the whole unroll.
    untruncated = autograd_through_unroll(problem, outer, steps)
    for keep in (steps, steps + 3):
        truncated = reverse_hypergradient(problem, outer, steps, truncate=keep)
        assert rel_error(truncated.grads, untruncated) <= 1e-12
    for keep in (1, 3):
        truncated = reverse_hypergradient(problem, outer, steps, truncate=keep)
        # Reference: the graph-keeping unroll that detaches the state s_{T-K}.
        reference = autograd_through_unroll(problem, outer, steps, truncate=keep)
        assert rel_error(truncated.grads, reference) <= 1e-12
        assert rel_error(truncated.grads, full.grads) > 1e-3
        for a, b in zip(truncated.inner, full.inner, strict=True):
            assert torch.equal(a, b)
    # K = 0 keeps only the direct term ∂E/∂λ, here zero: E does not depend on λ directly.
    zero = reverse_hypergradient(problem, outer, steps, truncate=0)
    assert all(torch.count_nonzero(g) == 0 for g in zero.grads)


def test_truncated_reverse_equals_restart_from_detached_state():
    """For gradient descent (no auxiliary state, no step index), truncating at K equals the
    full reverse mode of the K-step problem started from the detached w_{T-K}."""
    problem, outer = logistic_problem(DYNAMICS["gd"]())
    steps, keep = 8, 3
    start = unroll(problem, outer, steps - keep)
    restarted = BilevelProblem(problem.inner_loss, problem.outer_loss, problem.dynamics, start)
    expected = reverse_hypergradient(restarted, outer, keep)
    got = reverse_hypergradient(problem, outer, steps, truncate=keep)
    assert rel_error(got.grads, expected.grads) <= 1e-12


def test_every_method_name_reaches_its_method():
    """hypergradient(method=...) against references that share no code with the core:
    autograd through the graph-keeping unroll (reverse, truncated reverse, forward), and
    the closed-form ridge hypergradient at a converged inner problem (implicit)."""
    assert METHODS == ("reverse", "forward", "implicit_cg", "implicit_fixed_point")
    problem, outer = logistic_problem(DYNAMICS["heavy_ball"]())
    for method, truncate in (("reverse", None), ("reverse", 2), ("forward", None)):
        got = hypergradient(problem, outer, 4, method=method, truncate=truncate)
        reference = autograd_through_unroll(problem, outer, 4, truncate=truncate)
        assert rel_error(got.grads, reference) <= 1e-12, (method, truncate)
    ridge, outer, closed_form, lr = ridge_regularization_problem()
    exact = closed_form_hypergradient(closed_form, outer)
    cg = hypergradient(ridge, outer, 400, method="implicit_cg")
    fixed_point = hypergradient(
        ridge, outer, 400, method="implicit_fixed_point", solver_lr=lr, solver_steps=2000
    )
    assert rel_error(cg.grads, exact) <= 1e-10
    assert rel_error(fixed_point.grads, exact) <= 1e-9
    # Stopped early, each implicit solver is off by its own, different, amount.
    early = [
        hypergradient(ridge, outer, 400, method="implicit_cg", solver_steps=1),
        hypergradient(
            ridge, outer, 400, method="implicit_fixed_point", solver_lr=lr, solver_steps=1
        ),
    ]
    errors = [rel_error(h.grads, exact) for h in early]
    assert min(errors) > 1e-3 and abs(errors[0] - errors[1]) > 1e-3


def test_outer_variables_are_not_modified_and_grads_are_returned():
    problem, outer = logistic_problem(DYNAMICS["adam"]())
    outer = tuple(x.clone().requires_grad_() for x in outer)
    before = [x.detach().clone() for x in outer]
    for method in ("reverse", "forward"):
        result = hypergradient(problem, outer, 3, method=method)
        assert all(not g.requires_grad for g in result.grads)
        assert all(not w.requires_grad for w in result.inner)
    assert all(x.grad is None for x in outer)
    for x, b in zip(outer, before, strict=True):
        assert torch.equal(x.detach(), b)


def test_unroll_without_graph():
    problem, outer = logistic_problem(DYNAMICS["gd"]())
    outer = tuple(x.clone().requires_grad_() for x in outer)
    with torch.no_grad():
        inner = unroll(problem, outer, 4)
    assert not any(w.requires_grad for w in inner)
    with_graph = unroll(problem, outer, 4)
    assert all(w.requires_grad for w in with_graph)
    for a, b in zip(inner, with_graph, strict=True):
        assert torch.equal(a, b.detach())


def test_adam_hypergradient_is_finite_where_a_gradient_is_exactly_zero():
    """A feature column of zeros gives exactly zero inner gradients for its weights."""
    x, y, xv, yv = classification_data()
    x = torch.cat([x, torch.zeros(len(x), 1)], dim=1)
    xv = torch.cat([xv, torch.ones(len(xv), 1)], dim=1)
    problem = BilevelProblem(
        lambda w, lam: F.cross_entropy(x @ w[0], y),
        lambda w, lam: F.cross_entropy(xv @ w[0], yv),
        Adam(lr=OuterVariable(0)),
        (torch.zeros(4, 3),),
    )
    for method in ("reverse", "forward"):
        (grad,) = hypergradient(problem, (torch.tensor(0.1),), 5, method=method).grads
        assert torch.isfinite(grad)


# ----------------------------------------------------------------------------------------
# Learned initialization and per-example weights (hyper-cleaning).
# ----------------------------------------------------------------------------------------


def test_learned_initialization():
    """w_0 = λ[0] (a MAML-like learned initialization) and lr = λ[1]."""
    x, y, xv, yv = classification_data(seed=2)
    problem = BilevelProblem(
        inner_loss=lambda w, lam: F.cross_entropy(x @ w[0], y),
        outer_loss=lambda w, lam: F.cross_entropy(xv @ w[0], yv),
        dynamics=GradientDescent(lr=OuterVariable(1)),
        init=lambda lam: (lam[0],),
    )
    gen = torch.Generator().manual_seed(3)
    outer = (torch.randn(3, 3, generator=gen), torch.tensor(0.5))
    reference = finite_differences(problem, outer, 5)
    for method in ("reverse", "forward"):
        grads = hypergradient(problem, outer, 5, method=method).grads
        assert rel_error(grads, reference) <= 1e-7, method
    assert rel_error(autograd_through_unroll(problem, outer, 5), reference) <= 1e-7
    # T = 0: w_T = w_0 = λ[0], so the hypergradient is ∂E/∂w at λ[0], and zero for lr.
    grads = reverse_hypergradient(problem, outer, 0).grads
    w0 = outer[0].clone().requires_grad_()
    (expected,) = torch.autograd.grad(problem.outer_loss((w0,), outer), w0)
    torch.testing.assert_close(grads[0], expected, rtol=1e-14, atol=0)
    assert float(grads[1]) == 0.0


def test_implicit_methods_ignore_the_dynamics():
    """Implicit differentiation differentiates the solution: zero for w_0 and the step size."""
    x, y, xv, yv = classification_data(seed=2)
    problem = BilevelProblem(
        inner_loss=lambda w, lam: F.cross_entropy(x @ w[0], y) + w[0].pow(2).sum() / 2,
        outer_loss=lambda w, lam: F.cross_entropy(xv @ w[0], yv),
        dynamics=GradientDescent(lr=OuterVariable(1)),
        init=lambda lam: (lam[0],),
    )
    outer = (torch.full((3, 3), 0.2), torch.tensor(0.5))
    for result in (
        implicit_cg_hypergradient(problem, outer, 60),
        implicit_fixed_point_hypergradient(problem, outer, 60, solver_lr=0.5),
    ):
        assert all(torch.count_nonzero(g) == 0 for g in result.grads)
    # The unrolled hypergradient with respect to w_0 and lr vanishes as T grows (the limit
    # forgets the initialization and the step size).
    small = reverse_hypergradient(problem, outer, 5).grads
    large = reverse_hypergradient(problem, outer, 80).grads
    assert all(float(g.abs().max()) > 1e-4 for g in small)
    assert all(float(g.abs().max()) < 1e-12 for g in large)


def test_per_example_weights_hyper_cleaning():
    """Inner loss Σ_i σ(λ_i) ℓ_i(w) / n (data hyper-cleaning), a weight per example."""
    x, y, xv, yv = classification_data(n=6, seed=4)

    def inner_loss(w, lam):
        losses = F.cross_entropy(x @ w[0] + w[1], y, reduction="none")
        return (torch.sigmoid(lam[0]) * losses).mean() + 0.05 * w[0].pow(2).sum()

    problem = BilevelProblem(
        inner_loss=inner_loss,
        outer_loss=lambda w, lam: F.cross_entropy(xv @ w[0] + w[1], yv),
        dynamics=GradientDescent(lr=1.0),
        init=(torch.zeros(3, 3), torch.zeros(3)),
    )
    outer = (torch.linspace(-1.0, 1.0, 6),)
    steps = 8
    rev = reverse_hypergradient(problem, outer, steps)
    fwd = forward_hypergradient(problem, outer, steps)
    assert rev.grads[0].shape == (6,)
    assert rel_error(fwd.grads, rev.grads) <= 1e-8
    assert rel_error(finite_differences(problem, outer, steps), rev.grads) <= 1e-7
    # Implicit methods (after the inner problem converged) agree with each other and with
    # the reverse mode at large T.
    steps = 300
    rev = reverse_hypergradient(problem, outer, steps)
    cg = implicit_cg_hypergradient(problem, outer, steps)
    fp = implicit_fixed_point_hypergradient(problem, outer, steps, solver_lr=1.0, solver_steps=500)
    assert rel_error(cg.grads, rev.grads) <= 1e-8
    assert rel_error(fp.grads, cg.grads) <= 1e-8


# ----------------------------------------------------------------------------------------
# Ridge regression: every method approaches the closed-form hypergradient.
# ----------------------------------------------------------------------------------------


def ridge_data(n=30, d=4, seed=5):
    gen = torch.Generator().manual_seed(seed)
    scales = torch.tensor([1.0, 0.5, 0.25, 0.1])[:d]
    w_true = torch.randn(d, generator=gen)
    x = torch.randn(n, d, generator=gen) * scales
    y = x @ w_true + 0.3 * torch.randn(n, generator=gen)
    xv = torch.randn(n, d, generator=gen) * scales
    yv = xv @ w_true + 0.3 * torch.randn(n, generator=gen)
    return x, y, xv, yv


def ridge_regularization_problem():
    """λ = (log ρ,): L(w) = ||xw - y||²/2n + ρ/2 ||w||², E(w) = ||x_v w - y_v||²/2n.

    Closed form: w*(ρ) = (xᵀx/n + ρI)⁻¹ xᵀy/n; its hypergradient by autograd through the solve.
    Gradient descent with step 1/L (L the largest Hessian eigenvalue).
    """
    x, y, xv, yv = ridge_data()
    n, d = x.shape
    log_rho = torch.tensor(-2.0)

    def inner_loss(w, lam):
        return (x @ w[0] - y).pow(2).sum() / (2 * n) + lam[0].exp() / 2 * w[0].pow(2).sum()

    def outer_loss(w, lam):
        return (xv @ w[0] - yv).pow(2).sum() / (2 * n)

    def closed_form(lam):
        hessian = x.T @ x / n + lam[0].exp() * torch.eye(d)
        return outer_loss((torch.linalg.solve(hessian, x.T @ y / n),), lam)

    lipschitz = float(torch.linalg.eigvalsh(x.T @ x / n).max() + log_rho.exp())
    problem = BilevelProblem(
        inner_loss, outer_loss, GradientDescent(lr=1.0 / lipschitz), (torch.zeros(d),)
    )
    return problem, (log_rho,), closed_form, 1.0 / lipschitz


def ridge_feature_map_problem():
    """λ = (P,), a linear feature map d -> k used by both levels, ρ = 0.1 fixed:

    L(w) = ||xPw - y||²/2n + ρ/2 ||w||², E(w, P) = ||x_v P w - y_v||²/2n, with the closed
    form w*(P) = (PᵀxᵀxP/n + ρI)⁻¹ Pᵀxᵀy/n (E also depends on P directly).
    """
    x, y, xv, yv = ridge_data(seed=6)
    n, d = x.shape
    k, rho = 3, 0.1
    projection = torch.eye(d)[:, :k] + 0.3 * torch.randn(
        d, k, generator=torch.Generator().manual_seed(7)
    )

    def inner_loss(w, lam):
        return (x @ lam[0] @ w[0] - y).pow(2).sum() / (2 * n) + rho / 2 * w[0].pow(2).sum()

    def outer_loss(w, lam):
        return (xv @ lam[0] @ w[0] - yv).pow(2).sum() / (2 * n)

    def closed_form(lam):
        features = x @ lam[0]
        hessian = features.T @ features / n + rho * torch.eye(k)
        return outer_loss((torch.linalg.solve(hessian, features.T @ y / n),), lam)

    features = x @ projection
    lipschitz = float(torch.linalg.eigvalsh(features.T @ features / n).max() + rho)
    problem = BilevelProblem(
        inner_loss, outer_loss, GradientDescent(lr=1.0 / lipschitz), (torch.zeros(k),)
    )
    return problem, (projection,), closed_form, 1.0 / lipschitz


RIDGE = {"regularization": ridge_regularization_problem, "feature_map": ridge_feature_map_problem}


def closed_form_hypergradient(closed_form, outer):
    outer = tuple(x.clone().requires_grad_() for x in outer)
    return torch.autograd.grad(closed_form(outer), outer)


def convergence_errors(name):
    """Relative error to the closed-form hypergradient, per method, as T or iterations grow."""
    problem, outer, closed_form, lr = RIDGE[name]()
    exact = closed_form_hypergradient(closed_form, outer)
    errors = {}
    steps_grid = (5, 10, 20, 40, 80, 160)
    for method in ("reverse", "forward"):
        errors[method] = [
            rel_error(hypergradient(problem, outer, t, method=method).grads, exact)
            for t in steps_grid
        ]
    # Implicit, with the linear system solved to convergence: error vs T (inner accuracy).
    errors["implicit_cg vs T"] = [
        rel_error(implicit_cg_hypergradient(problem, outer, t).grads, exact) for t in steps_grid
    ]
    # Implicit at a converged w_T (T = 400): error vs solver iterations.
    dim = sum(w.numel() for w in problem.init)
    errors["implicit_cg vs iterations"] = [
        rel_error(implicit_cg_hypergradient(problem, outer, 400, solver_steps=k).grads, exact)
        for k in range(dim + 1)
    ]
    errors["implicit_fixed_point vs iterations"] = [
        rel_error(
            implicit_fixed_point_hypergradient(
                problem, outer, 400, solver_lr=lr, solver_steps=k
            ).grads,
            exact,
        )
        for k in steps_grid
    ]
    return errors


def decreasing(values):
    return all(b < a for a, b in zip(values, values[1:], strict=False))


@pytest.mark.parametrize("name", RIDGE)
def test_every_method_approaches_the_closed_form_hypergradient(name):
    errors = convergence_errors(name)
    for method, values in errors.items():
        assert decreasing(values), (method, values)
        assert values[-1] <= 1e-9, (method, values)
    assert errors["reverse"][0] > 1e-2  # T = 5 is far from the limit: the test has teeth
    # Reverse and forward compute the same T-step hypergradient.
    for a, b in zip(errors["reverse"], errors["forward"], strict=True):
        assert abs(a - b) <= 1e-8 * max(a, 1e-300) + 1e-12


@pytest.mark.parametrize("name", RIDGE)
def test_ridge_forward_equals_reverse_with_momentum_and_adam(name):
    problem, outer, _, lr = RIDGE[name]()
    for dynamics in (HeavyBall(lr=lr, momentum=0.5), Adam(lr=0.05)):
        p = BilevelProblem(problem.inner_loss, problem.outer_loss, dynamics, problem.init)
        rev = reverse_hypergradient(p, outer, 12)
        fwd = forward_hypergradient(p, outer, 12)
        assert rel_error(fwd.grads, rev.grads) <= 1e-8


# ----------------------------------------------------------------------------------------
# The few-shot head solver is the fast special case of the general core.
# ----------------------------------------------------------------------------------------


def test_general_core_reproduces_fit_linear_heads():
    """Inner variables (W, b) of B linear softmax heads, inner loss Σ_j mean CE_j + l2/2 ||W_j||²,
    gradient descent with lr = λ[0], features = λ[1]: the heads and the hypergradients with
    respect to lr and the features equal those of ``fit_linear_heads``."""
    batch, ways, shots, queries, dim, l2, steps = 2, 3, 2, 2, 4, 0.1, 5
    gen = torch.Generator().manual_seed(8)
    support = torch.randn(batch, ways * shots, dim, generator=gen)
    query = torch.randn(batch, ways * queries, dim, generator=gen)
    labels = torch.arange(ways).repeat_interleave(shots).repeat(batch, 1)
    query_labels = torch.arange(ways).repeat_interleave(queries).repeat(batch, 1)

    def head_loss(features, weight, bias, targets):
        logits = head_logits(features, weight, bias)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def inner_loss(w, lam):
        # Σ over episodes of each episode's mean CE: the heads are independent.
        return batch * head_loss(lam[1], w[0], w[1], labels) + l2 / 2 * w[0].pow(2).sum()

    problem = BilevelProblem(
        inner_loss=inner_loss,
        outer_loss=lambda w, lam: head_loss(query, w[0], w[1], query_labels),
        dynamics=GradientDescent(lr=OuterVariable(0)),
        init=(torch.zeros(batch, dim, ways), torch.zeros(batch, ways)),
    )
    outer = (torch.tensor(0.7), support)
    for truncate in (None, 2):
        lr = torch.tensor(0.7, requires_grad=True)
        features = support.clone().requires_grad_()
        weight, bias = fit_linear_heads(features, labels, ways, steps, lr, l2=l2, truncate=truncate)
        loss = head_loss(query, weight, bias, query_labels)
        expected = torch.autograd.grad(loss, (lr, features))
        result = reverse_hypergradient(problem, outer, steps, truncate=truncate)
        torch.testing.assert_close(result.inner[0], weight.detach(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(result.inner[1], bias.detach(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(result.value, loss.detach(), rtol=1e-12, atol=0)
        for got, want in zip(result.grads, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
        if truncate is None:
            forward = forward_hypergradient(problem, outer, steps)
            assert rel_error(forward.grads, expected) <= 1e-10


# ----------------------------------------------------------------------------------------
# Errors a user can act on.
# ----------------------------------------------------------------------------------------


def quadratic_problem(curvature=1.0, dynamics=None):
    """L(w) = curvature/2 ||w||² - <λ, w>, E(w) = ||w - 1||²/2 (w* = λ / curvature)."""
    return BilevelProblem(
        inner_loss=lambda w, lam: curvature / 2 * w[0].pow(2).sum() - (lam[0] * w[0]).sum(),
        outer_loss=lambda w, lam: (w[0] - 1).pow(2).sum() / 2,
        dynamics=dynamics or GradientDescent(lr=0.5),
        init=(torch.zeros(3),),
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="newton"), "unknown hypergradient method 'newton'"),
        (dict(method="reverse", truncate=-1), "truncate must be an integer >= 0"),
        (dict(method="forward", truncate=2), "truncate applies to method='reverse' only"),
        (dict(method="reverse", solver_steps=5), "solver_steps and solver_tol apply"),
        (dict(method="forward", solver_tol=1e-3), "solver_steps and solver_tol apply"),
        (dict(method="implicit_cg", solver_lr=0.1), "solver_lr applies to"),
        (dict(method="implicit_fixed_point"), "needs solver_lr"),
        (dict(method="implicit_fixed_point", solver_lr=-1.0), "solver_lr must be"),
        (dict(method="implicit_cg", solver_steps=-1), "solver_steps must be"),
        (dict(method="implicit_cg", solver_tol=math.nan), "solver_tol must be"),
        (dict(steps=-1), "steps must be an integer >= 0"),
        (dict(steps=2.0), "steps must be an integer"),
        (dict(outer=torch.zeros(3)), "outer must be a tuple or list of tensors"),
        (dict(outer=(1.0,)), r"outer\[0\] must be a tensor"),
        (dict(outer=(torch.zeros(3, dtype=torch.long),)), "floating-point"),
        (dict(outer=()), "at least one tensor"),
    ],
)
def test_argument_errors(kwargs, match):
    args = dict(problem=quadratic_problem(), outer=(torch.ones(3),), steps=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        hypergradient(**args)


def test_objective_and_problem_errors():
    def total(w, lam):
        return w[0].sum()

    outer = (torch.ones(3),)
    vector_loss = BilevelProblem(lambda w, lam: w[0] ** 2, total, GradientDescent(0.1), outer)
    with pytest.raises(ValueError, match=r"inner_loss must return a 0-d tensor, got \(3,\)"):
        reverse_hypergradient(vector_loss, outer, 2)
    vector_outer = BilevelProblem(total, lambda w, lam: w[0], GradientDescent(0.1), outer)
    with pytest.raises(ValueError, match="outer_loss must return a 0-d tensor"):
        forward_hypergradient(vector_outer, outer, 2)
    with pytest.raises(ValueError, match="dynamics must be a Dynamics"):
        BilevelProblem(total, total, "sgd", ())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"init\[0\] must be a tensor"):
        BilevelProblem(total, total, GradientDescent(1), [0])  # type: ignore[list-item]
    empty = BilevelProblem(total, total, GradientDescent(1), ())
    with pytest.raises(ValueError, match="init gives no inner variables"):
        reverse_hypergradient(empty, outer, 1)
    with pytest.raises(ValueError, match="inference_mode"), torch.inference_mode():
        unroll(quadratic_problem(), outer, 2)


def test_hyperparameter_errors():
    with pytest.raises(ValueError, match="requires grad.*OuterVariable"):
        GradientDescent(lr=torch.tensor(0.1, requires_grad=True))
    with pytest.raises(ValueError, match="'momentum' must lie in"):
        HeavyBall(lr=0.1, momentum=1.5)
    with pytest.raises(ValueError, match="'lr' must be finite"):
        Adam(lr=math.inf)
    with pytest.raises(ValueError, match="'lr' must be a float, a tensor or a callable"):
        GradientDescent(lr="0.1")  # type: ignore[arg-type]
    problem = quadratic_problem(dynamics=GradientDescent(lr=OuterVariable(2)))
    with pytest.raises(ValueError, match=r"OuterVariable\(2\) is out of range: there are 1"):
        reverse_hypergradient(problem, (torch.ones(3),), 2)


def test_cg_refuses_a_hessian_that_is_not_positive_definite():
    """A concave inner loss (H = -I): CG stops with an error instead of returning garbage;
    the fixed-point iteration detects its divergence. The unrolled methods still work (they
    differentiate the dynamics, whatever it converges to)."""
    problem = quadratic_problem(curvature=-1.0, dynamics=GradientDescent(lr=0.1))
    outer = (torch.ones(3),)
    with pytest.raises(ValueError, match="not positive definite"):
        implicit_cg_hypergradient(problem, outer, 5)
    with pytest.raises(ValueError, match="implicit_fixed_point diverges"):
        implicit_fixed_point_hypergradient(problem, outer, 5, solver_lr=0.1)
    assert torch.isfinite(reverse_hypergradient(problem, outer, 5).grads[0]).all()


def test_fixed_point_detects_a_step_that_is_too_large():
    problem = quadratic_problem(curvature=1.0)
    outer = (torch.full((3,), 0.5),)
    # H = I: α = 1 solves in one iteration, α = 2.5 diverges.
    good = implicit_fixed_point_hypergradient(problem, outer, 50, solver_lr=1.0, solver_steps=3)
    torch.testing.assert_close(good.grads[0], outer[0] - 1)  # dE/dλ = (w* - 1) with w* = λ
    with pytest.raises(ValueError, match="reduce solver_lr"):
        implicit_fixed_point_hypergradient(problem, outer, 50, solver_lr=2.5, solver_steps=3)
