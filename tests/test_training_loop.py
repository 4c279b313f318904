"""The training loop on real Omniglot: skipped meta-batches, divergence, ranks that agree."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import pytorch_lightning as pl
from recorder import read_records
from test_operations import TINY, cli, max_difference, parameters, run_tiny

from metalearn.checkpoint import read_checkpoint
from metalearn.data.datamodule import EpisodicDataModule
from metalearn.errors import ConfigError
from metalearn.lightning import HyperRepresentation
from metalearn.pipeline import _warn_per_rank_statistics
from metalearn.reports import write_json
from metalearn.utils.console import user_error

CONV4 = {"_target_": "metalearn.models.ConvBackbone"}
NAN_AT_STEP_2 = ["model._target_=faulty.NaNAtSteps", "+model.nan_steps=[2]"]


@pytest.fixture(autouse=True)
def _trust_the_test_learner(monkeypatch):
    monkeypatch.setenv("METALEARN_TRUSTED_TARGETS", "faulty.")


def record(folder) -> list[str]:
    return [
        "+callbacks.recorder._target_=recorder.RecordEpisodes",
        f"+callbacks.recorder.folder={folder}",
    ]


def test_a_skipped_meta_batch_is_a_step_and_a_resume_neither_replays_nor_drops_one(
    tmp_path, data_dir, real_cache_dir
):
    """Meta-batch s holds episodes 4s..4s+3 also after a skipped step, the skipped update
    leaves parameters and optimizer state alone, and 3 + 3 resumed steps give 6 straight."""
    common = [*NAN_AT_STEP_2, "model.nonfinite=skip", "test=false", "trainer.val_check_interval=3"]
    common += ["callbacks.last_checkpoint.every_n_train_steps=1"]
    with pytest.warns(UserWarning, match="at step 2.*skipping this meta-batch") as caught:
        run_tiny(
            tmp_path / "straight",
            data_dir,
            real_cache_dir,
            *common,
            "trainer.max_steps=6",
            *record(tmp_path / "ids"),
        )
    # A learning run is never reported as diverging (the warning below is for real ones).
    assert not [w for w in caught if "diverging" in str(w.message)]
    steps = read_records(tmp_path / "ids")[0]
    assert [row["step"] for row in steps] == list(range(6))
    assert [row["ids"] for row in steps] == [list(range(4 * s, 4 * s + 4)) for s in range(6)]
    straight = read_checkpoint(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    assert straight["global_step"] == 6 and straight["skipped_batches"] == 1
    adam_steps = {int(state["step"]) for state in straight["optimizer_states"][0]["state"].values()}
    assert adam_steps == {5}  # five updates in six steps

    run_tiny(tmp_path / "resumed", data_dir, real_cache_dir, *common, "trainer.max_steps=3")
    first = read_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert first["global_step"] == 3 and first["skipped_batches"] == 1
    ckpt = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    run_tiny(
        tmp_path / "resumed",
        data_dir,
        real_cache_dir,
        *common,
        "trainer.max_steps=6",
        f"ckpt_path={ckpt}",
        *record(tmp_path / "ids2"),
    )
    assert [row["ids"] for row in read_records(tmp_path / "ids2")[0]] == [
        list(range(4 * s, 4 * s + 4)) for s in range(3, 6)
    ]
    assert max_difference(straight["state_dict"], parameters(ckpt)) == 0.0


def test_a_run_in_which_every_step_was_skipped_fails(tmp_path, data_dir, real_cache_dir):
    result = cli(
        "train.py",
        [
            *TINY,
            "model.inner_lr=1e38",
            "model.nonfinite=skip",
            "trainer.max_steps=3",
            "trainer.val_check_interval=3",
            f"hydra.run.dir={tmp_path}",
        ],
        data_dir,
        real_cache_dir,
    )
    assert result.returncode == 2
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert "every training step (3)" in line and "model.inner_lr" in line
    assert not (tmp_path / "eval.json").exists()


def test_a_finite_but_exploding_loss_is_reported_once(tmp_path, data_dir, real_cache_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = run_tiny(
            tmp_path / "run",
            data_dir,
            real_cache_dir,
            "model.inner_lr=1e6",
            "model.learn_inner_lr=false",
            "test=false",
        )
    assert math.isfinite(metrics["train/loss"]) and metrics["train/loss"] > 100
    (warning,) = [str(w.message) for w in caught if "diverging" in str(w.message)]
    assert "inner lr 1e+06" in warning and "lower model.inner_lr" in warning


def test_reports_hold_no_bare_nan(tmp_path):
    path = write_json(
        {"accuracy": 0.5, "loss": float("nan"), "curve": [1.0, float("inf")]}, tmp_path / "r.json"
    )
    assert json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(name)) == {
        "accuracy": 0.5,
        "loss": None,
        "curve": [1.0, None],
    }


def test_plain_ddp_launched_as_a_user_launches_it_agrees_on_skips_and_resumes_exactly(
    tmp_path, data_dir, real_cache_dir
):
    """`python train.py trainer=ddp_cpu trainer.strategy=ddp` (ranks started by re-running
    the command) for 2 steps, resumed to 4, with a NaN loss on rank 1 only at step 2 and 1
    validation episode for 2 ranks: both ranks skip that update (no hang), the rank
    without a validation episode takes part, and the run ends as one process trained 4
    steps straight that skips the same meta-batch."""
    common = [*TINY, *NAN_AT_STEP_2, "model.nonfinite=skip", "trainer.precision=64-true"]
    common += ["trainer.val_check_interval=2", "data.val_episodes=1", "data.test_episodes=3"]
    single = run_tiny(
        tmp_path / "one", data_dir, real_cache_dir, *common[len(TINY) :], "trainer.max_steps=4"
    )
    run = tmp_path / "ddp"
    ddp = [*common, "trainer=ddp_cpu", "trainer.strategy=ddp", "+model.nan_rank=1"]
    ddp += [f"hydra.run.dir={run}"]
    first = cli("train.py", [*ddp, "trainer.max_steps=2", "test=false"], data_dir, real_cache_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    resumed = cli(
        "train.py", [*ddp, "trainer.max_steps=4", f"ckpt_path={last}"], data_dir, real_cache_dir
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    checkpoint = read_checkpoint(last)
    assert checkpoint["global_step"] == 4 and checkpoint["skipped_batches"] == 1
    reference = read_checkpoint(tmp_path / "one" / "checkpoints" / "last.ckpt")
    assert max_difference(reference["state_dict"], checkpoint["state_dict"]) <= 1e-6
    assert checkpoint["val_acc_best"] == pytest.approx(reference["val_acc_best"], abs=1e-9)
    report = json.loads((run / "eval.json").read_text())
    assert report["episodes"] == 3  # the test episodes of both ranks, each once
    assert report["accuracy"] == pytest.approx(single["test/accuracy"], abs=1e-9)


@pytest.mark.parametrize("batch_stats", ["meta_batch", "running", "episode"])
def test_statistics_over_the_meta_batch_on_several_ranks_are_named(batch_stats):
    """meta_batch (and running, in training) normalize over each rank's slice of the
    meta-batch: a 2-rank trainer says so before training; per-episode settings do not."""
    model = HyperRepresentation(CONV4, batch_stats=batch_stats)
    data = EpisodicDataModule(meta_batch=4)
    trainer = pl.Trainer(accelerator="cpu", strategy="ddp_spawn", devices=2, logger=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _warn_per_rank_statistics(trainer, model, data)
    messages = [str(w.message) for w in caught if "rank's" in str(w.message)]
    if batch_stats == "episode":
        assert messages == []
    else:
        (message,) = messages
        assert f"model.batch_stats={batch_stats} on 2 ranks" in message
        assert "over each rank's 2 episodes of the meta-batch of 4" in message


def test_an_error_in_a_spawned_rank_is_one_line(tmp_path, data_dir, real_cache_dir):
    """ddp_spawn ranks send their exceptions back as text: the entry point still prints
    the user's error as one line (here a NaN loss on both ranks at step 0)."""
    args = [*TINY, "trainer=ddp_cpu", "model.inner_lr=1e38", "model.learn_inner_lr=false"]
    result = cli("train.py", [*args, f"hydra.run.dir={tmp_path}"], data_dir, real_cache_dir)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert "the training loss is nan at step 0" in line and "model.nonfinite=skip" in line


def test_user_error_rebuilds_only_metalearn_errors_of_spawned_ranks():
    from torch.multiprocessing.spawn import ProcessRaisedException

    def raised(last_line: str) -> ProcessRaisedException:
        text = f"\n\n-- Process 1 terminated with the following error:\nTraceback:\n  ...\n{last_line}\n"
        return ProcessRaisedException(text, 1, 123)

    error = user_error(raised("metalearn.errors.ConfigError: data.meta_batch=3 must be ..."))
    assert isinstance(error, ConfigError) and str(error) == "data.meta_batch=3 must be ..."
    assert user_error(raised("ValueError: data.meta_batch=3")) is None
    assert user_error(raised("metalearn.lightning.module.HyperRepresentation: x")) is None
