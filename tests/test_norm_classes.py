"""Every normalization class hubdefend claims, one by one: discovered with the right channel dim
and hook point; masks at 1 change nothing; zeroing a neuron through the hooks equals baking it;
masked outputs equal the layer run with gamma*(m+delta), beta*(1+xi) written into its weights."""

from __future__ import annotations

import pytest
import torch
import torchvision
from timm import layers
from torch import nn

import hubdefend
from hubdefend.masks import NeuronMasks

C = 8
CHANNELS_FIRST = (2, C, 5, 5)
CHANNELS_LAST = (2, 7, C)

# (factory, input shape, expected channel dim, fused activation?)
NORMS = {
    "BatchNorm1d": (lambda: nn.BatchNorm1d(C), (4, C), 1, False),
    "BatchNorm2d": (lambda: nn.BatchNorm2d(C), CHANNELS_FIRST, 1, False),
    "BatchNorm3d": (lambda: nn.BatchNorm3d(C), (2, C, 3, 3, 3), 1, False),
    "SyncBatchNorm": (lambda: nn.SyncBatchNorm(C), CHANNELS_FIRST, 1, False),
    "InstanceNorm2d": (lambda: nn.InstanceNorm2d(C, affine=True), CHANNELS_FIRST, 1, False),
    "GroupNorm": (lambda: nn.GroupNorm(2, C), CHANNELS_FIRST, 1, False),
    "LayerNorm": (lambda: nn.LayerNorm(C), CHANNELS_LAST, -1, False),
    "RMSNorm": (lambda: nn.RMSNorm(C), CHANNELS_LAST, -1, False),
    "torchvision.FrozenBatchNorm2d": (lambda: torchvision.ops.FrozenBatchNorm2d(C), CHANNELS_FIRST, 1, False),
    "timm.BatchNormAct2d": (lambda: layers.BatchNormAct2d(C, act_layer=nn.SiLU), CHANNELS_FIRST, 1, True),
    "timm.FrozenBatchNormAct2d": (
        lambda: layers.FrozenBatchNormAct2d(C, act_layer=nn.GELU),
        CHANNELS_FIRST,
        1,
        True,
    ),
    "timm.GroupNormAct": (
        lambda: layers.GroupNormAct(C, num_groups=2, act_layer=nn.Hardswish),
        CHANNELS_FIRST,
        1,
        True,
    ),
    "timm.GroupNorm1Act": (lambda: layers.GroupNorm1Act(C, act_layer=nn.SiLU), CHANNELS_FIRST, 1, True),
    "timm.LayerNormAct": (lambda: layers.LayerNormAct(C, act_layer=nn.GELU), CHANNELS_LAST, -1, True),
    "timm.LayerNormAct2d": (lambda: layers.LayerNormAct2d(C, act_layer=nn.GELU), CHANNELS_FIRST, 1, True),
    "timm.RmsNormAct": (lambda: layers.RmsNormAct(C, act_layer=nn.SiLU), CHANNELS_LAST, -1, True),
    "timm.RmsNormAct2d": (lambda: layers.RmsNormAct2d(C, act_layer=nn.SiLU), CHANNELS_FIRST, 1, True),
    "timm.LayerNorm": (lambda: layers.LayerNorm(C), CHANNELS_LAST, -1, False),
    "timm.LayerNorm2d": (lambda: layers.LayerNorm2d(C), CHANNELS_FIRST, 1, False),
    "timm.RmsNorm": (lambda: layers.RmsNorm(C), CHANNELS_LAST, -1, False),
    "timm.RmsNorm2d": (lambda: layers.RmsNorm2d(C), CHANNELS_FIRST, 1, False),
    "timm.SimpleNorm": (lambda: layers.SimpleNorm(C), CHANNELS_LAST, -1, False),
    "timm.SimpleNorm2d": (lambda: layers.SimpleNorm2d(C), CHANNELS_FIRST, 1, False),
    "timm.GroupNorm": (lambda: layers.GroupNorm(C, num_groups=2), CHANNELS_FIRST, 1, False),
    "timm.GroupNorm1": (lambda: layers.GroupNorm1(C), CHANNELS_FIRST, 1, False),
    "timm.EvoNorm2dB0": (lambda: layers.EvoNorm2dB0(C), CHANNELS_FIRST, 1, False),
    "timm.EvoNorm2dS0": (lambda: layers.EvoNorm2dS0(C, groups=2), CHANNELS_FIRST, 1, False),
    "timm.EvoNorm2dS0a": (lambda: layers.EvoNorm2dS0a(C, groups=2), CHANNELS_FIRST, 1, False),
    "timm.FilterResponseNormTlu2d": (lambda: layers.FilterResponseNormTlu2d(C), CHANNELS_FIRST, 1, True),
    "timm.FilterResponseNormAct2d": (lambda: layers.FilterResponseNormAct2d(C), CHANNELS_FIRST, 1, True),
}


def _randomise(layer: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "tau"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                tensor.copy_(
                    torch.rand(tensor.shape, generator=g) * (1.0 if name == "weight" else 0.6)
                    + (0.5 if name == "weight" else -0.3)
                )
        if isinstance(getattr(layer, "running_var", None), torch.Tensor):
            layer.running_var.copy_(torch.rand(layer.running_var.shape, generator=g) + 0.5)


@pytest.mark.parametrize("name", list(NORMS))
def test_norm_class(name: str) -> None:
    factory, shape, channel_dim, fused = NORMS[name]
    torch.manual_seed(0)
    layer = factory()
    _randomise(layer)
    model = nn.Sequential(layer).eval()
    x = torch.randn(*shape)
    (group,) = hubdefend.discover(model)
    assert (group.num_neurons, group.channel_dim) == (C, channel_dim)
    assert (group.hook_on != "output") == fused

    with torch.no_grad():
        plain = model(x)
        masks = NeuronMasks([group], perturbation=True).attach(model)
        identity = model(x)
        g = torch.Generator().manual_seed(1)
        masks.mask[0].copy_(torch.rand(C, generator=g))
        masks.delta[0].copy_(torch.rand(C, generator=g) * 0.4 - 0.2)
        masks.xi[0].copy_(torch.rand(C, generator=g) * 0.4 - 0.2)
        masks.perturbing = True
        perturbed = model(x)
        effective_gamma = layer.weight * (masks.mask[0] + masks.delta[0])
        effective_beta = layer.bias * (1 + masks.xi[0]) if group.beta else None
        masks.perturbing = False
        masks.mask[0].fill_(1.0)
        masks.mask[0][3] = 0.0
        hooked_zero = model(x)
        masks.detach()
        assert torch.equal(identity, plain)
        baked = hubdefend.bake(model, {group.name: [3]})(x)
        torch.testing.assert_close(hooked_zero, baked, rtol=1e-5, atol=1e-5)

        # the same layer with the effective parameters written in
        original = {
            "weight": layer.weight.clone(),
            "bias": None if group.beta is None else layer.bias.clone(),
        }
        layer.weight.copy_(effective_gamma)
        if effective_beta is not None:
            layer.bias.copy_(effective_beta)
        expected = model(x)
        layer.weight.copy_(original["weight"])
        if original["bias"] is not None:
            layer.bias.copy_(original["bias"])
    torch.testing.assert_close(perturbed, expected, rtol=1e-5, atol=1e-5)
