"""ShapPruning: with one clean image per class it finds and prunes the ResNet-18 fixture's backdoor
neurons (under 1% of them) at a small clean cost; data-free it runs from synthetic images through
`sanitize` with its own rule; many coalitions evaluated in one forward give exactly what pruning
each coalition gives."""

from __future__ import annotations

import copy

import torch

import hubdefend
from hubdefend.bake import bake
from hubdefend.defenses.shap import ShapPruning, _CoalitionMasks
from hubdefend.metrics import evaluate
from hubdefend.planning import plan_by_count
from hubdefend.sanitize import sanitize
from hubdefend.training import make_accelerator

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
    # `sanitize` asks for at least 20 defender images (it holds 20% out), so the ten-image few-shot
    # setting is run as sanitize runs a defense: score a private copy, bake the defense's own count.
    fixture = resnet18_backdoor
    few = one_per_class(fixture.defender)
    work = copy.deepcopy(fixture.model).eval()
    groups = hubdefend.discover(work, kinds=("norm",))
    output = ShapPruning(**FAST_OPTIONS).score(
        work, groups, few, normalize=fixture.preprocessing.normalize, num_classes=10,
        accelerator=make_accelerator(), progress=False,
    )  # fmt: skip
    assert output.target == fixture.trigger.target  # inferred from ten images, labels unused
    neurons = len(output.scores.ranked())
    assert 0 < output.own_count <= 0.01 * neurons
    assert output.notes["own_rule"]["pruned"] == output.own_count
    cleaned = bake(fixture.model, plan_by_count(output.scores, output.own_count), groups=groups)
    test = torch.utils.data.Subset(fixture.test, range(1000))
    before = evaluate(fixture.model, test, fixture.preprocessing, trigger=fixture.trigger, progress=False)
    after = evaluate(cleaned, test, fixture.preprocessing, trigger=fixture.trigger, progress=False)
    assert before.asr >= 0.9
    assert after.asr <= 0.20, output.notes
    assert after.ba >= before.ba - 0.05, output.notes


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
