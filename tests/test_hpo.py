"""Hyperparameter-optimization experiments: hyper-cleaning and the effect of T, end to end."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf
from test_mnist import make_mnist_fixture, mnist_like, real_mnist_dir

from metalearn.bilevel import hypergradient, unroll
from metalearn.data.sets.mnist import MnistSet
from metalearn.errors import ConfigError, DataError
from metalearn.hpo import (
    HyperCleaningData,
    detector_metrics,
    hyper_cleaning_problem,
    make_gaussian_mixture,
    make_hyper_cleaning_data,
    optimize_example_weights,
    representation_problem,
    solve_inner,
    stable_inner_lr,
)
from metalearn.pipeline import train
from metalearn.utils.console import user_error

HPO_EXPERIMENTS = ("hyper_cleaning_mnist", "effect_of_T")


@pytest.fixture
def one_thread():
    """These problems are tiny; a second thread only fights other processes for the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_cleaning_data(n: int = 6, features: int = 4, seed: int = 0) -> HyperCleaningData:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (n,), generator=gen)
    xv = torch.randn(8, features, generator=gen, dtype=torch.float64)
    yv = torch.randint(0, 10, (8,), generator=gen)
    return HyperCleaningData(x, y, y, torch.zeros(n, dtype=torch.bool), xv, yv, xv, yv)


def f_T(problem, logits: torch.Tensor, steps: int) -> float:
    with torch.no_grad():
        return float(problem.outer_loss(unroll(problem, (logits,), steps), (logits,)))


# --------------------------------------------------------------------------------------
# Hyper-cleaning: the math and the pieces
# --------------------------------------------------------------------------------------


def test_hyper_cleaning_hypergradient_matches_finite_differences(one_thread) -> None:
    data = tiny_cleaning_data()
    problem = hyper_cleaning_problem(data, inner_lr=0.5, l2=0.01)
    logits = torch.linspace(-1.5, 2.0, 6, dtype=torch.float64)
    steps = 12
    result = hypergradient(problem, (logits,), steps, method="reverse")
    eps = 1e-6
    numeric = torch.zeros_like(logits)
    for i in range(len(logits)):
        up, down = logits.clone(), logits.clone()
        up[i] += eps
        down[i] -= eps
        numeric[i] = (f_T(problem, up, steps) - f_T(problem, down, steps)) / (2 * eps)
    error = float((result.grads[0] - numeric).norm() / numeric.norm())
    assert error < 1e-7, error
    # the graph-keeping form used by the experiment gives the same hypergradient
    leaf = logits.clone().requires_grad_()
    problem.outer_loss(unroll(problem, (leaf,), steps), (leaf,)).backward()
    assert torch.allclose(leaf.grad, result.grads[0], rtol=1e-10, atol=1e-14)
    # and both methods take the optimizer to the same place
    found = [
        optimize_example_weights(data, steps, 0.5, 3, 0.1, l2=0.01, method=m)[0]
        for m in ("unroll", "reverse")
    ]
    assert torch.allclose(found[0], found[1], rtol=1e-9, atol=1e-12)
    with pytest.raises(ConfigError, match="hpo.method"):
        optimize_example_weights(data, steps, 0.5, 1, 0.1, method="forward")


def test_uniform_and_binary_weights_are_plain_means() -> None:
    """Σ u_i ℓ_i / Σ u_i: uniform weights give the mean over all examples, 0/1 weights the
    mean over the kept ones; the scale of the weights does not matter."""
    data = tiny_cleaning_data(n=5)
    problem = hyper_cleaning_problem(data, inner_lr=0.5, weights=None)
    w = (torch.randn(4, 10, dtype=torch.float64), torch.randn(10, dtype=torch.float64))
    losses = torch.nn.functional.cross_entropy(
        data.train_x @ w[0] + w[1], data.train_y, reduction="none"
    )
    ones = torch.ones(5, dtype=torch.float64)
    assert torch.isclose(problem.inner_loss(w, (ones,)), losses.mean())
    assert torch.isclose(problem.inner_loss(w, (3 * ones,)), losses.mean())
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    assert torch.isclose(problem.inner_loss(w, (mask,)), losses[[0, 2]].mean())


def test_detector_metrics() -> None:
    weights = torch.tensor([0.1, 0.9, 0.4, 0.6])
    corrupted = torch.tensor([True, False, False, True])
    got = detector_metrics(weights, corrupted, threshold=0.5)
    assert got["detector/precision"] == 0.5 and got["detector/recall"] == 0.5
    assert got["detector/f1"] == 0.5 and got["detector/flagged"] == 2
    assert got["detector/auc"] == pytest.approx(0.75)
    assert got["weights/mean_clean"] == pytest.approx(0.65)
    assert got["weights/mean_corrupted"] == pytest.approx(0.35)
    tied = detector_metrics(torch.full((4,), 0.5), corrupted, threshold=0.5)
    assert tied["detector/auc"] == 0.5 and tied["detector/f1"] == 0.0
    perfect = detector_metrics(torch.tensor([0.0, 1.0, 1.0, 0.2]), corrupted, threshold=0.5)
    assert perfect["detector/f1"] == 1.0 and perfect["detector/auc"] == 1.0
    clean = detector_metrics(weights, torch.zeros(4, dtype=torch.bool), threshold=0.5)
    assert math.isnan(clean["detector/auc"]) and clean["detector/recall"] == 0.0
    assert clean["detector/precision"] == 0.0 and clean["detector/flagged"] == 2


def test_make_hyper_cleaning_data() -> None:
    train = MnistSet(*(torch.from_numpy(a) for a in mnist_like(300, 0)))
    test = MnistSet(*(torch.from_numpy(a) for a in mnist_like(50, 1)))
    data = make_hyper_cleaning_data(train, test, n_train=100, n_val=120, corruption=0.5, seed=3)
    assert data.train_x.shape == (100, 784) and data.val_x.shape == (120, 784)
    assert data.test_x.shape == (50, 784)
    assert int(data.corrupted.sum()) == 50
    assert bool((data.train_y[data.corrupted] != data.train_clean_y[data.corrupted]).all())
    assert torch.equal(data.train_y[~data.corrupted], data.train_clean_y[~data.corrupted])
    assert float(data.train_x.mean(0).abs().max()) < 1e-5  # centered by the training mean
    # training and validation split the first 220 images between them
    used = torch.cat([data.train_clean_y, data.val_y]).bincount(minlength=10)
    assert torch.equal(used, train.labels[:220].long().bincount(minlength=10))
    again = make_hyper_cleaning_data(train, test, n_train=100, n_val=120, seed=3)
    assert torch.equal(again.train_y, data.train_y) and torch.equal(again.val_x, data.val_x)
    other = make_hyper_cleaning_data(train, test, n_train=100, n_val=120, seed=4)
    assert not torch.equal(other.corrupted, data.corrupted)
    with pytest.raises(ConfigError, match="exceeds"):
        make_hyper_cleaning_data(train, test, n_train=200, n_val=101)
    with pytest.raises(ConfigError, match="corruption"):
        make_hyper_cleaning_data(train, test, n_train=10, n_val=10, corruption=1.5)


# --------------------------------------------------------------------------------------
# Hyper-cleaning end to end, through train.py's config
# --------------------------------------------------------------------------------------


def _small_cleaning_run(tmp_path: Path, data_dir: Path, extra: list[str]) -> tuple[dict, Path]:
    out = tmp_path / "run"
    overrides = [
        "experiment=hyper_cleaning_mnist",
        "hpo.n_train=400",
        "hpo.n_val=400",
        "hpo.inner_steps=40",
        "hpo.outer_steps=10",
        "hpo.download=false",
        "hpo.progress=false",
        *extra,
    ]
    cfg = compose_config("train", overrides, out, data_dir, tmp_path / "cache")
    return train(cfg), out


def _check_cleaning_outputs(metrics: dict, out: Path) -> None:
    for prefix in ("", "baseline_all/", "oracle/"):
        for key in ("test/acc", "test/loss", "val/acc", "val/loss"):
            assert math.isfinite(metrics[prefix + key]), prefix + key
    for key in ("precision", "recall", "f1", "auc"):
        assert 0.0 <= metrics[f"detector/{key}"] <= 1.0
    assert all(isinstance(v, float) for v in metrics.values())
    # the learned weights of corrupted examples are lower than those of clean ones
    assert metrics["weights/mean_corrupted"] < metrics["weights/mean_clean"] - 0.1
    report = json.loads((out / "hyper_cleaning.json").read_text())
    assert report["metrics"]["test/acc"] == metrics["test/acc"]
    assert len(report["outer_val_loss"]) == 10
    assert "| hyper-cleaning (learned weights) |" in (out / "hyper_cleaning.md").read_text()
    assert (out / "weights.png").stat().st_size > 0
    assert list((out / "csv").glob("metrics.csv"))


def test_hyper_cleaning_runs_on_generated_mnist(tmp_path, one_thread) -> None:
    """Runs anywhere (generated MNIST-shaped files, no Omniglot in the data root)."""
    data_dir = make_mnist_fixture(tmp_path / "data", n_train=800, n_test=200)
    metrics, out = _small_cleaning_run(tmp_path, data_dir, [])
    _check_cleaning_outputs(metrics, out)
    assert metrics["detector/f1"] > 0.7
    assert metrics["test/loss"] < metrics["baseline_all/test/loss"]  # both reach 100% here


def test_a_diverging_inner_loop_is_reported(tmp_path, one_thread) -> None:
    """hpo.inner_lr far above the stable step: the run says so, naming the setting."""
    data_dir = make_mnist_fixture(tmp_path / "data", n_train=800, n_test=200)
    with pytest.warns(UserWarning, match=r"hpo.inner_lr=10000.0: the inner training loss goes"):
        _small_cleaning_run(
            tmp_path, data_dir, ["hpo.inner_lr=1e4", "hpo.inner_steps=10", "hpo.outer_steps=1"]
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*inner training loss goes")
        _small_cleaning_run(tmp_path / "stable", data_dir, ["hpo.outer_steps=1"])


def test_hyper_cleaning_real_mnist(tmp_path, one_thread) -> None:
    data_dir = real_mnist_dir()
    if data_dir is None:
        pytest.skip("real MNIST not found (set METALEARN_DATA_DIR or provide ../shared/data)")
    metrics, out = _small_cleaning_run(tmp_path, data_dir, ["hpo.method=reverse"])
    _check_cleaning_outputs(metrics, out)
    # a real learning signal: weights find the corrupted labels and beat training on all
    assert metrics["detector/f1"] > 0.7 and metrics["detector/auc"] > 0.8
    assert metrics["test/acc"] > metrics["baseline_all/test/acc"] + 0.05


def test_hyper_cleaning_missing_data_is_one_line(tmp_path) -> None:
    with pytest.raises(Exception) as err:  # Hydra wraps what the runner raises
        _small_cleaning_run(tmp_path, tmp_path / "empty", [])
    cause = user_error(err.value)
    assert isinstance(cause, DataError)
    assert "\n" not in str(cause) and "mnist" in str(cause) and "METALEARN_DATA_DIR" in str(cause)


# --------------------------------------------------------------------------------------
# Effect of T
# --------------------------------------------------------------------------------------


def test_stable_inner_lr_bounds_the_inner_hessian() -> None:
    """1 / lr bounds the Hessian of the inner loss for a P on the ball's worst direction."""
    data = make_gaussian_mixture(classes=4, input_dim=6, signal_dim=2, test_per_class=2)
    radius, l2 = 5.0, 0.1
    lr = stable_inner_lr(data.train_x, radius, l2)
    problem = representation_problem(data, feature_dim=2, l2=l2, inner_lr=lr)
    top = torch.linalg.eigh(data.train_x.T @ data.train_x)[1][:, -1]
    worst = torch.stack([top, torch.zeros_like(top)]) * radius  # ||P||_F = R, along σ's vector
    for representation in (worst, torch.randn(2, 6, dtype=torch.float64)):

        def loss(flat, representation=representation):
            w = (flat[:8].view(2, 4), flat[8:])
            return problem.inner_loss(w, (representation,))

        flat = torch.randn(12, dtype=torch.float64) * 0.3
        hessian = torch.autograd.functional.hessian(loss, flat)
        assert float(torch.linalg.eigvalsh(hessian).max()) <= 1 / lr


def test_solve_inner_reaches_a_stationary_point(one_thread) -> None:
    data = make_gaussian_mixture(classes=3, input_dim=5, signal_dim=2, test_per_class=2)
    problem = representation_problem(data, 2, 1.0, stable_inner_lr(data.train_x, 3.0, 1.0))
    representation = torch.randn(
        2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    w, norm = solve_inner(problem, representation, tol=1e-10)
    assert norm <= 1e-10
    # the implicit hypergradient at w* equals the reverse mode through many steps
    implicit = hypergradient(problem, (representation,), 200, method="implicit_cg")
    reverse = hypergradient(problem, (representation,), 200, method="reverse")
    assert torch.allclose(implicit.grads[0], reverse.grads[0], rtol=1e-6, atol=1e-9)
    with pytest.raises(ConfigError, match="strongly convex"):
        representation_problem(data, 2, 0.0, 0.1)


def test_effect_of_T_runs_end_to_end(tmp_path, one_thread) -> None:
    out = tmp_path / "run"
    cfg = compose_config(
        "train",
        [
            "experiment=effect_of_T",
            "hpo.inner_steps=[1,30]",
            "hpo.outer_steps=25",
            "hpo.test_per_class=50",
            "hpo.warm_steps=50",
        ],
        out,
        tmp_path / "no-data-here",
        tmp_path / "cache",
    )
    metrics = train(cfg)
    for key in ("T1", "T30", "implicit"):
        for name in ("outer_objective", "exact_objective", "test/acc", "exact/test/acc"):
            assert math.isfinite(metrics[f"{key}/{name}"])
    # the exact problem's solution has a lower exact objective than the T = 1 solution, and
    # the T-step objective at the found λ_T decreases towards it as T grows
    assert metrics["implicit/exact_objective"] <= metrics["T1/exact_objective"]
    assert metrics["implicit/outer_objective"] < metrics["T30/outer_objective"]
    assert metrics["T30/outer_objective"] < metrics["T1/outer_objective"]
    assert metrics["implicit/inner_grad_norm"] <= 1e-8
    report = json.loads((out / "effect_of_T.json").read_text())
    assert [r["T"] for r in report["results"]] == [1, 30]
    assert "| exact (implicit CG) |" in (out / "effect_of_T.md").read_text()
    assert (out / "effect_of_T.png").stat().st_size > 0


@pytest.mark.parametrize("experiment", HPO_EXPERIMENTS)
def test_hpo_configs_compose(experiment, tmp_path) -> None:
    cfg = compose_config("train", [f"experiment={experiment}"], tmp_path, tmp_path, tmp_path)
    OmegaConf.resolve(cfg)
    assert cfg.runner._target_.startswith("metalearn.hpo.")
    assert cfg.task_name == experiment and "hpo" in cfg.tags
    assert cfg.hpo.seed == cfg.seed


def test_hpo_runner_logs_to_wandb_offline(tmp_path, one_thread) -> None:
    out = tmp_path / "run"
    cfg = compose_config(
        "train",
        [
            "experiment=effect_of_T",
            "logger=wandb",
            "hpo.inner_steps=[1]",
            "hpo.outer_steps=2",
            "hpo.test_per_class=5",
        ],
        out,
        tmp_path,
        tmp_path,
    )
    train(cfg)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
