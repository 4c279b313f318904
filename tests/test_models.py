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
