"""DBR-PU with no data at all: nothing is read, the KL rule's neurons are pruned in the unlearned
copy, the scores are minus BNP's per-layer KL z-scores, and the input model is untouched.

Efficacy is measured on the benchmark ResNet-18 (30k training images), not here: on the session
fixtures the unlearning does not keep clean accuracy (``test_resnet`` shares its few neurons between
clean and backdoor features; the 4000-image ResNet-18 fixture answers synthetic images with logits
of 50 and neuron noise points at the wrong class), so only what holds on any model is asserted.
"""

from __future__ import annotations

import copy

import pytest
import torch

import hubdefend
from hubdefend.defenses import data_free_defenses, get_defense
from hubdefend.defenses.dbrpu import DBRPU
from hubdefend.errors import DefenseError
from hubdefend.sanitize import sanitize
from hubdefend.synthesis import norm_input_statistics, synthesize
from hubdefend.training import make_accelerator

# Far below the defaults, for the suite's CPU budget.
FAST = dict(
    synthetic_images=80,
    synthesis_steps=60,
    synthesis_batch_size=80,
    rounds=1,
    inversion_epochs=10,
    finetune_steps=60,
    batch_size=40,
)


def _refuse(*args, **kwargs):
    raise AssertionError("a data-free defense read data")


@pytest.fixture(scope="module")
def defended(tiny_backdoor):
    """sanitize with data=None while every way of reading images fails."""
    before = {k: v.clone() for k, v in tiny_backdoor.model.state_dict().items()}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("hubdefend.data.load_data", _refuse)
        patch.setattr("hubdefend.data._read_fashion_mnist", _refuse)
        patch.setattr("hubdefend.data.PixelDataset.__getitem__", _refuse)
        patch.setattr("torch.utils.data.Subset.__getitem__", _refuse)
        result = sanitize(tiny_backdoor.model, None, defense="dbrpu", progress=False, **FAST)
    return result, before


def test_registered_as_data_free() -> None:
    assert "dbrpu" in data_free_defenses()
    assert not get_defense("dbrpu").needs_labels


def test_runs_without_reading_any_data(defended) -> None:
    result, _ = defended
    report = result.report
    assert report.data["data_free"] and report.data["defender_images"] == 0
    assert report.operating_point["rule"] == "defense-rule"
    notes = report.notes
    assert notes["images"] == "synthetic" and notes["synthesis"]["images"] == FAST["synthetic_images"]
    assert report.neurons_pruned == notes["own_count"] == result.plan.num_pruned
    # The rule's neurons are exactly the ones scoring below -u.
    assert report.neurons_pruned == sum(int((v < -3.0).sum()) for v in result.scores.values.values())
    assert notes["unlearning"]["neurons_masked"] == report.neurons_pruned
    assert not hubdefend.is_masked(result.model)


def test_unlearning_changes_weights_not_the_input_model(defended, tiny_backdoor) -> None:
    result, before = defended
    source = tiny_backdoor.model.state_dict()
    assert all(torch.equal(before[k], source[k]) for k in before)
    cleaned = result.model.state_dict()
    changed = [k for k in source if not torch.equal(source[k], cleaned[k])]
    assert changed and all(k.endswith("weight") for k in changed)  # masks folded into norm scales
    for name, indices in result.plan.pruned.items():  # the plan is baked on top: gamma = 0
        assert (result.model.get_submodule(name).weight[indices] == 0).all()


def test_no_small_trigger_means_pruning_only(tiny_backdoor) -> None:
    # Unlearning a large "trigger" (a natural feature of the class) erased the class on the tiny model:
    # then DBR-PU only prunes the KL rule's neurons.
    model = copy.deepcopy(tiny_backdoor.model).eval()
    preprocessing = tiny_backdoor.preprocessing
    groups = hubdefend.discover(model, kinds=("norm",))
    images = synthesize(model, num_classes=10, preprocessing=preprocessing, n=32, steps=20, progress=False)
    output = DBRPU(rounds=2, inversion_epochs=2, max_trigger_area=0.0, batch_size=32).score(
        model, groups, images, normalize=preprocessing.normalize, num_classes=10,
        accelerator=make_accelerator(), progress=False,
    )  # fmt: skip
    rounds = output.notes["unlearning"]["rounds"]
    assert len(rounds) == 1 and rounds[0]["stopped"].startswith("no small trigger")
    pruned = {
        name: [i for n, i, _ in output.scores.ranked()[: output.own_count] if n == name]
        for name in output.scores.values
    }
    source = tiny_backdoor.model.state_dict()
    for key, value in output.model.state_dict().items():
        name, _, attr = key.rpartition(".")
        if attr == "weight" and pruned.get(name):
            expected = source[key].clone()
            expected[pruned[name]] = 0
            assert torch.equal(value, expected), key
        else:
            assert torch.equal(value, source[key]), key


def test_scores_are_minus_the_kl_z_scores(tiny_backdoor) -> None:
    model = copy.deepcopy(tiny_backdoor.model).eval()
    preprocessing = tiny_backdoor.preprocessing
    groups = hubdefend.discover(model, kinds=("norm",))
    images = synthesize(model, num_classes=10, preprocessing=preprocessing, n=32, steps=20, progress=False)
    output = DBRPU(rounds=0).score(
        model, groups, images, normalize=preprocessing.normalize, num_classes=10,
        accelerator=make_accelerator(), progress=False,
    )  # fmt: skip
    assert output.notes["images"].startswith("defender data")  # given images replace synthesis
    # On the source model: score() may change its private copy (the unlearning, the rule's pruning).
    source = tiny_backdoor.model.eval()
    stats = norm_input_statistics(source, images.pixels, normalize=preprocessing.normalize)
    for group in groups:
        layer = source.get_submodule(group.name)
        mean, var = stats[group.name]
        rm, rv = layer.running_mean, layer.running_var
        kl = 0.5 * (torch.log(rv / var) + (var + (mean - rm) ** 2) / rv - 1)
        z = (kl - kl.mean()) / kl.std()
        torch.testing.assert_close(output.scores.values[group.name], -z, atol=1e-4, rtol=1e-4)
    assert output.own_count == sum(int((v < -3).sum()) for v in output.scores.values.values())


@pytest.mark.parametrize("trainable", ["groups", "all"])
def test_l2_perturbation_and_weight_training(tiny_backdoor, trainable: str) -> None:
    # I-BAU's untargeted L2 perturbation, and Adam on the norm layers' scale and shift or on everything.
    model = copy.deepcopy(tiny_backdoor.model).eval()
    preprocessing = tiny_backdoor.preprocessing
    groups = hubdefend.discover(model, kinds=("norm",))
    images = synthesize(model, num_classes=10, preprocessing=preprocessing, n=32, steps=10, progress=False)
    options = dict(rounds=1, perturbation="l2", perturbation_steps=2, finetune_steps=2, batch_size=16)
    output = DBRPU(trainable=trainable, lr=1e-2, **options).score(
        model, groups, images, normalize=preprocessing.normalize, num_classes=10,
        accelerator=make_accelerator(), progress=False,
    )  # fmt: skip
    assert "attack_loss" in output.notes["unlearning"]["rounds"][0]
    assert not hubdefend.is_masked(output.model)
    source = tiny_backdoor.model.state_dict()
    changed = {k for k, v in output.model.state_dict().items() if not torch.equal(v, source[k])}
    norm_params = {f"{g.name}.{attr}" for g in groups for attr in ("weight", "bias")}
    assert changed & norm_params
    assert (changed <= norm_params) == (trainable == "groups")
    assert not any(p.requires_grad for p in output.model.parameters())


def test_vit_units_fall_back() -> None:
    import timm

    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10
    )
    options = dict(FAST, synthetic_images=20, synthesis_steps=5, inversion_epochs=2, finetune_steps=3)
    with pytest.warns(UserWarning, match="no BatchNorm running statistics"):
        result = sanitize(vit, None, defense="dbrpu", progress=False, **options)
    report = result.report
    assert report.neuron_kinds == ["mlp", "attn"] and report.neurons_pruned == 0  # no running stats, no KL
    assert report.notes["synthesis"]["prior"] == "none"


def test_bad_options() -> None:
    with pytest.raises(DefenseError, match="perturbation"):
        DBRPU(perturbation="linf")
    with pytest.raises(DefenseError, match="trainable"):
        DBRPU(trainable="head")
