"""The effect of T (Franceschi et al., ICML 2018, Sec. 4.1): approximate vs exact bilevel solutions.

A learned linear representation λ = P (a ``k x d`` matrix) is shared by a linear softmax
classifier ``w = (W, b)`` (``W`` of shape ``k x C``) trained on a tiny training set, three
examples per class:

    L(w, P) = mean_i CE(P x_i · W + b, y_i) + γ/2 ||W||²        (strongly convex in w)
    E(w, P) = mean_v CE(P x_v · W + b, y_v)                     (three per class, validation)

For each T, P is optimized on the approximate problem ``f_T(P) = E(w_T(P), P)``, with
``w_T`` the result of T gradient-descent steps from zero, by Adam on the reverse-mode
hypergradient (:func:`metalearn.bilevel.unroll`); the exact problem ``E(w*(P), P)`` is
optimized the same way with the implicit hypergradient at the inner solution
(:func:`metalearn.bilevel.hypergradient` with ``method="implicit_cg"``, the inner problem
solved by warm-started gradient descent). The paper's theorem (Sec. 3) says the minimizers
of ``f_T`` approach those of the exact problem as T grows, under compactness of the outer
domain and strong convexity of the inner problem; so P is kept in the Frobenius ball
``||P||_F <= R`` (projected after every outer step), which also bounds the features,
and makes one step size ``η`` (one over a bound on the inner Hessian over the whole ball,
:func:`stable_inner_lr`) stable for every P of the domain.

Data: a synthetic Gaussian mixture (a stand-in for the paper's small problem), seeded.
Each class has a mean in a ``signal_dim``-dimensional subspace of R^d (coordinates of
standard deviation ``separation``); every example adds unit noise there and stronger noise
(``noise``) in the other ``d - signal_dim`` directions; the whole is rotated by a random
orthogonal matrix and scaled so that the largest training input has norm 1. With three
examples per class a classifier on the raw inputs fits the noise directions; a good
representation projects onto the signal subspace, so the outer problem has something to
learn and its answer is known. It runs anywhere without downloads, in float64.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor

from metalearn.bilevel import BilevelProblem, GradientDescent, Tensors, hypergradient, unroll
from metalearn.errors import ConfigError
from metalearn.hpo.common import (
    ExperimentLoggers,
    hpo_settings,
    torch_threads,
)
from metalearn.reports import table, write_json
from metalearn.utils.files import save_figure, write_text

__all__ = [
    "RepresentationData",
    "make_gaussian_mixture",
    "optimize_representation",
    "representation_problem",
    "run",
    "solve_inner",
    "stable_inner_lr",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RepresentationData:
    """Inputs ``(m, d)`` and int64 labels ``(m,)`` of the three sets, and the signal subspace.

    Attributes:
        signal_basis: ``(signal_dim, d)`` orthonormal rows spanning the class means.
    """

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    signal_basis: Tensor

    @property
    def classes(self) -> int:
        return int(self.train_y.max()) + 1

    @property
    def input_dim(self) -> int:
        return int(self.train_x.shape[1])


def make_gaussian_mixture(
    classes: int = 10,
    input_dim: int = 30,
    signal_dim: int = 5,
    separation: float = 2.0,
    noise: float = 2.0,
    train_per_class: int = 3,
    val_per_class: int = 3,
    test_per_class: int = 200,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> RepresentationData:
    """Draw the synthetic multiclass problem (see the module docstring).

    Args:
        classes: number of classes C.
        input_dim: input dimension d.
        signal_dim: dimension of the subspace holding the class means (< d).
        separation: standard deviation of the class means' coordinates in that subspace.
        noise: standard deviation of the noise outside it (inside it is 1).
        train_per_class, val_per_class, test_per_class: examples per class of each set.
        seed: seeds everything.
        dtype: floating-point type of the inputs.
    """
    if not 0 < signal_dim < input_dim:
        raise ConfigError(f"need 0 < signal_dim < input_dim, got {signal_dim}, {input_dim}")
    if classes < 2 or min(train_per_class, val_per_class, test_per_class) < 1:
        raise ConfigError("need >= 2 classes and >= 1 example per class in every set")
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, signal_dim, generator=generator, dtype=dtype) * separation
    rotation, _ = torch.linalg.qr(
        torch.randn(input_dim, input_dim, generator=generator, dtype=dtype)
    )

    def draw(per_class: int) -> tuple[Tensor, Tensor]:
        labels = torch.arange(classes).repeat_interleave(per_class)
        signal = means[labels] + torch.randn(
            len(labels), signal_dim, generator=generator, dtype=dtype
        )
        rest = noise * torch.randn(
            len(labels), input_dim - signal_dim, generator=generator, dtype=dtype
        )
        return torch.cat([signal, rest], dim=1) @ rotation.T, labels

    train_x, train_y = draw(train_per_class)
    val_x, val_y = draw(val_per_class)
    test_x, test_y = draw(test_per_class)
    scale = train_x.norm(dim=1).max()
    return RepresentationData(
        train_x=train_x / scale,
        train_y=train_y,
        val_x=val_x / scale,
        val_y=val_y,
        test_x=test_x / scale,
        test_y=test_y,
        signal_basis=rotation[:, :signal_dim].T.contiguous(),
    )


def stable_inner_lr(train_x: Tensor, radius: float, l2: float) -> float:
    """``1 / (½ (R² σ + 1) + γ)``, one over a bound on the inner Hessian's norm for every
    ``||P||_F <= R``, so that gradient descent is stable on the whole outer domain.

    The softmax cross-entropy's Hessian in the logits is at most ½; the second moment of
    the augmented features ``[P x; 1]`` is at most ``||P||_2² σ + 1 <= R² σ + 1``, with
    ``σ = λ_max(Xᵀ X / n)`` of the training inputs.
    """
    sigma = float(torch.linalg.matrix_norm(train_x.T @ train_x / len(train_x), ord=2))
    return 1.0 / (0.5 * (radius**2 * sigma + 1.0) + l2)


def _logits(x: Tensor, w: Tensors, representation: Tensor) -> Tensor:
    return torch.addmm(w[1], x @ representation.T, w[0])


def representation_problem(
    data: RepresentationData, feature_dim: int, l2: float, inner_lr: float
) -> BilevelProblem:
    """The bilevel problem with λ = (P (k, d),) and w = (W (k, C), b (C,)), from zero."""
    if l2 <= 0:
        raise ConfigError(
            f"hpo.l2 must be > 0 (the inner problem must be strongly convex), got {l2}"
        )

    def inner_loss(w: Tensors, lam: Tensors) -> Tensor:
        loss = F.cross_entropy(_logits(data.train_x, w, lam[0]), data.train_y)
        return loss + (l2 / 2) * w[0].pow(2).sum()

    def outer_loss(w: Tensors, lam: Tensors) -> Tensor:
        return F.cross_entropy(_logits(data.val_x, w, lam[0]), data.val_y)

    dtype = data.train_x.dtype
    init = (
        torch.zeros(feature_dim, data.classes, dtype=dtype),
        torch.zeros(data.classes, dtype=dtype),
    )
    return BilevelProblem(inner_loss, outer_loss, GradientDescent(lr=inner_lr), init)


def _inner_grad_norm(problem: BilevelProblem, w: Tensors, representation: Tensor) -> float:
    leaves = tuple(x.detach().requires_grad_() for x in w)
    with torch.enable_grad():
        grads = torch.autograd.grad(problem.inner_loss(leaves, (representation,)), leaves)
    return math.sqrt(sum(float(g.pow(2).sum()) for g in grads))


def solve_inner(
    problem: BilevelProblem,
    representation: Tensor,
    tol: float = 1e-9,
    max_steps: int = 20000,
    chunk: int = 500,
    init: Tensors | None = None,
) -> tuple[Tensors, float]:
    """The inner solution ``w*(P)``: gradient descent (the problem's dynamics) until
    ``||∇_w L|| <= tol``; returns it and the final gradient norm."""
    w = problem.initial_inner((representation,)) if init is None else init
    done = 0
    norm = _inner_grad_norm(problem, w, representation)
    while norm > tol and done < max_steps:
        warm = dataclasses.replace(problem, init=w)
        with torch.no_grad():
            w = unroll(warm, (representation.detach(),), chunk)
        done += chunk
        norm = _inner_grad_norm(problem, w, representation)
    return w, norm


def _project(representation: Tensor, radius: float) -> None:
    norm = float(representation.norm())
    if norm > radius:
        representation.mul_(radius / norm)


def optimize_representation(
    problem: BilevelProblem,
    init: Tensor,
    steps: int | None,
    outer_steps: int,
    outer_lr: float,
    radius: float,
    warm_steps: int = 100,
    solver_steps: int = 100,
) -> tuple[Tensor, list[float]]:
    """Minimize over ``||P||_F <= R`` by projected Adam on a hypergradient.

    Adam's step size decays linearly from ``outer_lr`` to zero over the ``outer_steps``,
    so that the last iterate settles instead of oscillating around a minimizer.

    Args:
        problem: from :func:`representation_problem`.
        init: the initial P (inside the ball).
        steps: T, for the reverse-mode hypergradient of ``f_T``; None for the exact
            problem: the implicit (CG) hypergradient at the inner solution, reached by
            ``warm_steps`` gradient-descent steps from the previous outer step's solution.
        outer_steps: Adam steps.
        outer_lr: Adam's step size.
        radius: R.
        warm_steps: see ``steps``.
        solver_steps: most CG iterations of the implicit hypergradient.

    Returns:
        The final P and the outer objective at every outer step (before its update).
    """
    representation = init.detach().clone().requires_grad_()
    optimizer = torch.optim.Adam([representation], lr=outer_lr)
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0 - k / outer_steps)
    history: list[float] = []
    warm = problem.initial_inner((representation.detach(),))
    for _ in range(outer_steps):
        optimizer.zero_grad(set_to_none=True)
        if steps is None:
            result = hypergradient(
                dataclasses.replace(problem, init=warm),
                (representation,),
                warm_steps,
                method="implicit_cg",
                solver_steps=solver_steps,
            )
            representation.grad, value, warm = result.grads[0], result.value, result.inner
        else:
            value = problem.outer_loss(unroll(problem, (representation,), steps), (representation,))
            value.backward()
        optimizer.step()
        decay.step()
        with torch.no_grad():
            _project(representation, radius)
        history.append(float(value.detach()))
    return representation.detach(), history


def _accuracy(data: RepresentationData, w: Tensors, representation: Tensor) -> float:
    with torch.no_grad():
        logits = _logits(data.test_x, w, representation)
        return float((logits.argmax(1) == data.test_y).double().mean())


def _signal_fraction(data: RepresentationData, representation: Tensor) -> float:
    """``||P B^T||_F² / ||P||_F²``: the fraction of P's energy on the signal subspace."""
    on_signal = representation @ data.signal_basis.T
    return float(on_signal.pow(2).sum() / representation.pow(2).sum())


def _evaluate(
    data: RepresentationData,
    problem: BilevelProblem,
    representation: Tensor,
    steps: int | None,
    tol: float,
) -> dict[str, float]:
    exact, grad_norm = solve_inner(problem, representation, tol=tol)
    with torch.no_grad():
        exact_value = float(problem.outer_loss(exact, (representation,)))
        if steps is None:
            w_t, value = exact, exact_value
        else:
            w_t = unroll(problem, (representation,), steps)
            value = float(problem.outer_loss(w_t, (representation,)))
    return {
        "outer_objective": value,
        "exact_objective": exact_value,
        "test/acc": _accuracy(data, w_t, representation),
        "exact/test/acc": _accuracy(data, exact, representation),
        "signal_fraction": _signal_fraction(data, representation),
        "inner_grad_norm": grad_norm,
    }


def _plot(results: Sequence[dict[str, Any]], implicit: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = [r["T"] for r in results]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(
        ts, [r["outer_objective"] for r in results], marker="o", label="f_T(λ_T) = E(w_T(λ_T))"
    )
    left.plot(ts, [r["exact_objective"] for r in results], marker="s", label="E(w*(λ_T))")
    left.axhline(
        implicit["exact_objective"], color="k", linestyle="--", label="exact solution (implicit)"
    )
    left.set_ylabel("outer objective (validation cross-entropy)")
    right.plot(ts, [100 * r["test/acc"] for r in results], marker="o", label="w_T(λ_T)")
    right.plot(ts, [100 * r["exact/test/acc"] for r in results], marker="s", label="w*(λ_T)")
    right.axhline(
        100 * implicit["test/acc"], color="k", linestyle="--", label="exact solution (implicit)"
    )
    right.set_ylabel("test accuracy (%)")
    for axis in (left, right):
        axis.set_xscale("log")
        axis.set_xlabel("inner steps T")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle("effect of T: approximate bilevel problems vs the exact one")
    return save_figure(figure, path)


_REQUIRED = (
    "classes",
    "input_dim",
    "signal_dim",
    "feature_dim",
    "separation",
    "noise",
    "train_per_class",
    "val_per_class",
    "test_per_class",
    "seed",
    "inner_steps",
    "l2",
    "radius",
    "outer_steps",
    "outer_lr",
)


def run(cfg: DictConfig) -> dict[str, float]:
    """``python train.py experiment=effect_of_T``: settings from ``cfg.hpo``.

    Prints a table, writes ``effect_of_T.json``, ``effect_of_T.md`` and ``effect_of_T.png``
    into ``cfg.paths.output_dir``, and returns the metrics, keyed ``T<t>/<name>`` for each
    T and ``implicit/<name>`` for the exact solution, with the names ``outer_objective``
    (``f_T(λ_T)``; for the implicit solution ``E(w*(λ*))``), ``exact_objective``
    (``E(w*(λ_T))``), ``test/acc`` (of ``w_T(λ_T)``), ``exact/test/acc`` (of
    ``w*(λ_T)``), ``signal_fraction`` and ``seconds``.
    """
    hpo = hpo_settings(cfg, _REQUIRED)
    out_dir = Path(cfg.paths.output_dir)
    t_values = [int(t) for t in hpo["inner_steps"]]
    if not t_values or min(t_values) < 1:
        raise ConfigError(f"hpo.inner_steps must be a list of T >= 1, got {t_values}")
    radius, l2 = float(hpo["radius"]), float(hpo["l2"])
    tol = float(hpo.get("inner_tol", 1e-9))
    with torch_threads(hpo.get("num_threads")):
        start = time.perf_counter()
        data = make_gaussian_mixture(
            classes=int(hpo["classes"]),
            input_dim=int(hpo["input_dim"]),
            signal_dim=int(hpo["signal_dim"]),
            separation=float(hpo["separation"]),
            noise=float(hpo["noise"]),
            train_per_class=int(hpo["train_per_class"]),
            val_per_class=int(hpo["val_per_class"]),
            test_per_class=int(hpo["test_per_class"]),
            seed=int(hpo["seed"]),
        )
        feature_dim = int(hpo["feature_dim"])
        lr = hpo.get("inner_lr") or stable_inner_lr(data.train_x, radius, l2)
        problem = representation_problem(data, feature_dim, l2, float(lr))
        generator = torch.Generator().manual_seed(int(hpo["seed"]) + 1)
        init = torch.randn(feature_dim, data.input_dim, generator=generator, dtype=torch.float64)
        init *= float(hpo.get("init_radius", radius)) / float(init.norm())
        loggers = ExperimentLoggers(cfg)
        metrics: dict[str, float] = {}
        results: list[dict[str, Any]] = []
        histories: dict[str, list[float]] = {}
        for steps in [*t_values, None]:
            began = time.perf_counter()
            found, history = optimize_representation(
                problem,
                init,
                steps,
                outer_steps=int(hpo["outer_steps"]),
                outer_lr=float(hpo["outer_lr"]),
                radius=radius,
                warm_steps=int(hpo.get("warm_steps", 100)),
                solver_steps=int(hpo.get("solver_steps", 100)),
            )
            row: dict[str, Any] = {
                "T": steps if steps is not None else "implicit",
                **_evaluate(data, problem, found, steps, tol),
                "seconds": time.perf_counter() - began,
            }
            key = f"T{steps}" if steps is not None else "implicit"
            histories[key] = history
            metrics.update({f"{key}/{k}": float(v) for k, v in row.items() if k != "T"})
            if steps is not None:
                results.append(row)
                loggers.log_metrics({f"effect_of_T/{k}": float(v) for k, v in row.items()}, steps)
            log.info(
                "%s: outer objective %.4f, exact %.4f, test acc %.2f%% (%.0f s)",
                key,
                row["outer_objective"],
                row["exact_objective"],
                100 * row["test/acc"],
                row["seconds"],
            )
        implicit = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("implicit/")}
        metrics["time/total_seconds"] = time.perf_counter() - start

    header = [
        "T",
        "f_T(λ_T)",
        "E(w*(λ_T))",
        "test acc w_T(λ_T) (%)",
        "test acc w*(λ_T) (%)",
        "signal fraction of λ",
        "seconds",
    ]
    rows = [
        [
            str(r["T"]),
            f"{r['outer_objective']:.4f}",
            f"{r['exact_objective']:.4f}",
            f"{100 * r['test/acc']:.2f}",
            f"{100 * r['exact/test/acc']:.2f}",
            f"{r['signal_fraction']:.3f}",
            f"{r['seconds']:.1f}",
        ]
        for r in results
    ]
    rows.append(
        [
            "exact (implicit CG)",
            f"{implicit['outer_objective']:.4f}",
            f"{implicit['exact_objective']:.4f}",
            f"{100 * implicit['test/acc']:.2f}",
            f"{100 * implicit['exact/test/acc']:.2f}",
            f"{implicit['signal_fraction']:.3f}",
            f"{implicit['seconds']:.1f}",
        ]
    )
    rendered = table(header, rows)
    summary = (
        f"{data.classes} classes, {int(hpo['train_per_class'])} training and "
        f"{int(hpo['val_per_class'])} validation examples per class, "
        f"{len(data.test_y)} test; λ = P ({feature_dim} x {data.input_dim}), ||P||_F <= "
        f"{radius}; inner GD lr {float(lr):.4f}, l2 {l2}; {int(hpo['outer_steps'])} outer Adam "
        f"steps (lr {float(hpo['outer_lr'])}, decayed linearly to 0) per row; total {metrics['time/total_seconds']:.0f} s"
    )
    print(rendered, end="")
    print(summary)
    write_json(
        {
            "metrics": metrics,
            "results": results,
            "implicit": implicit,
            "outer_history": histories,
            "settings": hpo,
        },
        out_dir / "effect_of_T.json",
    )
    write_text(out_dir / "effect_of_T.md", f"# Effect of T\n\n{rendered}\n{summary}\n")
    plot = _plot(results, implicit, out_dir / "effect_of_T.png")
    print(f"reports written to {out_dir} (effect_of_T.md, effect_of_T.json, {plot.name})")
    loggers.log_images({"effect_of_T/plot": plot})
    loggers.log_summary(metrics)
    loggers.finalize()
    return metrics
