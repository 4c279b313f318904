"""Mixed precision (``trainer.precision=bf16-mixed``): the backbone runs in bfloat16, the
inner problem, the query loss and the hypergradient through them in float32."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose_config
from precision_probe import conv_dtypes
from test_compile import NARROW

from metalearn.data.episodes import EpisodeSampler
from metalearn.errors import ConfigError
from metalearn.lightning import ClassicalJointTraining, HyperRepresentation, PrototypicalNetwork
from metalearn.pipeline import train


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 6, 1, 28, 28), dtype=torch.uint8, generator=generator)
    return EpisodeSampler(images, 5, 1, 2, seed=0, split="train").sample(range(3))


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def model(cls=HyperRepresentation, backbone=NARROW, **settings):
    torch.manual_seed(0)
    return cls(backbone, **settings).train()


@pytest.mark.parametrize("channels_last", [False, True])
def test_only_the_backbone_runs_in_bfloat16(batch, channels_last):
    """Under the trainer's autocast, the loss equals the float32 loss computed from the
    same bfloat16 backbone features: the head fit, its T steps and the query loss did not
    run in bfloat16 (as they do under a bare autocast, which changes the loss)."""
    backbone = {**NARROW, "channels_last": channels_last}
    learner = model(backbone=backbone, inner_steps=5, center_features=True)
    dtypes = conv_dtypes(learner.backbone)
    features = []
    learner.backbone.register_forward_hook(lambda m, i, out: features.append(out))
    with bf16(), learner.mixed_precision():
        mixed, _ = learner.training_loss(batch)
    # one backbone call per episode on the CPU (model.episode_chunk=auto)
    assert len(features) == len(batch.support)
    assert dtypes == {torch.bfloat16} and {f.dtype for f in features} == {torch.bfloat16}
    assert mixed.dtype == torch.float32
    bf16_features = torch.cat(features).float()
    shots = batch.support.shape[1]
    learner.embed = lambda support, query: (bf16_features[:, :shots], bf16_features[:, shots:])
    reference, _ = learner.training_loss(batch)
    torch.testing.assert_close(mixed, reference, rtol=1e-6, atol=1e-7)
    with bf16():
        bare, _ = learner.training_loss(batch)
    assert (bare - reference).abs().max() > 1e-4


@pytest.mark.parametrize(
    "cls, settings",
    [
        (HyperRepresentation, {"inner_steps": 5, "center_features": True}),
        (PrototypicalNetwork, {}),
        (ClassicalJointTraining, {"ways": 5, "pool_episodes": 3}),
    ],
    ids=["hyper_representation", "protonet", "classical"],
)
def test_the_mixed_precision_hypergradient_is_the_float32_one_to_bfloat16_rounding(
    batch, cls, settings
):
    """The loss within 2% of float32, the backbone's float32 gradients at cosine >= 0.98 of
    the float32 ones (every tensor >= 0.95). bfloat16 keeps 8 bits of mantissa: measured
    0.991 (hyper-representation), 0.993 (ProtoNet) and 0.990 (classical), worst tensors
    0.977, 0.982 and 0.985, on this narrow random-image batch, where a plain loss on the
    backbone's features gives 0.993 - 1.0 per tensor."""
    exact, mixed = model(cls, **settings), model(cls, **settings)
    dtypes = conv_dtypes(mixed.backbone)
    loss, _ = exact.training_loss(batch)
    loss.mean().backward()
    with bf16(), mixed.mixed_precision():
        loss_mixed, _ = mixed.training_loss(batch)
    loss_mixed.mean().backward()
    assert dtypes == {torch.bfloat16}
    assert float(loss_mixed.detach().mean()) == pytest.approx(float(loss.detach().mean()), rel=0.02)
    pairs = list(zip(exact.backbone.parameters(), mixed.backbone.parameters(), strict=True))
    assert all(q.grad is not None and q.grad.dtype == torch.float32 for _, q in pairs)
    cosine = torch.nn.functional.cosine_similarity
    per_tensor = [float(cosine(p.grad.flatten(), q.grad.flatten(), 0)) for p, q in pairs]
    flat = [torch.cat([pair[i].grad.flatten() for pair in pairs]) for i in (0, 1)]
    assert float(cosine(*flat, 0)) >= 0.98 and min(per_tensor) >= 0.95, per_tensor


def test_maml_refuses_mixed_precision_before_training(tmp_path, data_dir, real_cache_dir):
    """MAML's functional inner gradient fails under autocast: a ConfigError at setup, before
    the first step, instead of a traceback in it."""
    cfg = compose_config(
        "train",
        ["algorithm=maml", "trainer.precision=bf16-mixed", "logger=none", "trainer.max_steps=1"],
        tmp_path,
        data_dir,
        real_cache_dir,
    )
    with pytest.raises(ConfigError, match="trainer.precision=bf16-mixed: MAML's inner gradient"):
        train(cfg)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_mixed_precision_restores_the_autocast_it_found(batch):
    learner = model(inner_steps=1)
    with bf16():
        with learner.mixed_precision():
            assert not torch.is_autocast_enabled("cpu")
            with learner.backbone_precision():
                assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert torch.is_autocast_enabled("cpu")
    assert learner._backbone_dtype is None
    with learner.mixed_precision(), learner.backbone_precision():
        assert not torch.is_autocast_enabled("cpu")  # full precision: nothing to enter


def test_a_bf16_mixed_run_learns_what_a_float32_run_learns(tmp_path, data_dir, real_cache_dir):
    """train.py's path with trainer.precision=bf16-mixed and a channels-last backbone on
    real Omniglot, 5-way training episodes, 100 steps: the convolutions ran in bfloat16 and
    the test accuracy is within 3 points of the float32 run's (same seed, same episodes)."""
    common = [
        "experiment=omniglot_5w1s",
        "data.train_ways=null",
        "logger=none",
        "trainer.max_steps=100",
        "trainer.val_check_interval=100",
        "data.val_episodes=20",
        "data.test_episodes=100",
        "model.backbone.channels_last=true",
    ]
    probe = tmp_path / "dtypes.json"
    mixed = train(
        compose_config(
            "train",
            [
                *common,
                "trainer.precision=bf16-mixed",
                "+callbacks.probe._target_=precision_probe.ConvDtypes",
                f"+callbacks.probe.path={probe}",
            ],
            tmp_path / "bf16",
            data_dir,
            real_cache_dir,
        )
    )
    exact = train(compose_config("train", common, tmp_path / "fp32", data_dir, real_cache_dir))
    assert json.loads(probe.read_text()) == ["torch.bfloat16"]
    assert exact["test/accuracy"] > 0.6, exact  # chance is 20%
    assert abs(mixed["test/accuracy"] - exact["test/accuracy"]) < 0.03, (mixed, exact)
