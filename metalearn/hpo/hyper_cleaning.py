"""Data hyper-cleaning on MNIST: one learned weight per training example (Franceschi et al.).

The protocol of Franceschi, Donini, Frasconi, Pontil, "Forward and Reverse Gradient-Based
Hyperparameter Optimization" (ICML 2017), revisited in "Bilevel Programming for
Hyperparameter Optimization and Meta-Learning" (ICML 2018): n = 5,000 training examples of
which half have their label replaced by a random *wrong* label, 5,000 clean validation
examples, the 10,000 test examples. The outer variables are one logit per training
example, ``λ ∈ R^n``, with the example weights ``u = σ(λ) ∈ (0, 1)^n`` (a sigmoid keeps
them in the box without projections; ``λ = 0`` gives the uniform weights ½). The inner
problem is a weighted multinomial logistic regression ``w = (W, b)``, W of shape 784 x 10,

    L(w, λ) = Σ_i u_i CE(x_i W + b, ỹ_i) / Σ_i u_i + l2/2 ||W||²,

trained from zero by T steps of gradient descent; the outer objective is the mean
cross-entropy on the validation set, ``E(w) = mean_v CE(x_v W + b, y_v)``. The weighted
*mean* (divided by Σ u) makes uniform weights the plain mean over all examples and 0/1
weights the plain mean over the kept ones, so both baselines (all examples; clean
examples only, the oracle) are this same inner problem with fixed weights, the same T and
the same step size. The hypergradient is the core's reverse mode
(:func:`metalearn.bilevel.unroll` + ``.backward()``, or
:func:`metalearn.bilevel.hypergradient` with ``method="reverse"``); Adam updates λ.

Pixels are scaled to [0, 1] and centered by the training mean (per pixel): the largest
eigenvalue of ``XᵀX / n`` drops from 37.7 to 5.2 (the first 5,000 MNIST images), so the
inner Hessian's norm is at most ½ (5.2 + 1) ≈ 3.1 and gradient descent is stable with a
step about 7x larger than on raw pixels (the default 0.5 < 2 / 3.1).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_f1_score,
    binary_precision,
    binary_recall,
)

from metalearn.bilevel import BilevelProblem, GradientDescent, Tensors, hypergradient, unroll
from metalearn.data.sets.mnist import MnistSet, load_mnist
from metalearn.errors import ConfigError
from metalearn.hpo.common import (
    ExperimentLoggers,
    hpo_settings,
    torch_threads,
)
from metalearn.reports import table, write_json
from metalearn.utils.divergence import diverging
from metalearn.utils.files import save_figure, write_text

__all__ = [
    "HYPERGRADIENT_METHODS",
    "HyperCleaningData",
    "detector_metrics",
    "evaluate_classifier",
    "hyper_cleaning_problem",
    "make_hyper_cleaning_data",
    "optimize_example_weights",
    "run",
    "train_weighted",
]

log = logging.getLogger(__name__)

#: How the hypergradient is computed: ``"unroll"`` keeps the graph of the T steps and calls
#: ``.backward()`` (fastest; memory grows with T), ``"reverse"`` is
#: :func:`metalearn.bilevel.reverse_hypergradient` (stores the T states only and recomputes
#: each step backwards). Both are the exact reverse-mode hypergradient of the T-step problem.
HYPERGRADIENT_METHODS = ("unroll", "reverse")

_CLASSES = 10


@dataclass(frozen=True)
class HyperCleaningData:
    """The three sets of the protocol, as float features and int64 labels.

    Attributes:
        train_x: ``(n, 784)`` training inputs (scaled to [0, 1], centered).
        train_y: ``(n,)`` training labels after corruption (what the learner sees).
        train_clean_y: ``(n,)`` the original training labels.
        corrupted: ``(n,)`` bool, the examples whose label was replaced.
        val_x, val_y: the clean validation set.
        test_x, test_y: the test set.
    """

    train_x: Tensor
    train_y: Tensor
    train_clean_y: Tensor
    corrupted: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor


def make_hyper_cleaning_data(
    train: MnistSet,
    test: MnistSet,
    n_train: int = 5000,
    n_val: int = 5000,
    corruption: float = 0.5,
    seed: int = 0,
    n_test: int | None = None,
) -> HyperCleaningData:
    """Draw the protocol's sets from MNIST.

    The first ``n_train + n_val`` training images (the first 10,000 for the defaults) are
    shuffled with ``seed`` and split into training and validation sets; exactly
    ``round(corruption * n_train)`` training examples, chosen with ``seed``, get a label
    drawn uniformly from the 9 wrong ones. Inputs are scaled to [0, 1], flattened and
    centered by the mean training image.

    Args:
        train: the MNIST training split (the first 10,000 images suffice).
        test: the MNIST test split.
        n_train: training examples.
        n_val: validation examples.
        corruption: fraction of training labels replaced, in [0, 1].
        seed: seeds the shuffle, the corrupted examples and their labels.
        n_test: use only the first ``n_test`` test examples (None: all of them).

    Raises:
        ConfigError: impossible sizes or corruption.
    """
    if n_train < 1 or n_val < 1:
        raise ConfigError(f"hpo.n_train and hpo.n_val must be >= 1, got {n_train}, {n_val}")
    if n_train + n_val > len(train.labels):
        raise ConfigError(
            f"hpo.n_train + hpo.n_val = {n_train + n_val} exceeds the {len(train.labels)} "
            "MNIST training images available"
        )
    if not 0.0 <= corruption <= 1.0:
        raise ConfigError(f"hpo.corruption must lie in [0, 1], got {corruption}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_train + n_val, generator=generator)
    inputs = train.images.flatten(1).float().div_(255.0)
    labels = train.labels.long()
    train_idx, val_idx = order[:n_train], order[n_train:]
    train_x, clean_y = inputs[train_idx], labels[train_idx]
    corrupted = torch.zeros(n_train, dtype=torch.bool)
    corrupted[torch.randperm(n_train, generator=generator)[: round(corruption * n_train)]] = True
    shift = torch.randint(1, _CLASSES, (n_train,), generator=generator)
    noisy_y = torch.where(corrupted, (clean_y + shift) % _CLASSES, clean_y)
    mean = train_x.mean(dim=0)
    test_count = len(test.labels) if n_test is None else min(n_test, len(test.labels))
    return HyperCleaningData(
        train_x=train_x - mean,
        train_y=noisy_y,
        train_clean_y=clean_y,
        corrupted=corrupted,
        val_x=inputs[val_idx] - mean,
        val_y=labels[val_idx],
        test_x=test.images[:test_count].flatten(1).float().div_(255.0) - mean,
        test_y=test.labels[:test_count].long(),
    )


def _logits(x: Tensor, w: Tensors) -> Tensor:
    return torch.addmm(w[1], x, w[0])


def hyper_cleaning_problem(
    data: HyperCleaningData,
    inner_lr: float,
    l2: float = 0.0,
    weights: Callable[[Tensor], Tensor] | None = torch.sigmoid,
) -> BilevelProblem:
    """The bilevel problem: λ = (one value per training example,), w = (W (784, 10), b (10,)).

    Args:
        data: the sets.
        inner_lr: the gradient-descent step size η.
        l2: the ``l2/2 ||W||²`` penalty (the bias is not penalized).
        weights: maps λ[0] to the example weights u; ``torch.sigmoid`` (the outer variables
            are logits) or None (λ[0] are the weights themselves, for fixed weights).

    Returns:
        A :class:`~metalearn.bilevel.BilevelProblem` with zero initialization.
    """
    transform = (lambda z: z) if weights is None else weights
    x, y = data.train_x, data.train_y

    def inner_loss(w: Tensors, lam: Tensors) -> Tensor:
        u = transform(lam[0])
        losses = F.cross_entropy(_logits(x, w), y, reduction="none")
        loss = (u * losses).sum() / u.sum()
        return loss + (l2 / 2) * w[0].pow(2).sum() if l2 else loss

    def outer_loss(w: Tensors, lam: Tensors) -> Tensor:
        return F.cross_entropy(_logits(data.val_x, w), data.val_y)

    features = x.shape[1]
    init = (x.new_zeros(features, _CLASSES), x.new_zeros(_CLASSES))
    return BilevelProblem(inner_loss, outer_loss, GradientDescent(lr=inner_lr), init)


def train_weighted(
    data: HyperCleaningData, weights: Tensor, steps: int, inner_lr: float, l2: float = 0.0
) -> Tensors:
    """The classifier ``w_T`` trained with fixed example weights (no graph)."""
    problem = hyper_cleaning_problem(data, inner_lr, l2, weights=None)
    with torch.no_grad():
        return unroll(problem, (weights.to(data.train_x.dtype),), steps)


def _warn_if_diverging(
    data: HyperCleaningData, w: Tensors, steps: int, lr: float, l2: float
) -> None:
    """Warn when T steps of the inner gradient descent (uniform weights) raise the inner
    loss far above its value at the zero initialization, log(10): the step is too large."""
    problem = hyper_cleaning_problem(data, lr, l2, weights=None)
    uniform = (torch.ones_like(data.train_x[:, 0]),)
    with torch.no_grad():
        first = float(problem.inner_loss(problem.initial_inner(uniform), uniform))
        last = float(problem.inner_loss(w, uniform))
    if diverging(first, last):
        warnings.warn(
            f"hpo.inner_lr={lr}: the inner training loss goes from {first:.4g} to {last:.4g} "
            f"in {steps} steps, so the inner problem diverges and every result of this run "
            f"is meaningless; lower hpo.inner_lr",
            stacklevel=2,
        )


def evaluate_classifier(w: Tensors, x: Tensor, y: Tensor) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` of the linear classifier ``w = (W, b)``."""
    with torch.no_grad():
        logits = _logits(x, w)
        return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def detector_metrics(weights: Tensor, corrupted: Tensor, threshold: float) -> dict[str, float]:
    """Precision, recall and F1 of "weight < threshold" as a detector of corrupted labels.

    Also the threshold-free ROC AUC of ``-weight`` as the score, and the mean weights of
    the clean and of the corrupted examples.
    """
    flagged = (weights < threshold).long()
    target = corrupted.long()
    # ROC AUC is undefined with one class only (torchmetrics would warn and give 0).
    both_classes = bool(corrupted.any()) and not bool(corrupted.all())
    return {
        "detector/precision": float(binary_precision(flagged, target)),
        "detector/recall": float(binary_recall(flagged, target)),
        "detector/f1": float(binary_f1_score(flagged, target)),
        "detector/auc": float(binary_auroc(-weights.double(), target))
        if both_classes
        else math.nan,
        "detector/flagged": float(flagged.sum()),
        "weights/mean_clean": float(weights[~corrupted].mean()) if (~corrupted).any() else 0.0,
        "weights/mean_corrupted": float(weights[corrupted].mean()) if corrupted.any() else 0.0,
    }


def optimize_example_weights(
    data: HyperCleaningData,
    steps: int,
    inner_lr: float,
    outer_steps: int,
    outer_lr: float,
    l2: float = 0.0,
    method: str = "unroll",
    init_logit: float = 0.0,
    callback: Callable[[int, float, Tensor], None] | None = None,
) -> tuple[Tensor, list[float]]:
    """Learn the example logits λ by Adam on the reverse-mode hypergradient.

    Args:
        data: the sets.
        steps: inner steps T.
        inner_lr: inner step size η.
        outer_steps: hypergradient (Adam) steps.
        outer_lr: Adam's step size on the logits.
        l2: the inner L2 penalty.
        method: one of :data:`HYPERGRADIENT_METHODS`.
        init_logit: the initial logit of every example (0: weights ½).
        callback: ``callback(step, outer_loss, logits)`` after each outer step, with the
            validation loss measured before that step's update.

    Returns:
        The final logits ``λ`` (detached, shape (n,)) and the validation loss
        ``E(w_T(λ_k))`` of every outer step k.
    """
    if method not in HYPERGRADIENT_METHODS:
        raise ConfigError(f"hpo.method must be one of {HYPERGRADIENT_METHODS}, got {method!r}")
    problem = hyper_cleaning_problem(data, inner_lr, l2)
    logits = torch.full_like(data.train_y, init_logit, dtype=data.train_x.dtype)
    logits.requires_grad_()
    optimizer = torch.optim.Adam([logits], lr=outer_lr)
    history: list[float] = []
    for step in range(1, outer_steps + 1):
        optimizer.zero_grad(set_to_none=True)
        if method == "unroll":
            value = problem.outer_loss(unroll(problem, (logits,), steps), (logits,))
            value.backward()
        else:
            result = hypergradient(problem, (logits,), steps, method="reverse")
            logits.grad, value = result.grads[0], result.value
        optimizer.step()
        history.append(float(value.detach()))
        if callback is not None:
            callback(step, history[-1], logits.detach())
    return logits.detach(), history


def _row(name: str, metrics: dict[str, float], prefix: str, detector: bool) -> list[str]:
    cells = [
        name,
        f"{100 * metrics[f'{prefix}test/acc']:.2f}",
        f"{metrics[f'{prefix}test/loss']:.4f}",
        f"{100 * metrics[f'{prefix}val/acc']:.2f}",
        f"{metrics[f'{prefix}val/loss']:.4f}",
    ]
    if detector:
        cells += [
            f"{metrics['detector/precision']:.3f}",
            f"{metrics['detector/recall']:.3f}",
            f"{metrics['detector/f1']:.3f}",
            f"{metrics['detector/auc']:.3f}",
        ]
    else:
        cells += ["-"] * 4
    return cells


def _plot_weights(weights: Tensor, corrupted: Tensor, threshold: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    bins = torch.linspace(0, 1, 41).tolist()
    axis.hist(weights[~corrupted].tolist(), bins=bins, alpha=0.6, label="clean labels")
    axis.hist(weights[corrupted].tolist(), bins=bins, alpha=0.6, label="corrupted labels")
    axis.axvline(threshold, color="k", linestyle="--", linewidth=1, label="threshold")
    axis.set_xlabel("learned example weight σ(λ_i)")
    axis.set_ylabel("examples")
    axis.set_title("data hyper-cleaning: learned weights")
    axis.legend()
    return save_figure(figure, path)


_REQUIRED = (
    "data_dir",
    "download",
    "n_train",
    "n_val",
    "corruption",
    "seed",
    "inner_steps",
    "inner_lr",
    "l2",
    "outer_steps",
    "outer_lr",
    "threshold",
    "method",
)


def run(cfg: DictConfig) -> dict[str, float]:
    """``python train.py experiment=hyper_cleaning_mnist``: settings from ``cfg.hpo``.

    Trains the two baselines and learns the example weights, prints a table, writes
    ``hyper_cleaning.json``, ``hyper_cleaning.md`` and ``weights.png`` into
    ``cfg.paths.output_dir`` and returns the metrics (``test/acc``,
    ``baseline_all/test/acc``, ``oracle/test/acc``, ``detector/f1``, ...).
    """
    hpo = hpo_settings(cfg, _REQUIRED)
    out_dir = Path(cfg.paths.output_dir)
    with torch_threads(hpo.get("num_threads")):
        start = time.perf_counter()
        progress = bool(hpo.get("progress", True))
        train_set = load_mnist(hpo["data_dir"], "train", hpo["download"], progress)
        test_set = load_mnist(hpo["data_dir"], "test", hpo["download"], progress)
        data = make_hyper_cleaning_data(
            train_set,
            test_set,
            n_train=int(hpo["n_train"]),
            n_val=int(hpo["n_val"]),
            corruption=float(hpo["corruption"]),
            seed=int(hpo["seed"]),
            n_test=hpo.get("n_test"),
        )
        steps, lr, l2 = int(hpo["inner_steps"]), float(hpo["inner_lr"]), float(hpo["l2"])
        threshold = float(hpo["threshold"])
        if steps < 1 or lr <= 0 or int(hpo["outer_steps"]) < 0:
            raise ConfigError("hpo.inner_steps must be >= 1, hpo.inner_lr > 0, outer_steps >= 0")
        metrics: dict[str, float] = {}
        baselines = {
            "baseline_all/": torch.ones(len(data.train_y)),
            "oracle/": (~data.corrupted).float(),
        }
        for prefix, fixed in baselines.items():
            w = train_weighted(data, fixed, steps, lr, l2)
            if prefix == "baseline_all/":
                _warn_if_diverging(data, w, steps, lr, l2)
            for split, (x, y) in {
                "val": (data.val_x, data.val_y),
                "test": (data.test_x, data.test_y),
            }.items():
                loss, acc = evaluate_classifier(w, x, y)
                metrics[f"{prefix}{split}/loss"], metrics[f"{prefix}{split}/acc"] = loss, acc

        loggers = ExperimentLoggers(cfg)
        log_every = max(int(hpo.get("log_every", 10)), 1)
        outer_start = time.perf_counter()

        def report(step: int, value: float, logits: Tensor) -> None:
            if step % log_every and step != int(hpo["outer_steps"]):
                return
            found = detector_metrics(torch.sigmoid(logits), data.corrupted, threshold)
            line = {"outer/val_loss": value, **found}
            loggers.log_metrics(line, step)
            log.info(
                "outer step %d: val loss %.4f, detector F1 %.3f (%.0f s)",
                step,
                value,
                found["detector/f1"],
                time.perf_counter() - outer_start,
            )

        logits, history = optimize_example_weights(
            data,
            steps,
            lr,
            int(hpo["outer_steps"]),
            float(hpo["outer_lr"]),
            l2=l2,
            method=str(hpo["method"]),
            init_logit=float(hpo.get("init_logit", 0.0)),
            callback=report,
        )
        outer_seconds = time.perf_counter() - outer_start
        weights = torch.sigmoid(logits)
        w = train_weighted(data, weights, steps, lr, l2)
        for split, (x, y) in {
            "val": (data.val_x, data.val_y),
            "test": (data.test_x, data.test_y),
        }.items():
            metrics[f"{split}/loss"], metrics[f"{split}/acc"] = evaluate_classifier(w, x, y)
        metrics.update(detector_metrics(weights, data.corrupted, threshold))
        metrics["time/outer_seconds"] = outer_seconds
        metrics["time/total_seconds"] = time.perf_counter() - start

    header = [
        "method",
        "test acc (%)",
        "test loss",
        "val acc (%)",
        "val loss",
        "precision",
        "recall",
        "F1",
        "AUC",
    ]
    rows = [
        _row("all examples (uniform weights)", metrics, "baseline_all/", False),
        _row("hyper-cleaning (learned weights)", metrics, "", True),
        _row("clean examples only (oracle)", metrics, "oracle/", False),
    ]
    rendered = table(header, rows)
    n_corrupted = int(data.corrupted.sum())
    summary = (
        f"{len(data.train_y)} training examples ({n_corrupted} with a wrong label), "
        f"{len(data.val_y)} validation, {len(data.test_y)} test; T = {steps} inner steps "
        f"(lr {lr}, l2 {l2}), {int(hpo['outer_steps'])} outer Adam steps (lr "
        f"{hpo['outer_lr']}, {hpo['method']} hypergradient) in {outer_seconds:.0f} s; "
        f"detector: weight < {threshold}"
    )
    print(rendered, end="")
    print(summary)
    settings: dict[str, Any] = {k: v for k, v in hpo.items() if k != "data_dir"}
    write_json(
        {"metrics": metrics, "settings": settings, "outer_val_loss": history},
        out_dir / "hyper_cleaning.json",
    )
    write_text(
        out_dir / "hyper_cleaning.md", f"# Data hyper-cleaning (MNIST)\n\n{rendered}\n{summary}\n"
    )
    plot = _plot_weights(weights, data.corrupted, threshold, out_dir / "weights.png")
    print(f"reports written to {out_dir} (hyper_cleaning.md, hyper_cleaning.json, {plot.name})")
    loggers.log_metrics(metrics, int(hpo["outer_steps"]))
    loggers.log_images({"hyper_cleaning/weights": plot})
    loggers.log_summary(metrics)
    loggers.finalize()
    return metrics
