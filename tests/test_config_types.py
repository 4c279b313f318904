"""Typed configuration: a wrong type or an unknown value is one ConfigError before anything runs."""

from __future__ import annotations

import pytest
from conftest import EXPERIMENTS, compose_config

from metalearn.config import EvalSettings, TrainSettings, check_config, check_value
from metalearn.errors import ConfigError

GROUP_CHOICES = [[f"experiment={name}"] for name in EXPERIMENTS] + [
    ["algorithm=protonet"],
    ["algorithm=maml"],
    ["algorithm=anil"],
    ["algorithm=classical"],
    ["model=hyper_representation_tuned"],
    ["data=miniimagenet"],
    ["trainer=ddp_cpu"],
    ["trainer=gpu"],
    ["logger=wandb"],
]


@pytest.mark.parametrize("overrides", [[], *GROUP_CHOICES], ids=lambda o: ",".join(o) or "default")
def test_every_shipped_config_is_well_typed(overrides, tmp_path, data_dir, real_cache_dir):
    check_config(
        compose_config("train", overrides, tmp_path, data_dir, real_cache_dir), TrainSettings
    )


def test_the_evaluation_config_is_well_typed(tmp_path, data_dir, real_cache_dir):
    cfg = compose_config(
        "eval",
        ["ckpt_path=x.ckpt", "ways=[5,20]", "disjoint=false"],
        tmp_path,
        data_dir,
        real_cache_dir,
    )
    check_config(cfg, EvalSettings)


@pytest.mark.parametrize(
    "overrides, message",
    [
        # the reproductions of the issue: each was accepted or crashed inside torch
        (["data.disjoint=maybe"], "data.disjoint='maybe': expected true or false"),
        (["data.disjoint=no"], "data.disjoint='no': expected true or false"),
        (["model.learn_inner_lr=no"], "model.learn_inner_lr='no': expected true or false"),
        (["seed=abc"], "seed='abc': expected an integer or null"),
        (["train=yes"], "train='yes': expected true or false"),
        (["data.ways=5.5"], "data.ways=5.5: expected an integer"),
        (["data.ways=true"], "data.ways=True: expected an integer"),
        (["model.inner_lr=fast"], "model.inner_lr='fast': expected a number"),
        (["model.nonfinite=ignore"], "model.nonfinite='ignore': expected one of raise, skip"),
        (["model.batch_stats=batch"], "expected one of episode (transductive)"),
        (["model.backbone.channels=wide"], "model.backbone.channels='wide': expected an integer"),
        (["model.optimizer.lr=fast"], "model.optimizer.lr='fast': expected a number"),
        (["trainer.max_steps=many"], "trainer.max_steps='many': expected an integer"),
        (["+data.wayz=3"], "data.wayz is not a setting of metalearn.data.OmniglotDataModule"),
        (["+model.inner_lrr=3"], "model.inner_lrr is not a setting of"),
        (["extras.print_config=1"], "extras.print_config=1: expected true or false"),
        (["extras.keep_host_memory=on"], "extras.keep_host_memory='on': expected true or false"),
        (["trainer.val_check_interval=0"], "trainer.val_check_interval=0"),
        (["+trainer.accumulate_grad_batches=2"], "raise data.meta_batch instead"),
        (
            ["data._target_=metalearn.data.Nope"],
            "data._target_=metalearn.data.Nope: cannot be imported",
        ),
    ],
)
def test_wrong_settings_are_one_error(overrides, message, tmp_path, data_dir, real_cache_dir):
    cfg = compose_config("train", overrides, tmp_path, data_dir, real_cache_dir)
    with pytest.raises(ConfigError) as caught:
        check_config(cfg, TrainSettings)
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["disjoint=no"], "disjoint='no': expected true or false or null"),
        (["ways=[5,a]"], "ways=[5, 'a']: expected an integer or a list (each item an integer)"),
        (["episodes=ten"], "episodes='ten': expected an integer"),
        (["batch_stats=both"], "batch_stats='both': expected one of episode (transductive)"),
    ],
)
def test_wrong_evaluation_settings_are_one_error(
    overrides, message, tmp_path, data_dir, real_cache_dir
):
    cfg = compose_config(
        "eval", ["ckpt_path=x.ckpt", *overrides], tmp_path, data_dir, real_cache_dir
    )
    with pytest.raises(ConfigError, match=".") as caught:
        check_config(cfg, EvalSettings)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "value, annotation, ok",
    [
        (3, float, True),
        (3.0, int, False),
        (True, int, False),
        (None, int | None, True),
        ([1, 2], list[int], True),
        ([1, "2"], list[int], False),
        ((0.9, 0.99), tuple[float, float], True),
        ([0.9], tuple[float, float], False),
        ({"a": 1}, dict[str, int], True),
        ("a", dict[str, int], False),
    ],
)
def test_check_value_follows_the_annotation(value, annotation, ok):
    if ok:
        check_value("key", value, annotation)
    else:
        with pytest.raises(ConfigError, match="^key="):
            check_value("key", value, annotation)
