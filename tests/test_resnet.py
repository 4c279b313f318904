"""Residual backbones: feature sizes, per-episode BatchNorm, parameter counts, shape errors."""

from __future__ import annotations

import hydra.utils
import pytest
import torch
from conftest import CONF
from omegaconf import OmegaConf

from metalearn.models import ResidualBackbone, ResNet12, SnailResNet


def block_params(cin: int, cout: int, bn_params: int) -> int:
    """3 convs 3x3 + 1x1 shortcut (no bias), 4 BatchNorms."""
    return 9 * cin * cout + 2 * 9 * cout * cout + cin * cout + 4 * bn_params * cout


def expected_params(channels: list[int], bn_scale: bool, head: tuple[int, int] | None) -> int:
    widths = [3, *channels]
    total = sum(
        block_params(cin, cout, 2 if bn_scale else 1)
        for cin, cout in zip(widths[:-1], widths[1:], strict=True)
    )
    if head is not None:
        hidden, out = head
        total += channels[-1] * hidden + hidden + hidden * out + out
    return total


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_feature_dims_and_parameter_counts() -> None:
    torch.manual_seed(0)
    snail, resnet12 = SnailResNet(), ResNet12()
    assert (snail.feature_dim, resnet12.feature_dim) == (512, 640)
    assert snail(torch.rand(2, 3, 84, 84)).shape == (2, 512)
    assert resnet12(torch.rand(2, 3, 84, 84)).shape == (2, 640)
    assert n_params(snail) == expected_params([64, 96, 128, 256], True, (2048, 512))
    assert n_params(SnailResNet(bn_scale=False)) == expected_params(
        [64, 96, 128, 256], False, (2048, 512)
    )
    assert n_params(resnet12) == expected_params([64, 160, 320, 640], True, None) == 12_424_320


def test_configs_instantiate() -> None:
    for name, dim in (("resnet_snail", 512), ("resnet12", 640)):
        cfg = OmegaConf.load(CONF / "model" / "backbone" / f"{name}.yaml")
        net = hydra.utils.instantiate(cfg)
        assert net.feature_dim == dim and net.image_size == 84


def small(cls: type[ResidualBackbone]) -> ResidualBackbone:
    """A narrow network of the same structure, on any image size (checks the wiring)."""
    if cls is SnailResNet:
        return SnailResNet(channels=(4, 6, 8, 8), image_size=None, head_channels=16, out_features=5)
    return ResNet12(channels=(4, 6, 8, 8), image_size=None)


@pytest.mark.parametrize("cls", [SnailResNet, ResNet12])
def test_episode_input_uses_per_episode_statistics(cls: type[ResidualBackbone]) -> None:
    torch.manual_seed(0)
    net = small(cls).double()
    episodes = torch.randn(3, 5, 3, 20, 20, dtype=torch.float64)
    episodes[1] = episodes[1] * 5 + 2  # a differently scaled episode
    out = net(episodes)
    assert out.shape == (3, 5, net.feature_dim)
    for g in range(3):
        torch.testing.assert_close(out[g], net(episodes[g]))
    other = episodes.clone()
    other[2] = torch.randn(5, 3, 20, 20, dtype=torch.float64)
    torch.testing.assert_close(net(other)[:2], out[:2])
    net.eval()  # batch statistics in eval mode too (the paper's transductive BN)
    torch.testing.assert_close(net(episodes), out)
    # every parameter receives a gradient
    net.train()
    net(episodes).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_running_mode_is_conventional_batchnorm() -> None:
    torch.manual_seed(0)
    net = ResNet12(channels=(4, 4, 8, 8), image_size=32, norm="running")
    x = torch.rand(6, 3, 32, 32)
    net.train()
    net(x)
    net.eval()
    torch.testing.assert_close(net(x[:1]), net(x)[:1])  # eval: independent of the batch


def test_shape_errors() -> None:
    net = SnailResNet(channels=(4, 4, 4, 4), head_channels=8, out_features=4)
    with pytest.raises(ValueError, match="3 x 84 x 84"):
        net(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match="3 x 84 x 84"):
        net(torch.rand(2, 1, 84, 84))
    with pytest.raises(ValueError, match="shape"):
        net(torch.rand(84, 84))
    any_size = ResNet12(channels=(4, 4, 4, 4), image_size=None)
    assert any_size(torch.rand(2, 3, 40, 24)).shape == (2, 4)
    with pytest.raises(ValueError, match="at least 16"):
        any_size(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="too small"):
        ResNet12(image_size=8)
    with pytest.raises(ValueError, match="BatchNorm mode"):
        ResNet12(norm="group")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="head"):
        ResidualBackbone(head="linear")  # type: ignore[arg-type]
