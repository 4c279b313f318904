"""Operations on real Omniglot: DDP equivalence, sweeps, exact resume, reports, robustness."""

from __future__ import annotations

import csv
import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import hydra.utils
import pytest
import pytorch_lightning as pl
import torch
from conftest import REPO, compose_config, train_entry_point
from recorder import read_records as read_episode_records
from wandb_records import logged_keys, wait_until_written

from metalearn.checkpoint import read_checkpoint
from metalearn.lightning import AtomicCheckpointIO, TrainingDiverged
from metalearn.models import BATCH_STATS
from metalearn.pipeline import train

# A tiny but real training run: 5-way 1-shot, meta-batch 4, a few steps.
TINY = [
    "experiment=omniglot_5w1s",
    "logger=none",
    "data.val_episodes=5",
    "data.test_episodes=5",
    "data.eval_meta_batch=2",
    "callbacks.last_checkpoint.every_n_train_steps=5",
    "trainer.max_steps=4",
    "trainer.val_check_interval=4",
]


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def cli(script: str, args: list[str], data_dir: Path, cache_dir: Path, **env: str):
    environment = dict(
        os.environ,
        METALEARN_DATA_DIR=str(data_dir),
        METALEARN_CACHE_DIR=str(cache_dir),
        PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
        **env,
    )
    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
    )


def parameters(ckpt: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(ckpt)["state_dict"]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def run_tiny(out: Path, data_dir: Path, cache_dir: Path, *overrides: str) -> dict[str, float]:
    cfg = compose_config("train", [*TINY, *overrides], out, data_dir, cache_dir)
    return train(cfg)


# -- DDP -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory, data_dir, real_cache_dir):
    out = tmp_path_factory.mktemp("single")
    metrics = run_tiny(
        out,
        data_dir,
        real_cache_dir,
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "trainer.precision=64-true",
    )
    return out, metrics


def test_two_ranks_match_one_process(tmp_path, data_dir, real_cache_dir):
    """2 ranks x 2 episodes (together the episodes of one rank) give the outer updates of
    1 process x 4 episodes: in float64
    to rounding (<= 1e-6 after 3 Adam steps), with the tuned settings and a learned inner
    lr (an outer variable synchronized like the others)."""
    common = [
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "trainer.precision=64-true",
        "model.learn_inner_lr=true",
    ]
    record = ["+callbacks.recorder._target_=recorder.RecordEpisodes"]
    single_metrics = run_tiny(
        tmp_path / "one",
        data_dir,
        real_cache_dir,
        *common,
        *record,
        f"+callbacks.recorder.folder={tmp_path / 'ids1'}",
    )
    metrics = run_tiny(
        tmp_path / "two",
        data_dir,
        real_cache_dir,
        "trainer=ddp_cpu",
        *common,
        *record,
        f"+callbacks.recorder.folder={tmp_path / 'ids2'}",
    )
    # Every rank draws distinct episodes; together exactly the episodes of one rank.
    one, two = read_episode_records(tmp_path / "ids1"), read_episode_records(tmp_path / "ids2")
    assert sorted(two) == [0, 1]
    drawn = [i for rank in two.values() for row in rank for i in row["ids"]]
    assert len(drawn) == len(set(drawn)) == 3 * 4  # no episode drawn twice across ranks
    for step in range(3):
        union = sorted(two[0][step]["ids"] + two[1][step]["ids"])
        assert union == one[0][step]["ids"] == list(range(4 * step, 4 * step + 4))
    reference = parameters(tmp_path / "one" / "checkpoints" / "last.ckpt")
    spawned = parameters(tmp_path / "two" / "checkpoints" / "last.ckpt")
    assert max_difference(reference, spawned) <= 1e-6
    assert "inner_lr_raw" in spawned
    assert abs(float(spawned["inner_lr_raw"]) - math.log(0.1)) > 1e-4  # it was trained
    # Validation / test metrics are reduced over all episodes of all ranks (5 = 3 + 2).
    assert metrics["val/acc"] == pytest.approx(single_metrics["val/acc"], abs=1e-6)
    assert metrics["test/accuracy"] == pytest.approx(single_metrics["test/accuracy"], abs=1e-6)
    report = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert report["episodes"] == 5
    single = json.loads((tmp_path / "one" / "eval.json").read_text())
    assert report["ci95"] == pytest.approx(single["ci95"], abs=1e-6)
    assert report["ci95_per_step"] == pytest.approx(single["ci95_per_step"], abs=1e-6)
    assert report["accuracy_per_step"] == pytest.approx(single["accuracy_per_step"], abs=1e-6)


def test_two_ranks_match_one_process_in_float32_to_float32_rounding(
    tmp_path, data_dir, real_cache_dir
):
    """In float32, one SGD step (rate 1) of 2 ranks x 2 episodes equals one of 1 process x
    4 episodes to what float32 rounding allows, with 1 and with 2 threads.

    The gradients differ by rounding only (the all-reduce sums in another order). A float32
    sum of n terms carries a rounding error of about sqrt(n) u relative to its size (u =
    2^-24, independent roundings); the longest sums of this gradient run over every
    position of every image of the meta-batch, n = 4 x 80 x 28 x 28, so sqrt(n) u = 3e-5
    relative to the update. The bound is 32 times that, which float32 also keeps against
    float64 here; a wrong reduction across ranks (a sum, a missing rank) is off by half
    the update or more. After more steps the differences are no longer bounded by rounding
    (max-pooling and ReLU kinks flip with it and grow chaotically), so the multi-step
    equivalence is checked in float64 (test_two_ranks_match_one_process).
    """
    common = [
        "trainer.max_steps=1",
        "trainer.val_check_interval=1",
        "test=false",
        "model.learn_inner_lr=true",
        "model.center_features=false",
        "model.optimizer._target_=torch.optim.SGD",
        "model.optimizer.lr=1.0",
        "model.lr_decay=0",
    ]
    threads = torch.get_num_threads()
    runs = {}
    try:
        for name, count, precision in [("64", 2, "64"), ("32x1", 1, "32"), ("32x2", 2, "32")]:
            torch.set_num_threads(count)
            overrides = [*common, f"trainer.precision={precision}-true"]
            run_tiny(tmp_path / name, data_dir, real_cache_dir, *overrides)
            runs[name] = parameters(tmp_path / name / "checkpoints" / "last.ckpt")
    finally:
        torch.set_num_threads(threads)
    run_tiny(tmp_path / "two", data_dir, real_cache_dir, "trainer=ddp_cpu", *common)
    spawned = parameters(tmp_path / "two" / "checkpoints" / "last.ckpt")
    cfg = compose_config("train", [*TINY, *common], tmp_path / "init", data_dir, real_cache_dir)
    pl.seed_everything(cfg.seed)  # train() seeds the same way before building the model
    initial = hydra.utils.instantiate(cfg.model).state_dict()
    update = max_difference(initial, runs["64"])
    sums = 4 * (5 + 75) * 28 * 28
    tolerance = 32 * math.sqrt(sums) * 2.0**-24 * update
    assert update > 1e-2  # a real step
    for single in ("32x1", "32x2"):
        assert max_difference(runs[single], runs["64"]) <= tolerance, single
        assert max_difference(runs[single], spawned) <= tolerance, single


def test_multirun_sweep_with_ddp_is_correct(single_process_run, tmp_path, data_dir, real_cache_dir):
    """Plain ddp in a sweep re-launches the sweep; the pipeline switches it to ddp_spawn."""
    single, _ = single_process_run
    result = cli(
        "train.py",
        [
            "-m",
            *TINY,
            "trainer=ddp_cpu",
            "trainer.strategy=ddp",
            "trainer.max_steps=3",
            "trainer.val_check_interval=3",
            "trainer.precision=64-true",
            "seed=0,1",
            f"paths.log_dir={tmp_path}",
            "extras.print_config=false",
        ],
        data_dir,
        real_cache_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ddp_spawn" in result.stderr + result.stdout
    jobs = sorted((tmp_path / "train" / "multiruns").glob("*/[0-9]"))
    assert [j.name for j in jobs] == ["0", "1"]
    reference = parameters(single / "checkpoints" / "last.ckpt")
    assert max_difference(reference, parameters(jobs[0] / "checkpoints" / "last.ckpt")) <= 1e-6
    assert max_difference(reference, parameters(jobs[1] / "checkpoints" / "last.ckpt")) > 1e-4


# -- exact resume and determinism ---------------------------------------------------------


def test_resume_after_sigkill_is_exact(tmp_path, data_dir, real_cache_dir):
    args = [*TINY, "trainer.max_steps=20", "trainer.val_check_interval=10", "test=false"]
    args += ["logger=csv", "trainer.log_every_n_steps=1", "model.learn_inner_lr=true"]
    run_tiny(tmp_path / "straight", data_dir, real_cache_dir, *args[len(TINY) :])  # in-process

    run_dir = tmp_path / "killed"
    record = [
        "+callbacks.recorder._target_=recorder.RecordEpisodes",
        f"+callbacks.recorder.folder={tmp_path / 'ids'}",
    ]
    killed = cli(
        "train.py",
        [
            *args,
            *record,
            f"hydra.run.dir={run_dir}",
            "+callbacks.killer._target_=killer.KillAtStep",
            "+callbacks.killer.step=13",
        ],
        data_dir,
        real_cache_dir,
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 10
    resumed = cli(
        "train.py",
        [*args, *record, f"hydra.run.dir={run_dir}", "ckpt_path=last"],
        data_dir,
        real_cache_dir,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "dataloader is not resumable" not in resumed.stderr  # it is, through the datamodule
    # The episode stream resumes at step 10: steps 10..12 are redone (they were lost with
    # the kill), no episode is skipped, and from step 10 on the stream is the straight one.
    rows = read_episode_records(tmp_path / "ids")[0]
    assert [r["step"] for r in rows] == [*range(13), *range(10, 20)]
    assert all(r["ids"] == list(range(4 * r["step"], 4 * r["step"] + 4)) for r in rows)

    a = read_checkpoint(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    b = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 20
    assert max_difference(a["state_dict"], b["state_dict"]) <= 1e-6
    # The CSV log keeps the steps before the checkpoint and has each step once, with the
    # values of the uninterrupted run.
    straight_log, resumed_log = (
        {r["step"]: r for r in csv_rows(d / "csv" / "metrics.csv") if r.get("train/loss")}
        for d in (tmp_path / "straight", run_dir)
    )
    assert sorted(int(step) for step in resumed_log) == list(range(20))
    assert len(csv_rows(run_dir / "csv" / "metrics.csv")) == len(
        csv_rows(tmp_path / "straight" / "csv" / "metrics.csv")
    )
    for step, row in straight_log.items():
        assert float(resumed_log[step]["train/loss"]) == pytest.approx(
            float(row["train/loss"]), abs=1e-5
        )
    # Optimizer moments, the learning-rate schedule and the best validation accuracy too.
    state_a, state_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for key in state_a:
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state_a[key][name], state_b[key][name], rtol=0, atol=1e-9)
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"] == 20
    assert a["val_acc_best"] == b["val_acc_best"]


def test_a_finished_run_extends_to_a_larger_max_steps_exactly(tmp_path, data_dir, real_cache_dir):
    """`ckpt_path=last trainer.max_steps=N` on a run that reached its max_steps trains the
    steps in between (it once stopped at once: max_epochs=1 was already reached) and ends
    where a run trained straight to N ends."""
    args = ["trainer.val_check_interval=5", "test=false", "model.learn_inner_lr=true"]
    straight, extended = tmp_path / "straight", tmp_path / "extended"
    run_tiny(straight, data_dir, real_cache_dir, *args, "trainer.max_steps=10")
    run_tiny(extended, data_dir, real_cache_dir, *args, "trainer.max_steps=5")
    first = read_checkpoint(extended / "checkpoints" / "last.ckpt")
    assert first["global_step"] == 5
    run_tiny(extended, data_dir, real_cache_dir, *args, "trainer.max_steps=10", "ckpt_path=last")

    a = read_checkpoint(straight / "checkpoints" / "last.ckpt")
    b = read_checkpoint(extended / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 10
    assert max_difference(first["state_dict"], b["state_dict"]) > 1e-4  # it did train
    assert max_difference(a["state_dict"], b["state_dict"]) <= 1e-6
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"] == 10
    assert a["val_acc_best"] == b["val_acc_best"]


def test_same_seed_same_metrics(tmp_path, data_dir, real_cache_dir):
    first = run_tiny(
        tmp_path / "a",
        data_dir,
        real_cache_dir,
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
    )
    second = run_tiny(
        tmp_path / "b",
        data_dir,
        real_cache_dir,
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
    )
    timing = "episodes_per_s"  # wall-clock throughput, the one value that may differ
    assert {k: v for k, v in first.items() if k != timing} == {
        k: v for k, v in second.items() if k != timing
    }
    other = run_tiny(
        tmp_path / "c",
        data_dir,
        real_cache_dir,
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        "seed=1",
    )
    assert other["train/loss"] != first["train/loss"]


# -- evaluation reports --------------------------------------------------------------------


def test_evaluate_several_settings(single_process_run, tmp_path, data_dir, real_cache_dir):
    single, _ = single_process_run
    result = cli(
        "evaluate.py",
        [
            f"ckpt_path={single / 'checkpoints' / 'last.ckpt'}",
            "ways=[5,20]",
            "shots=[1,5]",
            "query_shots=5",
            "inner_steps=[1,5,8]",
            "episodes=6",
            f"hydra.run.dir={tmp_path}",
        ],
        data_dir,
        real_cache_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    rows = report["results"]
    assert len(rows) == 4 * 3
    assert {(r["ways"], r["shots"], r["inner_steps"]) for r in rows} == {
        (w, s, t) for w in (5, 20) for s in (1, 5) for t in (1, 5, 8)
    }
    assert all(r["episodes"] == 6 and len(r["accuracy_per_step"]) == 9 for r in rows)
    stats = read_checkpoint(single / "checkpoints" / "last.ckpt")["hyper_parameters"]["batch_stats"]
    protocol = BATCH_STATS[stats]
    assert all(
        (r["protocol"], r["batch_stats"], r["disjoint"]) == (protocol, stats, True) for r in rows
    )
    label = f"{protocol} (batch_stats={stats}), disjoint sampler"
    table = (tmp_path / "report.md").read_text()
    assert table.count(f"| 20-way 5-shot, 5 queries | {label} | 8 |") == 1
    assert result.stdout.count(label) == 12
    assert (tmp_path / "accuracy_vs_steps.png").stat().st_size > 1000
    assert json.loads((tmp_path / "eval.json").read_text())["results"] == rows
    assert result.stdout.count("test accuracy") == 12


# -- wandb ----------------------------------------------------------------------------------


def test_wandb_offline_run_records_the_metrics(tmp_path, data_dir, real_cache_dir):
    run_tiny(
        tmp_path,
        data_dir,
        real_cache_dir,
        "logger=wandb",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1",
    )
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    (records,) = run.glob("run-*.wandb")
    history, summary = logged_keys(records)
    for key in ("train/loss", "train/acc", "train/inner_lr", "val/acc", "val/acc_best", "val/ci95"):
        assert key in history, sorted(history)
    assert {
        "test/acc",
        "test/ci95",
        "test/protocol",
        "test/batch_stats",
        "test/disjoint",
    } <= summary
    # The per-inner-step accuracy: a line chart backed by a table, at each validation.
    assert "val/acc_vs_inner_step_table/_type" in history
    tables = sorted((run / "files" / "media" / "table" / "val").glob("*.table.json"))
    assert len(tables) == 2  # validations at steps 2 and 4
    table = json.loads(tables[-1].read_text())
    assert table["columns"] == ["inner_step", "query_accuracy"] and len(table["data"]) == 6
    config = [r for r in wait_until_written(records) if r.WhichOneof("record_type") == "config"]
    assert any("data" in item.key for r in config for item in r.config.update)
    assert any(item.key == "protocol" for r in config for item in r.config.update)


def test_training_continues_when_wandb_cannot_start(
    tmp_path, data_dir, real_cache_dir, monkeypatch
):
    """An online run with a key but no server gives up after logger.wandb.init_timeout
    (wandb alone waits about 100 s) and says so in one line."""
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.warns(UserWarning, match="wandb could not start") as caught:
        metrics = run_tiny(
            tmp_path,
            data_dir,
            real_cache_dir,
            "logger=wandb",
            "logger.wandb.init_timeout=2",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
        )
    assert "train/loss" in metrics
    (message,) = [str(w.message) for w in caught if "wandb could not start" in str(w.message)]
    assert "within logger.wandb.init_timeout=2 s" in message and "\n" not in message


# -- robustness ----------------------------------------------------------------------------


def test_diverging_inner_loop_stops_with_a_message(tmp_path, data_dir, real_cache_dir):
    result = cli(
        "train.py",
        [*TINY, "model.inner_lr=1e38", "model.learn_inner_lr=false", f"paths.log_dir={tmp_path}"],
        data_dir,
        real_cache_dir,
    )
    assert result.returncode == 2
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert "at step 0" in line and "inner lr 1e+38" in line and "model.nonfinite=skip" in line


def test_diverging_meta_batches_can_be_skipped(tmp_path, data_dir, real_cache_dir):
    cfg = compose_config(
        "train",
        [
            *TINY,
            "model.inner_lr=1e38",
            "model.nonfinite=skip",
            "trainer.max_steps=3",
            "test=false",
            "trainer.val_check_interval=3",
        ],
        tmp_path,
        data_dir,
        real_cache_dir,
    )
    pl.seed_everything(cfg.seed)  # train() seeds the same way before building the model
    initial = hydra.utils.instantiate(cfg.model).state_dict()
    with (
        pytest.warns(UserWarning, match="skipping this meta-batch"),
        pytest.raises(TrainingDiverged, match=r"every training step \(3\) had an inf or NaN"),
    ):
        train(cfg)
    final = parameters(tmp_path / "checkpoints" / "last.ckpt")
    assert max_difference(initial, final) == 0.0  # never trained on NaN


@pytest.mark.parametrize(
    "args, fragments",
    [
        (
            ["experiment=nope"],
            (
                "unknown experiment 'nope'; available: ",
                "omniglot_5w1s, ",
            ),
        ),
        (
            ["data=nope"],
            (
                "unknown data 'nope'; available: ",
                "miniimagenet, omniglot",
            ),
        ),
        (
            ["model=nope"],
            (
                "unknown model 'nope'; available: ",
                "hyper_representation",
            ),
        ),
        (["data.shots=0"], ("data.shots must be an integer >= 1",)),
        (["data.query_shots=0"], ("data.query_shots must be an integer >= 1",)),
        (["data.meta_batch=0"], ("data.meta_batch must be >= 1",)),
        (["model.inner_steps=0"], ("model.inner_steps and model.eval_inner_steps must be >= 1",)),
        (["paths.cache_dir=/proc/metalearn-cache"], ("/proc/metalearn-cache",)),
    ],
)
def test_user_errors_are_one_line(args, fragments, tmp_path, data_dir, real_cache_dir, capsys):
    """In-process, what train.py runs; the first case also through the script itself."""
    overrides = [*TINY, f"paths.log_dir={tmp_path}", *args]
    code, stderr = train_entry_point(overrides, tmp_path / "run", data_dir, real_cache_dir, capsys)
    if args == ["experiment=nope"]:
        result = cli("train.py", overrides, data_dir, real_cache_dir)
        errors = [x for x in result.stderr.splitlines() if x.startswith("error:")]
        assert result.returncode == code and errors == [
            x for x in stderr.splitlines() if x.startswith("error:")
        ]
    assert code == 2, stderr[-3000:]
    (line,) = [x for x in stderr.splitlines() if x.startswith("error:")]
    assert all(part in line for part in fragments), line
    assert "Traceback" not in stderr


def test_resume_with_a_different_model_says_what_differs(
    single_process_run, tmp_path, data_dir, real_cache_dir
):
    single, _ = single_process_run
    result = cli(
        "train.py",
        [
            *TINY,
            f"ckpt_path={single / 'checkpoints' / 'last.ckpt'}",
            "model.backbone.channels=32",
            "model.backbone.bn_scale=true",
            f"paths.log_dir={tmp_path}",
        ],
        data_dir,
        real_cache_dir,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert "model.backbone.channels: checkpoint 64, config 32" in line
    assert "model.backbone.bn_scale: checkpoint False, config True" in line


def test_interrupted_checkpoint_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)

    def full_disk(obj, handle, *args, **kwargs):
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="no space left on device: cannot write .*last.ckpt"):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_progress_bar_shows_episodes_per_second(tmp_path, data_dir, real_cache_dir):
    cfg = compose_config(
        "train",
        [*TINY, "trainer.max_steps=4", "trainer.val_check_interval=4", "test=false"],
        tmp_path,
        data_dir,
        real_cache_dir,
    )
    import hydra.utils

    from metalearn.config import instantiate_group

    trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=instantiate_group(cfg.callbacks), logger=False
    )
    trainer.fit(hydra.utils.instantiate(cfg.model), datamodule=hydra.utils.instantiate(cfg.data))
    assert trainer.progress_bar_metrics["episodes_per_s"] > 0
    assert (
        "val/acc" in trainer.progress_bar_metrics and "train/loss" in trainer.progress_bar_metrics
    )
