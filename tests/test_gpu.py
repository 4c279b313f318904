"""Checks that need a CUDA device (marked `gpu`; skipped on machines without one)."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config

from metalearn.pipeline import train

pytestmark = pytest.mark.gpu


class DeviceProbe:
    """Records where training batches arrive and keeps their content."""

    def __init__(self) -> None:
        self.devices: list[torch.device] = []
        self.batches: list = []


def test_device_resident_sampling_matches_the_host_stream(tmp_path, data_dir, real_cache_dir):
    import pytorch_lightning as pl

    probe = DeviceProbe()

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            probe.devices.append(batch.support.device)
            probe.batches.append(batch)

    cfg = compose_config(
        "train",
        [
            "experiment=omniglot_5w1s",
            "trainer=gpu",
            "trainer.max_steps=3",
            "logger=none",
            "trainer.val_check_interval=3",
            "data.val_episodes=4",
            "data.test_episodes=4",
            "test=false",
        ],
        tmp_path,
        data_dir,
        real_cache_dir,
    )
    import hydra.utils

    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=[Probe()], logger=False)
    trainer.fit(model, datamodule=datamodule)
    assert datamodule.samplers["train"].images.device.type == "cuda"
    assert all(d.type == "cuda" for d in probe.devices) and len(probe.devices) == 3
    host = hydra.utils.instantiate({**cfg.data, "device_sampling": False})
    host.setup("fit")
    for step, batch in enumerate(probe.batches):
        expected = host.samplers["train"].sample(range(4 * step, 4 * step + 4))
        assert torch.equal(batch.support.cpu(), expected.support)
        assert torch.equal(batch.query.cpu(), expected.query)


def test_short_gpu_training_learns(tmp_path, data_dir, real_cache_dir):
    cfg = compose_config(
        "train",
        [
            "experiment=omniglot_5w1s",
            "trainer=gpu",
            "trainer.max_steps=300",
            "logger=none",
            "trainer.val_check_interval=300",
            "data.val_episodes=100",
            "data.test_episodes=100",
        ],
        tmp_path,
        data_dir,
        real_cache_dir,
    )
    metrics = train(cfg)
    assert metrics["test/accuracy"] >= 0.7
