"""model.compile: the compiled meta-step computes what the eager one computes, in one graph.

Compiling costs seconds per graph on the CPU, so these tests use a narrow backbone and few
episodes; the speed of the compiled step is measured in bench/step_speed.py, not here.
"""

from __future__ import annotations

import logging

import pytest
import pytorch_lightning as pl
import torch
from test_operations import max_difference, parameters, run_tiny

from metalearn.checkpoint import read_checkpoint
from metalearn.data.episodes import EpisodeSampler
from metalearn.errors import ConfigError
from metalearn.lightning import ANIL, MAML, ClassicalJointTraining, HyperRepresentation
from metalearn.pipeline import model_from_checkpoint

NARROW = {
    "_target_": "metalearn.models.ConvBackbone",
    "in_channels": 1,
    "channels": 8,
    "image_size": 28,
}


@pytest.fixture(scope="module")
def batch():
    # Its own generator: the batch must not depend on which tests ran before in the process.
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 6, 1, 28, 28), dtype=torch.uint8, generator=generator)
    return EpisodeSampler(images, 5, 1, 2, seed=0, split="train").sample(range(3))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def twins(cls, **settings):
    torch.manual_seed(0)
    eager = cls(NARROW, **settings)
    compiled = cls(NARROW, compile=True, **settings)
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


@pytest.mark.parametrize(
    "settings",
    [
        {"inner_steps": 1},
        pytest.param(
            {"inner_steps": 5, "center_features": True, "batch_stats": "split"},
            marks=pytest.mark.slow,
        ),
        {"inner_steps": 5, "truncate": 2, "batch_stats": "support"},
    ],
    ids=["T1", "T5-centered-split", "T5-truncated-support"],
)
def test_the_compiled_meta_step_equals_the_eager_one(batch, settings):
    """Float32 on the CPU: the query loss and every gradient (backbone, inner learning
    rate) within 1e-5 relative, and the same accuracy after each inner step on the same
    episodes at evaluation.

    The inner learning rate's gradient is one number, a sum over every episode, step and
    feature whose terms cancel: float32's own rounding of it, measured against float64,
    can exceed 1e-5 of the result (2e-5 has been seen). A gradient whose eager float32
    value is that far from float64 must be within 2 times eager's own error of float64:
    compiled is then as accurate as eager, which is what 1e-5 asks of the others.
    """
    torch._dynamo.reset()
    eager, compiled = twins(HyperRepresentation, **settings)
    exact = HyperRepresentation(NARROW, **settings).double()
    exact.load_state_dict(eager.state_dict())
    steps = settings["inner_steps"]
    losses = []
    for model in (eager, compiled, exact):
        loss, _, _ = model.episode_forward(batch, steps)
        loss.mean().backward()
        losses.append(loss.detach().double())
    assert relative(losses[1], losses[0]) < 1e-5
    named = zip(eager.named_parameters(), compiled.parameters(), exact.parameters(), strict=True)
    for (name, p), q, r in named:
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            g32, gc, g64 = p.grad.double(), q.grad.double(), r.grad
            rounding = relative(g32, g64)
            assert relative(gc, g32) < max(1e-5, 3 * rounding), name
            assert relative(gc, g64) < max(1e-5, 2 * rounding), name
    if steps == 1:  # one evaluation graph is enough (each costs a compile)
        with torch.no_grad():
            curves = [m.episode_forward(batch, 3, per_step=True)[2] for m in (eager, compiled)]
        assert torch.equal(curves[0], curves[1])


def test_the_compiled_region_has_no_graph_break(batch):
    """The whole step (backbone, centering, T head steps with the per-step accuracy, query
    loss) is one graph, for ANIL's learned head as for the hyper-representation."""
    for model in (HyperRepresentation(NARROW, inner_steps=3, center_features=True), ANIL(NARROW)):
        for per_step in (False, True):
            explained = torch._dynamo.explain(model._episode_forward)(batch, 3, per_step)
            assert explained.graph_break_count == 0, explained.break_reasons
            assert explained.graph_count == 1


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: MAML(NARROW, compile=True, batch_stats="split"), "MAML cannot be compiled"),
        (lambda: ClassicalJointTraining(NARROW, compile=True), "classical baseline"),
        (lambda: HyperRepresentation(NARROW, compile="fastest"), "one of default"),
    ],
    ids=["maml", "classical", "unknown-mode"],
)
def test_a_compile_setting_that_cannot_work_is_a_config_error(build, match):
    with pytest.raises(ConfigError, match=f"model.compile.*{match}"):
        build()


def test_cuda_graphs_on_the_cpu_are_an_error_before_training():
    model = HyperRepresentation(NARROW, compile="reduce-overhead")
    model.trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    with pytest.raises(ConfigError, match="reduce-overhead .*needs a CUDA device"):
        model.setup("fit")


def test_a_compiled_run_compiles_each_graph_once_and_says_how_long_it_took(
    tmp_path, data_dir, real_cache_dir, caplog
):
    """Training, two validations and the test: one training graph and one evaluation
    graph (switching between them recompiles nothing), each compile time reported once;
    and the run learns what the eager run learns."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    tiny = [
        "model.backbone.channels=8",
        "data.val_episodes=4",
        "data.test_episodes=4",
        "trainer.val_check_interval=2",
        # Plain SGD: Adam's normalized update would turn float32 rounding of near-zero
        # gradient entries into differences of up to the learning rate.
        "model.optimizer._target_=torch.optim.SGD",
        "model.optimizer.lr=0.1",
    ]
    with caplog.at_level(logging.INFO):
        compiled = run_tiny(
            tmp_path / "compiled", data_dir, real_cache_dir, *tiny, "model.compile=true"
        )
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs == 2, dict(torch._dynamo.utils.counters["stats"])
    reports = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert len(reports) == 2, reports
    assert any("training step" in r for r in reports) and any("evaluation" in r for r in reports)
    eager = run_tiny(tmp_path / "eager", data_dir, real_cache_dir, *tiny)
    last = "checkpoints/last.ckpt"
    assert (
        max_difference(
            parameters(tmp_path / "compiled" / last), parameters(tmp_path / "eager" / last)
        )
        < 1e-4
    )
    assert compiled["test/accuracy"] == pytest.approx(eager["test/accuracy"], abs=1e-6)
    # evaluate.py runs as it is told (compile=false by default), not as training ran.
    checkpoint = read_checkpoint(tmp_path / "compiled" / last)
    assert checkpoint["hyper_parameters"]["compile"] is True
    assert model_from_checkpoint(checkpoint).compile_mode is None
    assert model_from_checkpoint(checkpoint, compile=True).compile_mode == "default"


@pytest.mark.slow
def test_a_compiled_run_on_two_ranks_resumes_as_the_eager_one(tmp_path, data_dir, real_cache_dir):
    """trainer=ddp_cpu (two spawned ranks) with model.compile=true, stopped after 2 steps
    and resumed to 4, ends where the eager 4-step run on two ranks ends."""
    common = [
        "model.backbone.channels=8",
        "trainer=ddp_cpu",
        "trainer.strategy=ddp_spawn",
        "test=false",
        "callbacks.last_checkpoint.every_n_train_steps=1",
        "model.optimizer._target_=torch.optim.SGD",
        "model.optimizer.lr=0.1",
    ]
    run_tiny(
        tmp_path / "c",
        data_dir,
        real_cache_dir,
        *common,
        "model.compile=true",
        "trainer.max_steps=2",
    )
    run_tiny(
        tmp_path / "c",
        data_dir,
        real_cache_dir,
        *common,
        "model.compile=true",
        "trainer.max_steps=4",
        "ckpt_path=last",
    )
    run_tiny(tmp_path / "e", data_dir, real_cache_dir, *common, "trainer.max_steps=4")
    last = "checkpoints/last.ckpt"
    assert (
        max_difference(parameters(tmp_path / "c" / last), parameters(tmp_path / "e" / last)) < 1e-4
    )
