"""Hook masks compute norm(x; gamma*(m+delta), beta*(1+xi)) before any fused activation."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, LayerNorm2d
from torch import nn

import hubdefend
from hubdefend.errors import MaskError, PlanError
from hubdefend.masks import NeuronMasks, masked


def _random_masks(masks: NeuronMasks, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for params in (masks.mask, masks.delta, masks.xi):
            for p in params:
                p.copy_(torch.rand(p.shape, generator=g) - (0.5 if params is not masks.mask else 0.0))


@pytest.mark.parametrize("training", [False, True])
def test_batchnormact2d_equals_explicit_formula(training: bool) -> None:
    torch.manual_seed(0)
    layer = BatchNormAct2d(6, act_layer=nn.SiLU)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    model = nn.Sequential(layer).train(training)
    x = torch.randn(4, 6, 5, 5)
    groups = hubdefend.discover(model)
    assert groups[0].hook_point == "0.act" and groups[0].hook_on == "input"
    mean, var = layer.running_mean.clone(), layer.running_var.clone()
    with masked(model, groups, perturbation=True) as masks:
        _random_masks(masks)
        masks.perturbing = True
        got = model(x)
        m, delta, xi = masks.mask[0], masks.delta[0], masks.xi[0]
        gamma, beta = layer.weight * (m + delta), layer.bias * (1 + xi)
        expected = F.silu(F.batch_norm(x, mean, var, gamma, beta, training, 0.0, layer.eps))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "layer, x",
    [
        (nn.LayerNorm(8), torch.randn(2, 5, 8)),
        (LayerNorm2d(8), torch.randn(2, 8, 3, 3)),
        (nn.GroupNorm(2, 8), torch.randn(2, 8, 3, 3)),
        (nn.BatchNorm1d(8), torch.randn(4, 8)),
        (nn.BatchNorm3d(8), torch.randn(2, 8, 2, 2, 2)),
    ],
    ids=["layernorm", "layernorm2d", "groupnorm", "batchnorm1d", "batchnorm3d"],
)
def test_plain_norms_equal_functional_formula(layer: nn.Module, x: torch.Tensor) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    model = nn.Sequential(layer).eval()
    with masked(model, hubdefend.discover(model), perturbation=True) as masks:
        _random_masks(masks, seed=3)
        masks.perturbing = True
        got = model(x)
        gamma = layer.weight * (masks.mask[0] + masks.delta[0])
        beta = layer.bias * (1 + masks.xi[0])
        # Same layer, same input, with the effective affine parameters written in.
        original = (layer.weight.data.clone(), layer.bias.data.clone())
        masks.detach()
        with torch.no_grad():
            layer.weight.copy_(gamma)
            layer.bias.copy_(beta)
            expected = model(x)
            layer.weight.copy_(original[0])
            layer.bias.copy_(original[1])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_detach_restores_state_dict_bit_for_bit() -> None:
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=4).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    with masked(model, hubdefend.discover(model), perturbation=True) as masks:
        _random_masks(masks)
        model.train()(x)  # BN in train mode: running stats do move, as in the plain model
        assert hubdefend.is_masked(model)
    assert not hubdefend.is_masked(model)
    after = model.state_dict()
    assert list(after) == list(before)
    # The masks never touch parameters; only BN running statistics moved through the train-mode pass.
    for key, value in before.items():
        if "running" not in key and "num_batches" not in key:
            assert torch.equal(after[key], value), key


def test_masks_removed_when_the_forward_fails() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3))
    with pytest.raises(RuntimeError), masked(model, hubdefend.discover(model)):
        model(torch.randn(2, 4, 2, 2))  # wrong channel count
    assert not hubdefend.is_masked(model)


def test_attach_is_all_or_nothing() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3))
    groups = hubdefend.discover(model)
    bad = groups + [groups[0].__class__(**{**groups[0].to_dict(), "name": "9", "hook_point": "9"})]
    with pytest.raises(MaskError, match="does not have"):
        NeuronMasks(bad).attach(model)
    assert not hubdefend.is_masked(model)
    masks = NeuronMasks(groups).attach(model)
    with pytest.raises(MaskError, match="already"):
        NeuronMasks(groups).attach(model)
    masks.detach()


def test_masks_are_trainable_and_gradients_reach_them() -> None:
    model = timm.create_model("test_vit", pretrained=False, num_classes=3).eval().requires_grad_(False)
    x = torch.randn(2, 3, *model.pretrained_cfg["input_size"][1:])
    groups = hubdefend.discover(model, kinds=("norm", "mlp", "head"))
    assert {g.kind for g in groups} == {"norm", "mlp", "head"}
    with masked(model, groups) as masks:
        model(x).sum().backward()
        assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in masks.mask)


def test_head_and_mlp_masks_equal_zeroed_columns() -> None:
    model = timm.create_model("test_vit", pretrained=False, num_classes=3).eval()
    x = torch.randn(2, 3, *model.pretrained_cfg["input_size"][1:])
    groups = hubdefend.discover(model, kinds=("mlp", "head"))
    head = next(g for g in groups if g.kind == "head")
    mlp = next(g for g in groups if g.kind == "mlp")
    with torch.no_grad(), masked(model, groups) as masks:
        masks.mask[groups.index(head)][1] = 0
        masks.mask[groups.index(mlp)][[0, 5]] = 0
        hooked = model(x)
    baked = hubdefend.bake(model, {head.name: [1], mlp.name: [0, 5]}, groups=groups)
    torch.testing.assert_close(baked(x), hooked, rtol=1e-5, atol=1e-5)
    proj = baked.get_submodule(head.name).weight
    assert proj[:, head.neuron_width : 2 * head.neuron_width].abs().sum() == 0


class _HooksOnly(NeuronMasks):
    swap_affine = False  # the plain hook on every group: the reference for the fast paths


def _forward_backward(model: nn.Module, masks: NeuronMasks, x: torch.Tensor, dtype=None):
    x = x.clone().requires_grad_(True)
    with (
        masks.attached_to(model),
        torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None),
    ):
        out = model(x)
        out.float().square().sum().backward()
    grads = [m.grad.clone() for m in masks.mask] + [m.grad.clone() for m in masks.delta]
    for p in (*masks.mask, *masks.delta, *masks.xi):
        p.grad = None
    return out, x.grad, grads


@pytest.mark.parametrize("kinds", [("mlp", "head"), ("mlp", "attn")])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_fused_linear_equals_the_hook(kinds, dtype) -> None:
    """The projections' fast path gives the hook's output and the same gradients for the input,
    the masks and ANP's perturbation, in float32 and under bf16 autocast."""
    model = timm.create_model("test_vit", pretrained=False, num_classes=3).eval().requires_grad_(False)
    x = torch.randn(2, 3, *model.pretrained_cfg["input_size"][1:])
    groups = hubdefend.discover(model, kinds=kinds)
    fast, reference = NeuronMasks(groups, perturbation=True), _HooksOnly(groups, perturbation=True)
    for masks in (fast, reference):
        _random_masks(masks, seed=5)
        masks.perturbing = True
    with fast.attached_to(model):
        assert all(type(model.get_submodule(g.name).forward).__name__ == "_FusedLinear" for g in groups)
    got, expected = _forward_backward(model, fast, x, dtype), _forward_backward(model, reference, x, dtype)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype else dict(rtol=1e-5, atol=1e-5)
    for a, b in zip(got[:2], expected[:2], strict=True):
        torch.testing.assert_close(a.float(), b.float(), **tol)
    for a, b in zip(got[2], expected[2], strict=True):
        torch.testing.assert_close(a, b, **({"rtol": 5e-2, "atol": 5e-2} if dtype else tol))
    assert not any("forward" in model.get_submodule(g.name).__dict__ for g in groups)


def test_fused_linear_trains_the_weights_too() -> None:
    """With masks attached and the weights trainable, the weights get the masked input's gradient."""
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=3).eval()
    x = torch.randn(2, 3, *model.pretrained_cfg["input_size"][1:])
    groups = hubdefend.discover(model, kinds=("mlp",))
    grads = []
    for masks in (NeuronMasks(groups, perturbation=True), _HooksOnly(groups, perturbation=True)):
        _random_masks(masks, seed=2)
        model.zero_grad()
        with masks.attached_to(model):
            model(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-4, atol=1e-5, msg=name)


def test_fused_linear_leaves_a_replaced_forward_alone() -> None:
    """A projection whose forward someone else replaced (Accelerate's offload hooks do) keeps the
    plain hook, and detaching leaves that forward in place."""
    model = timm.create_model("test_vit", pretrained=False, num_classes=3).eval()
    x = torch.randn(2, 3, *model.pretrained_cfg["input_size"][1:])
    groups = hubdefend.discover(model, kinds=("mlp",))
    layer = model.get_submodule(groups[0].name)
    calls = []
    original = layer.forward
    layer.forward = lambda inputs: calls.append(1) or original(inputs)
    replaced = layer.forward
    with torch.no_grad(), masked(model, groups) as masks:
        masks.mask[0].zero_()
        hooked = model(x)
        assert layer.forward is replaced and calls
        masks.bypassed = True
        assert not torch.allclose(model(x), hooked)
    assert layer.forward is replaced and not hubdefend.is_masked(model)
    del layer.forward
    baked = hubdefend.bake(model, {groups[0].name: list(range(groups[0].num_neurons))}, groups=groups)
    torch.testing.assert_close(baked(x), hooked, rtol=1e-5, atol=1e-5)


def _timm_vit() -> tuple[nn.Module, torch.Tensor]:
    model = timm.create_model("test_vit", pretrained=False, num_classes=3).eval()
    return model, torch.randn(2, 3, *model.pretrained_cfg["input_size"][1:])


def _transformers_vit() -> tuple[nn.Module, torch.Tensor]:
    from tests import zoo

    return zoo.build_transformers("vit")


@pytest.mark.parametrize("build", [_timm_vit, _transformers_vit], ids=["timm", "transformers"])
def test_attention_channels_are_the_heads_features(build) -> None:
    model, x = build()
    heads = hubdefend.discover(model, kinds=("head",))
    channels = hubdefend.discover(model, kinds=("attn",))
    assert heads and [g.name for g in channels] == [g.name for g in heads]
    head, attn = heads[0], channels[0]
    assert (attn.kind, attn.neuron_width, attn.num_neurons) == (
        "attn",
        1,
        head.num_neurons * head.neuron_width,
    )
    with torch.no_grad():
        with masked(model, heads) as masks:
            masks.mask[0][1] = 0
            without_head = model(x)
        with masked(model, channels) as masks:
            masks.mask[0][head.neuron_width : 2 * head.neuron_width] = 0
            without_channels = model(x)
            masks.mask[0].fill_(1.0)
            masks.mask[0][[0, 3]] = 0
            hooked = model(x)
    without_head, without_channels, hooked = (
        getattr(t, "logits", t) for t in (without_head, without_channels, hooked)
    )
    torch.testing.assert_close(without_channels, without_head)  # a head is its head_dim channels
    baked = hubdefend.bake(model, {attn.name: [0, 3]}, groups=channels)
    torch.testing.assert_close(getattr(baked(x), "logits", baked(x)), hooked, rtol=1e-5, atol=1e-5)
    assert baked.get_submodule(attn.name).weight[:, [0, 3]].abs().sum() == 0


def test_head_and_attn_are_one_choice() -> None:
    model, _ = _timm_vit()
    with pytest.raises(hubdefend.HubDefendError, match="'head' and 'attn'.*choose one"):
        hubdefend.discover(model, kinds=("head", "attn"))
    name = hubdefend.discover(model, kinds=("attn",))[0].name
    # Index 1 is a head or a channel: bake refuses to guess, and changes nothing.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PlanError, match="holds head and attn neurons"):
        hubdefend.bake(model, {name: [1]}, inplace=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class GemmaStyleRMSNorm(nn.Module):
    """x * (1 + w): w = 0 does NOT silence a channel."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + self.weight)


def test_gemma_style_offset_bakes_to_minus_one() -> None:
    GemmaStyleRMSNorm.__name__ = "Gemma3RMSNorm"  # the class name tells hubdefend its convention
    model = nn.Sequential(GemmaStyleRMSNorm(6))
    groups = hubdefend.discover(model)
    assert groups[0].gamma_offset == 1.0
    x = torch.randn(2, 6)
    baked = hubdefend.bake(model, {"0": [2]})
    assert baked[0].weight[2] == -1.0
    assert baked(x)[:, 2].abs().max() == 0
