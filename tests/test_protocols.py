"""Inductive and transductive protocols: which query logits depend on the other queries."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_baselines import random_batch

from metalearn.checkpoint import load_representation
from metalearn.data.episodes import EpisodeBatch
from metalearn.errors import ConfigError
from metalearn.lightning import (
    ANIL,
    MAML,
    ClassicalJointTraining,
    EpisodicModule,
    HyperRepresentation,
    PrototypicalNetwork,
)
from metalearn.models import BATCH_STATS, ConvBackbone, Representation, protocol_of

SIDE = 32
#: Every backbone of conf/model/backbone, shrunk (fewer filters, 32x32 images).
BACKBONES: dict[str, dict[str, Any]] = {
    "conv4_omniglot": {
        "_target_": "metalearn.models.ConvBackbone",
        "in_channels": 1,
        "channels": 4,
        "depth": 4,
        "stride": 2,
        "image_size": SIDE,
    },
    "conv4_miniimagenet": {
        "_target_": "metalearn.models.ConvBackbone",
        "in_channels": 1,
        "channels": 4,
        "depth": 4,
        "stride": 1,
        "pool": True,
        "image_size": SIDE,
    },
    "resnet12": {
        "_target_": "metalearn.models.ResNet12",
        "in_channels": 1,
        "channels": [4, 4, 6, 6],
        "image_size": SIDE,
    },
    "snail_resnet": {
        "_target_": "metalearn.models.SnailResNet",
        "in_channels": 1,
        "channels": [4, 4, 6, 6],
        "image_size": SIDE,
        "head_channels": 8,
        "out_features": 6,
    },
}
INDUCTIVE = [name for name, protocol in BATCH_STATS.items() if protocol == "inductive"]
TRANSDUCTIVE = [name for name, protocol in BATCH_STATS.items() if protocol == "transductive"]


def learner(kind: str, backbone: dict[str, Any], batch_stats: str) -> EpisodicModule:
    """A float64 learner whose BatchNorm shifts and head are not zero (nothing cancels)."""
    torch.manual_seed(0)
    model: EpisodicModule
    if kind == "hyper_representation":
        model = HyperRepresentation(backbone, inner_steps=3, batch_stats=batch_stats)
    elif kind == "protonet":
        model = PrototypicalNetwork(backbone, batch_stats=batch_stats)
    elif kind == "anil":
        model = ANIL(backbone, ways=3, batch_stats=batch_stats, center_features=True)
    elif kind == "classical":
        model = ClassicalJointTraining(backbone, ways=3, pool_episodes=2, batch_stats=batch_stats)
    else:
        model = MAML(backbone, ways=3, batch_stats=batch_stats)
    model = model.double()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or name.startswith("head"):
                parameter.normal_(0, 0.5)
    return model


def running_statistics(model: EpisodicModule) -> None:
    """Give running-statistics BatchNorm non-trivial running averages (two training passes)."""
    model.train()
    with torch.no_grad():
        for seed in (1, 2):
            batch = float_batch(seed)
            model.embed(batch.support, batch.query)


def float_batch(seed: int) -> EpisodeBatch:
    batch = random_batch(2, ways=3, shots=2, queries=3, side=SIDE, seed=seed)
    return batch._replace(support=batch.support.double() / 255, query=batch.query.double() / 255)


def logits_with_query_replaced(
    model: EpisodicModule, position: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The query logits of one episode batch, and of the same batch with query image
    ``position`` of every episode replaced by another image."""
    batch = float_batch(0)
    changed = batch.query.clone()
    torch.manual_seed(10)
    changed[:, position] = torch.rand_like(changed[:, position])
    with torch.no_grad():
        before, _ = model.episode_logits(batch, model.eval_steps)
        after, _ = model.episode_logits(batch._replace(query=changed), model.eval_steps)
    return before, after


LEARNERS = ["hyper_representation", "protonet", "anil", "classical", "maml"]


def allowed(kind: str, batch_stats: str) -> bool:
    return kind != "maml" or batch_stats in ("split", "support")


@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize(
    ("kind", "batch_stats"),
    [(kind, stats) for kind in LEARNERS for stats in INDUCTIVE if allowed(kind, stats)],
)
def test_inductive_query_logits_do_not_depend_on_the_other_queries(backbone, kind, batch_stats):
    """Every learner with every inductive setting it takes (MAML: support only)."""
    model = learner(kind, BACKBONES[backbone], batch_stats)
    if batch_stats == "running":
        running_statistics(model)
    modes = ["eval"] if batch_stats == "running" else ["train", "eval"]
    for mode in modes:
        model.train(mode == "train")
        for position in (0, 4, 8):
            before, after = logits_with_query_replaced(model, position)
            keep = [q for q in range(before.shape[1]) if q != position]
            assert torch.equal(before[:, keep], after[:, keep]), (mode, position)
            assert not torch.equal(before[:, position], after[:, position])


@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("batch_stats", TRANSDUCTIVE)
def test_transductive_query_logits_depend_on_the_other_queries(backbone, batch_stats):
    """What makes these settings transductive: one query image moves every other query's
    logits (through the BatchNorm statistics of the query images), in evaluation too."""
    model = learner("hyper_representation", BACKBONES[backbone], batch_stats).eval()
    before, after = logits_with_query_replaced(model, 0)
    assert not torch.equal(before[:, 1:], after[:, 1:])
    assert (before[:, 1:] - after[:, 1:]).abs().max() > 1e-6


def test_running_statistics_are_transductive_in_training_only():
    """Conventional BatchNorm normalizes a training batch with its own statistics."""
    model = learner("hyper_representation", BACKBONES["conv4_omniglot"], "running").train()
    before, after = logits_with_query_replaced(model, 0)
    assert not torch.equal(before[:, 1:], after[:, 1:])


def test_every_setting_names_its_protocol():
    assert set(INDUCTIVE) == {"support", "running"}
    assert set(TRANSDUCTIVE) == {"episode", "split", "meta_batch"}
    for name, protocol in BATCH_STATS.items():
        assert protocol_of(name) == protocol
        model = HyperRepresentation(BACKBONES["conv4_omniglot"], batch_stats=name)
        assert model.protocol == protocol
    with pytest.raises(ConfigError, match=r"support \(inductive\), running \(inductive\)"):
        protocol_of("query")
    with pytest.raises(ConfigError, match="model.batch_stats must be one of"):
        HyperRepresentation(BACKBONES["conv4_omniglot"], batch_stats="batch")


def test_the_backbone_norm_is_set_by_batch_stats_only():
    model = HyperRepresentation(BACKBONES["conv4_omniglot"], batch_stats="running")
    assert {name.rsplit(".", 1)[-1] for name, _ in model.backbone.named_buffers()} >= {
        "running_mean",
        "running_var",
    }
    with pytest.raises(ConfigError, match="model.backbone.norm is set by model.batch_stats"):
        HyperRepresentation({**BACKBONES["conv4_omniglot"], "norm": "running"})
    with pytest.raises(ConfigError, match="'running' needs norm 'running'"):
        HyperRepresentation({**BACKBONES["conv4_omniglot"], "norm": "batch"}, batch_stats="running")
    # A backbone config that agrees (older checkpoints' form) builds the same network.
    agreeing = HyperRepresentation({**BACKBONES["conv4_omniglot"], "norm": "batch"})
    assert agreeing.backbone.blocks[0].norm.mode == "batch"


def test_support_statistics_are_the_batchnorm_of_the_support_set():
    """support_size = all images is ordinary per-batch BatchNorm; the statistics of a
    smaller support set are exactly those of the support images alone."""
    torch.manual_seed(0)
    net = ConvBackbone(in_channels=1, channels=4, image_size=SIDE).double()
    images = torch.rand(2, 7, 1, SIDE, SIDE, dtype=torch.float64)
    torch.testing.assert_close(net(images, support_size=7), net(images), rtol=1e-10, atol=1e-10)
    support_only = net(images[:, :3])
    torch.testing.assert_close(net(images, support_size=3)[:, :3], support_only)
    with pytest.raises(ValueError, match="support_size"):
        net(images, support_size=8)


def test_support_statistics_pass_gradients_through_the_statistics():
    """BatchNorm with support statistics is differentiable in the support images, as in
    training BatchNorm: finite differences in float64."""
    torch.manual_seed(0)
    net = ConvBackbone(in_channels=1, channels=2, depth=2, image_size=8).double()
    with torch.no_grad():
        for block in net.blocks:
            block.norm.bias.normal_()
    support = torch.rand(1, 3, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    query = torch.rand(1, 2, 1, 8, 8, dtype=torch.float64)

    def features(s: torch.Tensor) -> torch.Tensor:
        return net(torch.cat([s, query], dim=1), support_size=3)[:, 3:]

    assert torch.autograd.gradcheck(features, (support,))


def trained_checkpoint(tmp_path, batch_stats: str) -> str:
    """A checkpoint file as training writes it (hyperparameters, state, model class)."""
    model = learner("hyper_representation", BACKBONES["resnet12"], batch_stats)
    if batch_stats == "running":
        running_statistics(model)
    path = tmp_path / f"{batch_stats}.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "model_target": "metalearn.lightning.HyperRepresentation",
        },
        path,
    )
    return str(path)


@pytest.mark.parametrize("batch_stats", INDUCTIVE)
def test_an_inductive_representation_embeds_one_query_as_in_a_batch(tmp_path, batch_stats):
    net = load_representation(trained_checkpoint(tmp_path, batch_stats))
    assert isinstance(net, Representation) and not net.training
    assert net.protocol == "inductive"
    batch = float_batch(0)
    support, queries = batch.support[0], batch.query[0]
    with torch.no_grad():
        together = net(queries, support=support)
        for q in range(len(queries)):
            assert torch.equal(net(queries[q : q + 1], support=support)[0], together[q])
        if batch_stats == "support":
            # The support set embedded with its own statistics: the learner's features.
            model = learner("hyper_representation", BACKBONES["resnet12"], batch_stats)
            expected = model.eval().embed(batch.support[:1], batch.query[:1])
            torch.testing.assert_close(net(support), expected[0][0], rtol=0, atol=1e-12)
            torch.testing.assert_close(together, expected[1][0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("batch_stats", TRANSDUCTIVE)
def test_a_transductive_representation_embeds_one_query_differently(tmp_path, batch_stats):
    net = load_representation(trained_checkpoint(tmp_path, batch_stats))
    assert net.protocol == "transductive"
    batch = float_batch(0)
    support, queries = batch.support[0], batch.query[0]
    with torch.no_grad():
        together = net(queries, support=support)
        alone = net(queries[:1], support=support)[0]
    assert (alone - together[0]).abs().max() > 1e-6


def test_checkpoints_with_a_backbone_norm_load_as_batch_stats(tmp_path):
    """Checkpoints written when the backbone config held ``norm`` still load."""
    path = trained_checkpoint(tmp_path, "running")
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"]["batch_stats"] = "episode"
    checkpoint["hyper_parameters"]["backbone"]["norm"] = "running"
    torch.save(checkpoint, path)
    net = load_representation(path)
    assert net.batch_stats == "running" and net.protocol == "inductive"
