"""Backbone shapes and the per-episode BatchNorm."""

from __future__ import annotations

import pytest
import torch

from metalearn.models import ConvBackbone


def omniglot_net(**kwargs):
    return ConvBackbone(**kwargs)


def mini_net(**kwargs):
    return ConvBackbone(in_channels=3, channels=32, stride=1, pool=True, image_size=84, **kwargs)


def test_paper_feature_dims():
    assert omniglot_net().feature_dim == 256
    assert omniglot_net()(torch.randn(6, 1, 28, 28)).shape == (6, 256)
    assert mini_net().feature_dim == 800
    assert mini_net()(torch.randn(2, 3, 84, 84)).shape == (2, 800)
    # 4 blocks, 64 filters of 3x3, shift-only BatchNorm, no conv bias.
    net = omniglot_net()
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params == 1 * 64 * 9 + 3 * 64 * 64 * 9 + 4 * 64


def test_episode_input_uses_per_episode_statistics():
    torch.manual_seed(0)
    net = omniglot_net().double()
    episodes = torch.randn(3, 10, 1, 28, 28, dtype=torch.float64)
    episodes[1] = episodes[1] * 5 + 2  # a differently scaled episode
    out = net(episodes)
    assert out.shape == (3, 10, 256)
    for g in range(3):
        torch.testing.assert_close(out[g], net(episodes[g]))
    # Changing one episode leaves the features of the others unchanged.
    other = episodes.clone()
    other[2] = torch.randn(10, 1, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(net(other)[:2], out[:2])
    # Batch statistics are used in eval mode too (the paper's transductive BN).
    net.eval()
    torch.testing.assert_close(net(episodes), out)


def test_running_mode_is_conventional_batchnorm():
    torch.manual_seed(0)
    net = omniglot_net(norm="running", bn_scale=True)
    x = torch.randn(8, 1, 28, 28)
    net.train()
    net(x)
    net.eval()
    single = net(x[:1])
    torch.testing.assert_close(single, net(x)[:1])  # eval: independent of the batch


def test_shape_errors():
    net = omniglot_net()
    with pytest.raises(ValueError, match="1 x 28 x 28"):
        net(torch.randn(2, 3, 28, 28))
    with pytest.raises(ValueError, match="shape"):
        net(torch.randn(28, 28))
    with pytest.raises(ValueError, match="BatchNorm mode"):
        omniglot_net(norm="group")


@pytest.mark.parametrize(
    "norm, support_size", [("batch", None), ("batch", 3), ("running", None)], ids=str
)
def test_the_channels_last_backbone_computes_the_contiguous_one(norm, support_size):
    """Float64: the same features and gradients from both memory formats (group-major rows
    for per-episode BatchNorm against example-major ones), for episodes and plain batches."""
    torch.manual_seed(0)
    a = ConvBackbone(channels=8, norm=norm, channels_last=False).double()
    b = ConvBackbone(channels=8, norm=norm, channels_last=True).double()
    b.load_state_dict(a.state_dict())
    assert b.blocks[1].conv.weight.is_contiguous(memory_format=torch.channels_last)
    episodes = torch.rand(3, 7, 1, 28, 28, dtype=torch.float64)
    size = None if norm == "running" else support_size
    fa, fb = a(episodes, support_size=size), b(episodes, support_size=size)
    torch.testing.assert_close(fb, fa, rtol=1e-12, atol=1e-12)
    (fa * torch.arange(fa.numel()).view_as(fa).sin()).sum().backward()
    (fb * torch.arange(fb.numel()).view_as(fb).sin()).sum().backward()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12)
    flat = episodes.flatten(0, 1)
    torch.testing.assert_close(b(flat), a(flat), rtol=1e-12, atol=1e-12)
    if norm == "running":
        for p, q in zip(a.buffers(), b.buffers(), strict=True):
            torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-12)


# -- embedding a meta-batch in chunks of episodes (model.episode_chunk) -------------------
def _tiny_resnet():
    from metalearn.models import ResNet12

    return ResNet12(channels=(4, 6, 8, 8), image_size=None)


@pytest.mark.parametrize("batch_stats", ["episode", "split", "support"])
@pytest.mark.parametrize("make", [omniglot_net, _tiny_resnet], ids=["conv4", "resnet12"])
def test_a_meta_batch_embedded_in_chunks_of_episodes_has_the_same_features(batch_stats, make):
    """Per-episode statistics: embedding 1 or 3 of the 4 episodes per backbone call gives
    the features, and the gradients of a loss on them, of one call (float64)."""
    from metalearn.models.normalization import embed_episodes

    torch.manual_seed(0)
    net = make().double()
    channels, size = (1, 28) if isinstance(net, ConvBackbone) else (3, 16)
    support = torch.randn(4, 5, channels, size, size, dtype=torch.float64)
    query = torch.randn(4, 7, channels, size, size, dtype=torch.float64)
    query[2] = query[2] * 3 + 1  # episodes on different scales

    def features_and_gradients(per_call):
        net.zero_grad()
        s, q = embed_episodes(net, support, query, batch_stats, per_call)
        (s.sin().sum() + q.square().mean()).backward()
        return s, q, [p.grad.clone() for p in net.parameters()]

    whole = features_and_gradients(None)
    assert whole[0].shape[:2] == (4, 5) and whole[1].shape[:2] == (4, 7)
    for per_call in (1, 3):
        chunked = features_and_gradients(per_call)
        torch.testing.assert_close(chunked[0], whole[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(chunked[1], whole[1], rtol=1e-12, atol=1e-12)
        for got, expected in zip(chunked[2], whole[2], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batch_stats", ["meta_batch", "running"])
def test_statistics_over_the_meta_batch_cannot_be_embedded_in_chunks(batch_stats):
    from metalearn.errors import ConfigError
    from metalearn.models.normalization import (
        check_episode_chunk,
        embed_episodes,
        episodes_per_call,
    )

    with pytest.raises(ConfigError, match="model.episode_chunk=2 would change the features"):
        check_episode_chunk(2, batch_stats)
    check_episode_chunk("auto", batch_stats)
    check_episode_chunk(None, batch_stats)
    # auto falls back to one call there, on every device
    assert episodes_per_call("auto", batch_stats, torch.device("cpu")) is None
    images = torch.randn(2, 3, 1, 28, 28)
    with pytest.raises(ValueError, match="whole meta-batch"):
        embed_episodes(omniglot_net(), images, images, batch_stats, 1)


@pytest.mark.parametrize("value", [0, -1, True, 2.5, "all"])
def test_a_wrong_episode_chunk_is_one_config_error(value):
    from metalearn.errors import ConfigError
    from metalearn.models.normalization import check_episode_chunk

    with pytest.raises(ConfigError, match="model.episode_chunk must be auto, null") as caught:
        check_episode_chunk(value, "episode")
    assert "\n" not in str(caught.value)


def test_episode_chunk_auto_is_one_episode_on_the_cpu_and_one_call_on_a_gpu():
    from metalearn.models.normalization import episodes_per_call

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for batch_stats in ("episode", "split", "support"):
        assert episodes_per_call("auto", batch_stats, cpu) == 1
        assert episodes_per_call("auto", batch_stats, cuda) is None
    assert episodes_per_call(3, "episode", cuda) == 3
    assert episodes_per_call(None, "episode", cpu) is None


@pytest.mark.parametrize("learner", ["HyperRepresentation", "PrototypicalNetwork"])
def test_the_meta_step_does_not_depend_on_the_episode_chunk(learner):
    """A learner's loss and hypergradient on a meta-batch are the same with the whole
    meta-batch in one backbone call, with one episode per call (``auto`` on the CPU) and
    with 3 (float64); an integer chunk under statistics over the meta-batch is refused."""
    import metalearn.lightning as lightning
    from metalearn.data.episodes import EpisodeBatch
    from metalearn.errors import ConfigError

    backbone = {"_target_": "metalearn.models.ConvBackbone", "channels": 4}
    cls = getattr(lightning, learner)
    generator = torch.Generator().manual_seed(0)
    ways, shots, queries = 3, 2, 4
    batch = EpisodeBatch(
        support=torch.randint(0, 256, (4, ways * shots, 1, 28, 28), generator=generator).to(
            torch.uint8
        ),
        support_labels=torch.arange(ways).repeat_interleave(shots).expand(4, -1),
        query=torch.randint(0, 256, (4, ways * queries, 1, 28, 28), generator=generator).to(
            torch.uint8
        ),
        query_labels=torch.arange(ways).repeat_interleave(queries).expand(4, -1),
        ways=ways,
        episode_ids=torch.arange(4),
    )
    results = []
    for chunk in (None, "auto", 3):
        torch.manual_seed(0)
        model = cls(backbone, episode_chunk=chunk).double().train()
        loss, accuracy = model.training_loss(batch)
        loss.mean().backward()
        results.append((loss, accuracy, [p.grad for p in model.parameters() if p.requires_grad]))
    for loss, accuracy, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(accuracy, results[0][1])
        for got, expected in zip(grads, results[0][2], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ConfigError, match="would change the features"):
        cls(backbone, batch_stats="meta_batch", episode_chunk=2)
