"""ShapPruning: with one clean image per class it finds and prunes the ResNet-18 fixture's backdoor
neurons (under 1% of them) at a small clean cost; data-free it runs from synthetic images through
`sanitize` with its own rule; many coalitions evaluated in one forward give exactly what pruning
each coalition gives."""

from __future__ import annotations

import copy

import pytest
import torch

import hubdefend
from hubdefend.bake import bake
from hubdefend.defenses.shap import _CoalitionMasks
from hubdefend.errors import DataError
from hubdefend.sanitize import sanitize

# Smaller than the defaults (40 walks, 40 reversal epochs, 16 noise draws) so that CI stays fast.
FAST_OPTIONS = {"walks": 10, "inversion_epochs": 20, "target_draws": 8, "screen_samples": 32}


def one_per_class(dataset, num_classes: int = 10) -> torch.utils.data.Subset:
    """The first image of each class."""
    first: dict[int, int] = {}
    for index in range(len(dataset)):
        first.setdefault(int(dataset[index][1]), index)
        if len(first) == num_classes:
            break
    return torch.utils.data.Subset(dataset, [first[c] for c in range(num_classes)])


def test_few_shot_shap_pruning_removes_the_backdoor(resnet18_backdoor) -> None:
    # Ten images are too few to hold any out: sanitize gives them all to the defense and takes its own rule.
    fixture = resnet18_backdoor
    test = torch.utils.data.Subset(fixture.test, range(1000))
    result = sanitize(
        fixture.model, one_per_class(fixture.defender), defense="shap", trigger=fixture.trigger,
        eval_data=test, progress=False, **FAST_OPTIONS,
    )  # fmt: skip
    report = result.report
    assert report.suspected_target == fixture.trigger.target  # inferred from ten images, labels unused
    assert report.data["defender_images"] == 10 and report.data["validation_images"] == 0
    assert (
        report.operating_point["rule"] == "defense-rule"
        and "too few images" in report.operating_point["explanation"]
    )
    assert 0 < report.neurons_pruned == report.notes["own_rule"]["pruned"] <= 0.01 * report.neurons_total
    assert report.asr_before >= 0.9
    assert report.asr_after <= 0.20, report.notes
    assert report.ba_after >= report.ba_before - 0.05, report.notes


def test_few_images_are_refused_by_defenses_that_need_more(tiny_backdoor) -> None:
    with pytest.raises(DataError, match="few-shot defense: shap"):
        sanitize(tiny_backdoor.model, one_per_class(tiny_backdoor.defender), defense="anp", progress=False)


def test_data_free_runs_through_sanitize_with_its_own_rule(tiny_backdoor) -> None:
    # Mechanics only: pruning alone does not clean the narrow test_resnet (see conftest).
    options = {
        "synthetic_per_class": 1, "synthesis_steps": 10, "inversion_epochs": 3, "inversion_batches": 2,
        "target_draws": 2, "screen_samples": 8, "walks": 3,
    }  # fmt: skip
    result = sanitize(tiny_backdoor.model, None, defense="shap", progress=False, **options)
    report = result.report
    assert report.data["data_free"] and report.notes["images"] == "synthetic" and report.notes["walks"] == 3
    assert report.operating_point["rule"] == "defense-rule"
    assert report.neurons_pruned == report.notes["own_rule"]["pruned"] <= 0.01 * report.neurons_total + 1
    assert report.suspected_target is not None and not hubdefend.is_masked(result.model)


def test_coalitions_in_one_forward_match_pruned_models(tiny_backdoor) -> None:
    model = hubdefend.load(tiny_backdoor.folder).model.eval()
    groups = [g for g in hubdefend.discover(model, kinds=("norm",)) if g.bakeable]
    sizes = [g.num_neurons for g in groups]
    generator = torch.Generator().manual_seed(0)
    coalitions = (torch.rand(3, sum(sizes), generator=generator) > 0.1).float()
    pixels = torch.rand(4, 3, 32, 32, generator=generator)
    state = copy.deepcopy(model.state_dict())
    masks = _CoalitionMasks(groups)
    with torch.no_grad(), masks.attached_to(model):
        masks.coalitions = list(coalitions.split(sizes, dim=1))
        together = model(pixels.repeat(3, 1, 1, 1)).view(3, 4, -1)
    assert not hubdefend.is_masked(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # detached bit for bit
    for coalition, logits in zip(coalitions, together, strict=True):
        plan, offset = {}, 0
        for group, size in zip(groups, sizes, strict=True):
            removed = (coalition[offset : offset + size] == 0).nonzero().flatten().tolist()
            if removed:
                plan[group.name] = removed
            offset += size
        with torch.no_grad():
            pruned = bake(model, plan, groups=groups)(pixels)
        torch.testing.assert_close(logits, pruned, rtol=1e-4, atol=1e-4)
