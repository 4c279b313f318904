"""Runs that cannot be confused: resume, run folders, what a run tests, what evaluate.py reads."""

from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from fixtures_miniimagenet import FIXTURE_CLASSES, FIXTURE_IMAGES, make_pickle_fixture
from test_operations import TINY, cli, run_tiny

from metalearn.checkpoint import read_checkpoint
from metalearn.errors import ConfigError
from metalearn.pipeline import _evaluation_data_config, _test_datamodules, evaluate, train
from metalearn.utils.console import check_output_dirs, exit_on_user_error


def best_checkpoint(run: Path) -> Path:
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    return best


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir, real_cache_dir):
    """4 steps of 5-way 1-shot, validated at step 4, tested (its eval.json)."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    run_tiny(out, data_dir, real_cache_dir)
    return out


def evaluation(ckpt: Path, out: Path, data_dir: Path, cache_dir: Path, *overrides: str):
    return compose_config("eval", [f"ckpt_path={ckpt}", *overrides], out, data_dir, cache_dir)


# -- ckpt_path=last ------------------------------------------------------------------------


def test_ckpt_path_last_resumes_only_a_run_with_the_same_settings(
    tmp_path, data_dir, real_cache_dir
):
    logs = tmp_path / "logs"
    runs = logs / "train" / "runs"
    common = [f"paths.log_dir={logs}", "test=false"]
    run_tiny(runs / "first", data_dir, real_cache_dir, *common)
    # A 5-shot run does not continue the 1-shot one (it used to, with an INFO line).
    with pytest.raises(ConfigError) as caught:
        run_tiny(
            runs / "second", data_dir, real_cache_dir, *common, "ckpt_path=last", "data.shots=5"
        )
    message = str(caught.value)
    assert "first" in message and "data.shots: checkpoint 1, config 5" in message
    with pytest.raises(ConfigError, match="data.seed: checkpoint 0, config 1"):
        run_tiny(runs / "third", data_dir, real_cache_dir, *common, "ckpt_path=last", "seed=1")
    with pytest.raises(ConfigError, match="model.inner_lr: checkpoint 0.1, config 0.2"):
        run_tiny(
            runs / "fourth",
            data_dir,
            real_cache_dir,
            *common,
            "ckpt_path=last",
            "model.inner_lr=0.2",
        )
    # A newer run with other settings does not hide the one that matches.
    run_tiny(runs / "other", data_dir, real_cache_dir, *common, "data.query_shots=5")
    run_tiny(
        runs / "fifth", data_dir, real_cache_dir, *common, "ckpt_path=last", "trainer.max_steps=6"
    )
    resumed = read_checkpoint(runs / "fifth" / "checkpoints" / "last.ckpt")
    first = read_checkpoint(runs / "first" / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 6 and first["global_step"] == 4
    assert resumed["datamodule_hyper_parameters"]["query_shots"] == 15


# -- run folders ---------------------------------------------------------------------------


def test_a_copied_run_resumes_and_tests_its_own_best_checkpoint(
    tiny_run, tmp_path, data_dir, real_cache_dir
):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_run, copy)
    (copy / "eval.json").unlink()
    # No validation in the two resumed steps: the best checkpoint stays the one of step 4.
    run_tiny(
        copy,
        data_dir,
        real_cache_dir,
        "ckpt_path=last",
        "trainer.max_steps=6",
        "trainer.val_check_interval=100",
    )
    report = json.loads((copy / "eval.json").read_text())
    assert Path(report["checkpoint"]) == best_checkpoint(copy)
    original = json.loads((tiny_run / "eval.json").read_text())
    assert report["accuracy"] == original["accuracy"]  # the same weights, from the copy
    assert best_checkpoint(tiny_run).is_file()  # the original's file was left alone


def test_a_moved_run_resumes(tiny_run, tmp_path, data_dir, real_cache_dir):
    moved = tmp_path / "moved"
    shutil.copytree(tiny_run, tmp_path / "before")
    shutil.move(tmp_path / "before", moved)
    (moved / "eval.json").unlink()
    run_tiny(
        moved,
        data_dir,
        real_cache_dir,
        "ckpt_path=last",
        "trainer.max_steps=6",
        "trainer.val_check_interval=100",
    )
    assert Path(json.loads((moved / "eval.json").read_text())["checkpoint"]) == best_checkpoint(
        moved
    )


def test_a_folder_that_holds_a_run_is_not_overwritten(tiny_run, tmp_path, data_dir, real_cache_dir):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_run, copy)
    before = (copy / "checkpoints" / "last.ckpt").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run .*ckpt_path=last"):
        run_tiny(copy, data_dir, real_cache_dir)
    assert (copy / "checkpoints" / "last.ckpt").read_bytes() == before


# -- what a run tests ----------------------------------------------------------------------


def test_train_false_tests_the_given_checkpoint(tiny_run, tmp_path, data_dir, real_cache_dir):
    best = best_checkpoint(tiny_run)
    run_tiny(tmp_path / "test", data_dir, real_cache_dir, "train=false", f"ckpt_path={best}")
    report = json.loads((tmp_path / "test" / "eval.json").read_text())
    assert report["checkpoint"] == str(best)
    # The number of the run that trained it, on the same fixed test episodes (a randomly
    # initialized model was tested before).
    assert report["accuracy"] == json.loads((tiny_run / "eval.json").read_text())["accuracy"]
    with pytest.raises(ConfigError, match="train=false .* ckpt_path=PATH"):
        run_tiny(tmp_path / "none", data_dir, real_cache_dir, "train=false")


def test_a_run_without_validation_does_not_report_a_test_accuracy(
    tmp_path, data_dir, real_cache_dir
):
    with pytest.raises(ConfigError, match="no validation ran in 2 steps"):
        run_tiny(
            tmp_path / "run",
            data_dir,
            real_cache_dir,
            "trainer.max_steps=2",
            "trainer.val_check_interval=100",
        )
    assert not (tmp_path / "run" / "eval.json").exists()
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()  # the training is kept


# -- evaluate.py ---------------------------------------------------------------------------


def test_evaluate_applies_data_overrides(tiny_run, tmp_path, data_dir, real_cache_dir):
    ckpt = best_checkpoint(tiny_run)
    checkpoint = read_checkpoint(ckpt)
    episodes = {}
    for seed in (0, 1):
        cfg = evaluation(ckpt, tmp_path, data_dir, real_cache_dir, f"data.eval_seed={seed}")
        data_cfg = _evaluation_data_config(cfg, checkpoint)
        assert data_cfg["eval_seed"] == seed and data_cfg["data_dir"] == str(data_dir)
        (module,) = _test_datamodules(data_cfg, [5], [1])
        episodes[seed] = module.samplers["test"].episode_indices(0)[0].tolist()
    assert episodes[0] != episodes[1]


def test_evaluate_checks_every_setting_against_the_test_split_first(
    tiny_run, tmp_path, data_dir, real_cache_dir
):
    ckpt = best_checkpoint(tiny_run)
    cfg = evaluation(ckpt, tmp_path / "a", data_dir, real_cache_dir, "ways=[5,2000]", "episodes=2")
    with pytest.raises(ConfigError, match="^ways=2000 is more than the 1292 classes of the 'test'"):
        evaluate(cfg)
    assert not (tmp_path / "a" / "eval.json").exists()
    # 500 ways exceed the 400 validation classes, but evaluation uses only the test split.
    cfg = evaluation(ckpt, tmp_path / "b", data_dir, real_cache_dir, "ways=500", "episodes=1")
    result = evaluate(cfg)
    assert result["ways"] == 500 and result["episodes"] == 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["episodes=0"], "^episodes must be >= 1, got 0$"),
        (["shots=0"], "^shots must be an integer >= 1, got 0$"),
        (["data.test_episodes=5"], "evaluate.py takes episodes=N"),
        (
            ["+data.wayz=5"],
            "data.wayz is not a setting of metalearn.data.datamodule.OmniglotDataModule",
        ),
        (["query_shots=30"], "shots \\+ query_shots = 1 \\+ 30 is more than the 20 images"),
    ],
)
def test_evaluate_errors_name_its_own_settings(
    overrides, message, tiny_run, tmp_path, data_dir, real_cache_dir
):
    cfg = evaluation(best_checkpoint(tiny_run), tmp_path, data_dir, real_cache_dir, *overrides)
    with pytest.raises(ConfigError, match=message):
        evaluate(cfg)


def test_evaluate_takes_the_data_set_and_its_keys_from_the_checkpoint(tmp_path):
    """A miniImageNet checkpoint evaluates without data=miniimagenet, and its data keys
    (images_per_class) can be changed."""
    data_dir = tmp_path / "data"
    make_pickle_fixture(data_dir, FIXTURE_CLASSES, FIXTURE_IMAGES)
    run = tmp_path / "run"
    overrides = [
        "experiment=miniimagenet_5w1s",
        "model/backbone=conv4_miniimagenet",
        "data.expected_classes={train:5,val:3,test:3}",
        f"data.images_per_class={FIXTURE_IMAGES}",
        "data.download=false",
        "data.ways=2",
        "data.query_shots=2",
        "data.meta_batch=1",
        "data.val_episodes=2",
        "data.test_episodes=2",
        "trainer.max_steps=1",
        "trainer.val_check_interval=1",
        "logger=none",
    ]
    train(compose_config("train", overrides, run, data_dir, tmp_path / "cache"))
    ckpt = best_checkpoint(run)
    result = evaluate(
        evaluation(ckpt, tmp_path / "eval", data_dir, tmp_path / "cache", "episodes=2")
    )
    assert result["split"] == "ravi" and result["ways"] == 2
    cfg = evaluation(
        ckpt, tmp_path / "eval2", data_dir, tmp_path / "cache", "data.images_per_class=600"
    )
    with pytest.raises(Exception) as caught:
        evaluate(cfg)
    assert f"data.images_per_class; set it to {FIXTURE_IMAGES}" in str(caught.value)


# -- checkpoints given by a user -----------------------------------------------------------


def test_a_checkpoint_naming_a_foreign_class_is_refused(tiny_run, tmp_path, capsys):
    checkpoint = torch.load(tiny_run / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["backbone"] = {"_target_": "builtins.print", "_args_": ["pwned"]}
    torch.save(checkpoint, tmp_path / "evil.ckpt")
    with pytest.raises(ConfigError, match="builtins.print, which is not a metalearn class"):
        read_checkpoint(tmp_path / "evil.ckpt")
    assert "pwned" not in capsys.readouterr().out


NOT_CHECKPOINTS = [
    (lambda p: torch.save(torch.zeros(3), p), "is not a metalearn training checkpoint"),
    (
        lambda p: p.write_text("# README\n"),
        "is not a checkpoint (not a file written by torch.save)",
    ),
    (lambda p: p.mkdir(), "is a folder: give a checkpoint file"),
]


@pytest.mark.parametrize("make, message", NOT_CHECKPOINTS, ids=["tensor", "text", "folder"])
def test_files_that_are_not_checkpoints(make, message, tmp_path, data_dir, real_cache_dir):
    path = tmp_path / "given"
    make(path)
    with pytest.raises(ConfigError, match=re.escape(message)):
        read_checkpoint(path)
    if make is not NOT_CHECKPOINTS[1][0]:
        return  # the entry point turns each into one line the same way: one subprocess
    result = cli(
        "evaluate.py",
        [f"ckpt_path={path}", f"hydra.run.dir={tmp_path / 'e'}"],
        data_dir,
        real_cache_dir,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert message in line and "weights_only" not in line


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "evaluate.py needs ckpt_path=PATH"),
        (
            ["ckpt_path=x.ckpt", "data=miniimagenet"],
            "data=miniimagenet: the data set comes from the checkpoint",
        ),
        (["ckpt_path=x.ckpt", "disjoint=no"], "disjoint='no': expected true or false or null"),
    ],
)
def test_evaluate_cli_errors_are_one_line(args, message, tmp_path, data_dir, real_cache_dir):
    result = cli("evaluate.py", [*args, f"hydra.run.dir={tmp_path}"], data_dir, real_cache_dir)
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert message in line and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, message",
    # one case end to end; every other type error is checked in-process (test_config_types)
    [(["data.disjoint=maybe"], "data.disjoint='maybe': expected true or false")],
)
def test_train_cli_type_errors_are_one_line(args, message, tmp_path, data_dir, real_cache_dir):
    result = cli("train.py", [*TINY, *args, f"hydra.run.dir={tmp_path}"], data_dir, real_cache_dir)
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert message in line and "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("*.ckpt"))


# -- run folders that cannot be written ----------------------------------------------------


@pytest.mark.parametrize(
    "folder, reason",
    [
        (lambda tmp: tmp / "a-file" / "run", "Not a directory"),
        (lambda tmp: Path("/proc/metalearn-run"), "No such file or directory"),
        (lambda tmp: tmp / ("x" * 300), "File name too long"),
    ],
    ids=["under-a-file", "impossible", "name-too-long"],
)
def test_a_run_folder_that_cannot_be_created_is_one_line(folder, reason, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    path = folder(tmp_path)
    with pytest.raises(SystemExit) as caught:
        check_output_dirs(["experiment=omniglot_5w1s", f"hydra.run.dir={path}"], tmp_path / "logs")
    assert caught.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert (
        line.startswith(f"error: hydra.run.dir={path}: cannot create this folder")
        and reason in line
    )
    with pytest.raises(SystemExit):  # the default log folder and paths.log_dir alike
        check_output_dirs(["-m", "seed=0,1"], tmp_path / "a-file" / "logs")
    assert "error: paths.log_dir=" in capsys.readouterr().err
    check_output_dirs(["-m", f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path / "a-file")
    assert (tmp_path / "sweep").is_dir()


@pytest.mark.parametrize("quote", ['"', "'"])
def test_a_quoted_run_folder_is_the_folder_hydra_reads(quote, tmp_path, monkeypatch):
    """Lightning's plain ddp relaunches each rank with ``hydra.run.dir="<dir>"``: Hydra's
    override grammar drops the quotes, and so must the check that creates the folder."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    check_output_dirs([f"hydra.run.dir={quote}{run}{quote}"], tmp_path / "logs")
    assert run.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no folder named with a quote


def test_train_cli_with_an_impossible_run_folder(tmp_path, data_dir, real_cache_dir):
    (tmp_path / "a-file").write_text("")
    result = cli(
        "train.py",
        [*TINY, f"hydra.run.dir={tmp_path / 'a-file' / 'run'}"],
        data_dir,
        real_cache_dir,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert "hydra.run.dir=" in line and "Not a directory" in line


def test_a_full_disk_is_one_line_naming_the_file(
    tmp_path, data_dir, real_cache_dir, monkeypatch, capsys
):
    """The run folder: a checkpoint that cannot be written stops the run with one line."""

    def full_disk(obj, handle, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    cfg = compose_config("train", [*TINY, "test=false"], tmp_path / "run", data_dir, real_cache_dir)
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit) as caught:
        exit_on_user_error(train)(cfg)
    assert caught.value.code == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert (
        "no space left on device: cannot write" in line
        and str(tmp_path / "run" / "checkpoints") in line
    )
    assert not [p for p in (tmp_path / "run").rglob("*.ckpt*")]  # no partial file behind


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["experiment=omniglot_5w1s,nope"], "unknown experiment 'nope'; available: cifar_fs_5w1s"),
        (["algorithm=choice(maml,nope)"], "unknown algorithm 'nope'; available: anil, classical"),
        (["+model/backbone=resnet13"], "unknown model/backbone 'resnet13'; available: conv4_"),
        (["hydra/launcher=nope"], "unknown hydra/launcher 'nope'; available: basic,"),
        (["experiment=shared"], "unknown experiment 'shared'"),  # a folder of parts
        # Hydra's own options: its plugins' launchers, sweeps it expands, null and deletions.
        (["hydra/launcher=submitit_slurm", "model=glob(*)", "algorithm=null", "~logger"], None),
        (["experiment=omniglot_5w1s,omniglot_20w1s", "seed=range(1,3)", "data.ways=5"], None),
    ],
)
def test_an_unknown_group_option_is_one_line_with_hydras_options(overrides, message, capsys):
    from metalearn.utils.console import check_group_choices

    if message is None:
        check_group_choices(Path(__file__).parents[1] / "conf", overrides)
        assert capsys.readouterr().err == ""
        return
    with pytest.raises(SystemExit) as exit:
        check_group_choices(Path(__file__).parents[1] / "conf", overrides)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1 and message in err, err
