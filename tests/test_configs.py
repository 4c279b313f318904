"""Every config composes, and every experiment runs one fast_dev_run step on real Omniglot."""

from __future__ import annotations

import hydra.utils
import pytest
from conftest import EXPERIMENTS, OMNIGLOT_EXPERIMENTS, compose_config
from omegaconf import OmegaConf

from metalearn.pipeline import train


@pytest.mark.parametrize("name", ["train", "eval"])
def test_entry_configs_compose(name, tmp_path, data_dir, real_cache_dir):
    overrides = ["ckpt_path=x.ckpt"] if name == "eval" else []
    cfg = compose_config(name, overrides, tmp_path, data_dir, real_cache_dir)
    OmegaConf.resolve(cfg)  # every interpolation resolves
    # Training composes a data set; evaluation takes it from the checkpoint (only paths).
    assert ("_target_" in cfg.data) == (name == "train")
    assert cfg.data.data_dir == str(data_dir)
    assert cfg.trainer.inference_mode is False
    assert cfg.paths.data_dir == str(data_dir)


def test_default_model_is_the_paper_setting(tmp_path, data_dir, real_cache_dir):
    cfg = compose_config("train", [], tmp_path, data_dir, real_cache_dir)
    assert (cfg.model.inner_steps, cfg.data.meta_batch, cfg.data.query_shots) == (5, 4, 15)
    assert (cfg.model.optimizer.lr, cfg.model.lr_decay) == (1e-3, 1e-5)
    net = hydra.utils.instantiate(cfg.model.backbone)
    assert net.feature_dim == 256


@pytest.mark.parametrize("experiment", OMNIGLOT_EXPERIMENTS)
def test_experiment_fast_dev_run(experiment, tmp_path, data_dir, real_cache_dir):
    cfg = compose_config(
        "train",
        [f"experiment={experiment}", "debug=fast_dev_run"],
        tmp_path,
        data_dir,
        real_cache_dir,
    )
    metrics = train(cfg)
    assert 0.0 <= metrics["train/acc"] <= 1.0
    assert 0.0 <= metrics["test/accuracy"] <= 1.0
    assert (tmp_path / "eval.json").is_file()


def test_wandb_logger_runs_offline_without_credentials(tmp_path, data_dir, real_cache_dir):
    cfg = compose_config(
        "train",
        [
            "logger=wandb",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "data.val_episodes=4",
            "data.test_episodes=4",
            "test=false",
        ],
        tmp_path,
        data_dir,
        real_cache_dir,
    )
    train(cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list(tmp_path.rglob("*"))[:20]
    assert list(runs[0].glob("run-*.wandb"))


def test_every_experiment_has_a_fast_dev_run_test():
    # miniImageNet experiments run on a generated fixture in tests/test_miniimagenet.py,
    # the other benchmarks' in tests/test_benchmarks.py, the hyperparameter-optimization
    # experiments (cfg.runner) in tests/test_hpo.py
    benchmarks = {
        f"{name}_5w{shots}s"
        for name in ("tieredimagenet", "cifar_fs", "fc100", "cub")
        for shots in (1, 5)
    }
    assert set(EXPERIMENTS) == set(OMNIGLOT_EXPERIMENTS) | benchmarks | {
        "miniimagenet_5w1s",
        "miniimagenet_5w5s",
        "hyper_cleaning_mnist",
        "effect_of_T",
    }
