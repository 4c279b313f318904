"""Accuracy regression guard (slow): the tuned Omniglot defaults at a fixed short budget."""

from __future__ import annotations

import pytest
from conftest import compose_config

from metalearn.pipeline import train

pytestmark = pytest.mark.slow


def test_tuned_5way_1shot_at_2000_steps(tmp_path, data_dir, real_cache_dir):
    """2,000 outer steps (8,000 training episodes of 20 ways) of `experiment=omniglot_5w1s`,
    seed 0, CPU.

    Measured when 20-way training episodes became the default: 97.96% ± 0.28 on the 600
    fixed test episodes (bench/ablation.py, variant fixed_lr_center_train_20way); the tuned
    settings on 5-way training episodes reach 95.92% and the paper's exact settings 88.85%
    at this budget. The guard allows for run-to-run and machine-to-machine differences.
    """
    cfg = compose_config(
        "train",
        [
            "experiment=omniglot_5w1s",
            "trainer.max_steps=2000",
            "trainer.val_check_interval=500",
            "data.val_episodes=300",
            "data.test_episodes=600",
            "logger=none",
        ],
        tmp_path,
        data_dir,
        real_cache_dir,
    )
    assert cfg.data.train_ways == 20, "the guard runs the defaults"
    metrics = train(cfg)
    assert metrics["test/accuracy"] >= 0.965, metrics
