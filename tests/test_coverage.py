"""Discovery, identity masks and bake over real architectures: a seeded timm sample, every
transformers image-classification model type, and torchvision classifiers.

For each model: `discover` finds exactly the layers that the structural oracle in `zoo` finds;
attaching masks at 1 changes no output bit; zeroing one neuron through the hooks equals baking it.
For transformers: every vision-transformer type has its MLP units and heads found, and zeroing
an MLP unit, a head or an attention channel through the hooks equals baking it.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

import hubdefend
from hubdefend.errors import NoNormLayersError
from hubdefend.masks import NeuronMasks
from tests import zoo

TIMM_NAMES, TIMM_TOO_BIG = zoo.timm_sample()
RESULTS: dict[str, dict] = {}


def check_model(key: str, model: torch.nn.Module, x: torch.Tensor) -> None:
    expected = zoo.oracle_norm_names(model)
    if not expected:  # e.g. NFNets: a clear error, not an empty list
        with pytest.raises(NoNormLayersError, match="no normalization layer"):
            hubdefend.discover(model)
        RESULTS[key] = {"classes": Counter(), "layers": 0}
        return
    groups = hubdefend.discover(model)
    found = {g.name for g in groups}
    assert found == expected, f"missed {sorted(expected - found)[:5]}, extra {sorted(found - expected)[:5]}"

    with torch.no_grad():
        plain = zoo.logits(model, x)
        masks = NeuronMasks(groups, perturbation=True).attach(model)
        try:
            masks.perturbing = True  # zero perturbation must be exact too
            identity = zoo.logits(model, x)
            bakeable = [g for g in groups if g.bakeable]
            rng = random.Random(key)
            group = rng.choice(bakeable)
            neuron = rng.randrange(group.num_neurons)
            index = masks.groups.index(group)
            masks.mask[index][neuron] = 0.0
            masks.perturbing = False
            hooked = zoo.logits(model, x)
        finally:
            masks.detach()
        assert not hubdefend.is_masked(model)
        assert torch.equal(zoo.logits(model, x), plain), "detach did not restore the model"
        baked = zoo.logits(hubdefend.bake(model, {group.name: [neuron]}, groups=groups), x)
    assert torch.equal(identity, plain), "masks at 1 changed the output"
    scale = plain.abs().max().item() + 1e-6
    assert torch.allclose(hooked, baked, rtol=1e-4, atol=1e-4 * scale), (
        f"zeroing {group.name}[{neuron}] ({group.layer_type}) through hooks != baking it: "
        f"max diff {(hooked - baked).abs().max().item():.3g}"
    )
    RESULTS[key] = {"classes": Counter(g.layer_type for g in groups), "layers": len(groups)}


# Types whose blocks hold attention and an MLP (not FocalNet's modulation, MobileViT v2's linear
# attention, LeViT's or SwiftFormer's own blocks, ImageGPT's Conv1D layers).
TRANSFORMER_TYPES = {
    "beit", "clip", "cvt", "data2vec-vision", "deit", "dinov2", "dinov2_with_registers", "donut-swin", "hiera",
    "ijepa", "metaclip_2", "mobilevit", "perceiver", "pvt", "pvt_v2", "segformer", "shieldgemma2", "siglip",
    "siglip2", "swin", "swinv2", "vit", "vit_msn",
}  # fmt: skip


def check_units(key: str, model: torch.nn.Module, x: torch.Tensor, kind: str) -> None:
    """Zeroing one random unit of ``kind`` in the first block through the hooks equals baking it (the
    first block: later ones may be unused by the classifier, e.g. SigLIP's pooling head)."""
    groups = hubdefend.discover(model, kinds=(kind,))
    assert groups, f"{key}: no {kind} units found"
    rng = random.Random(f"{key}/{kind}")
    group = groups[0]
    neuron = rng.randrange(group.num_neurons)
    with torch.no_grad():
        masks = NeuronMasks(groups).attach(model)
        try:
            masks.mask[groups.index(group)][neuron] = 0.0
            hooked = zoo.logits(model, x)
        finally:
            masks.detach()
        baked = zoo.logits(hubdefend.bake(model, {group.name: [neuron]}, groups=groups), x)
        plain = zoo.logits(model, x)
    assert not torch.equal(hooked, plain), f"{key}: zeroing {group.name}[{neuron}] changed nothing"
    scale = plain.abs().max().item() + 1e-6
    assert torch.allclose(hooked, baked, rtol=1e-4, atol=1e-4 * scale), f"{key}: {group.name}[{neuron}]"


@pytest.mark.parametrize("name", TIMM_NAMES)
def test_timm_architecture(name: str) -> None:
    model, x = zoo.build_timm(name)
    check_model(f"timm/{name}", model, x)


@pytest.mark.parametrize("model_type", zoo.transformers_types())
def test_transformers_model_type(model_type: str) -> None:
    if model_type in zoo.UNBUILDABLE_TRANSFORMERS:
        pytest.skip(
            f"transformers {model_type}: cannot build offline here: {zoo.UNBUILDABLE_TRANSFORMERS[model_type]}"
        )
    model, x = zoo.build_transformers(model_type)
    check_model(f"transformers/{model_type}", model, x)
    if model_type in TRANSFORMER_TYPES:
        for kind in ("mlp", "head", "attn"):
            check_units(f"transformers/{model_type}", model, x, kind)
    else:
        assert not hubdefend.discover(model, kinds=("head",)), (
            f"{model_type}: heads in a model without attention"
        )


@pytest.mark.parametrize("name", zoo.TORCHVISION_MODELS)
def test_torchvision_classifier(name: str) -> None:
    model, x = zoo.build_torchvision(name)
    check_model(f"torchvision/{name}", model, x)


def test_torchvision_frozen_batchnorm() -> None:
    model, x = zoo.build_torchvision("resnet18", frozen_bn=True)
    # FrozenBatchNorm2d keeps gamma/beta as buffers and is no BatchNorm subclass.
    for module in model.modules():
        if type(module).__name__ == "FrozenBatchNorm2d":
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-0.5, 0.5)
    check_model("torchvision/resnet18-frozenbn", model, x)
    assert RESULTS["torchvision/resnet18-frozenbn"]["classes"]["FrozenBatchNorm2d"] == 20


def test_coverage_summary(capsys: pytest.CaptureFixture[str]) -> None:
    """Print the coverage figure (run last in this file)."""
    families = Counter(key.split("/")[0] for key in RESULTS)
    no_norm = sorted(key for key, result in RESULTS.items() if not result["layers"])
    classes = Counter()
    for result in RESULTS.values():
        classes.update(result["classes"])
    with capsys.disabled():
        print(
            f"\ncoverage: {len(RESULTS)} architectures passed ({dict(families)}), "
            f"{len(classes)} normalization classes: {', '.join(sorted(classes))}"
        )
        print(f"no normalization layer (clear NoNormLayersError): {', '.join(no_norm)}")
        print(
            f"timm architectures over {zoo.TIMM_MAX_PARAMS:,} parameters passed over: {', '.join(TIMM_TOO_BIG)}"
        )
        print(f"transformers model types not built offline: {zoo.UNBUILDABLE_TRANSFORMERS}")
    assert len(TIMM_NAMES) == zoo.TIMM_SAMPLE_SIZE
