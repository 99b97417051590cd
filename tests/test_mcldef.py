"""MCLDef: fine-tuning every weight with the model-contrastive loss removes the ResNet-18 fixture's
backdoor at a small clean cost, prunes nothing, hands back its own copy and leaves the input model
untouched; the loss and the augmentation behave as documented."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hubdefend
from hubdefend.defenses.cnp import classifier_of
from hubdefend.defenses.mcldef import MCLDef, model_contrastive_loss, random_crop_flip
from hubdefend.errors import DefenseError
from hubdefend.metrics import evaluate
from hubdefend.sanitize import sanitize
from hubdefend.training import make_accelerator

# Far below the reference's 100 reversal epochs at lr 0.005 and 20 tuning epochs, so that CI stays fast;
# a 10x larger reversal step makes up for the fewer epochs.
FAST_OPTIONS = {"inversion_epochs": 8, "inversion_lr": 0.05, "epochs": 3}


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_mcldef_removes_the_backdoor_by_fine_tuning(resnet18_backdoor) -> None:
    fixture = resnet18_backdoor
    test = torch.utils.data.Subset(fixture.test, range(1000))
    # The report's "before" is the model the user gave, not the defense's tuned copy.
    before = evaluate(fixture.model, test, fixture.preprocessing, trigger=fixture.trigger, progress=False)
    weights = _weights(fixture.model)
    result = sanitize(
        fixture.model,
        fixture.defender,
        defense="mcldef",
        trigger=fixture.trigger,
        eval_data=test,
        progress=False,
        **FAST_OPTIONS,
    )
    report = result.report
    assert before.asr >= 0.9
    assert (report.ba_before, report.asr_before) == pytest.approx((before.ba, before.asr), abs=1e-6)
    assert report.asr_after <= 0.20, (before, report.notes)
    assert report.ba_after >= before.ba - 0.05, (before, report.notes)
    assert report.weights_changed and report.neurons_pruned == 0
    assert report.operating_point["rule"] == "defense-rule"
    assert report.suspected_target == fixture.trigger.target  # inferred: no target was given
    assert report.notes["epochs"] == 3 and len(report.notes["losses"]) == 3
    after = fixture.model.state_dict()
    assert all(torch.equal(weights[name], after[name]) for name in weights)
    assert not hubdefend.is_masked(result.model)


def test_mcldef_mechanics_on_the_tiny_model(tiny_backdoor) -> None:
    fixture = tiny_backdoor
    data = torch.utils.data.Subset(fixture.defender, range(100))
    defense = MCLDef(target=0, inversion_epochs=1, epochs=1, batch_size=32)
    work = hubdefend.load(fixture.folder).model.eval()
    flags = [p.requires_grad for p in work.parameters()]
    groups = hubdefend.discover(work, kinds=("norm",))
    output = defense.score(
        work, groups, data, normalize=fixture.preprocessing.normalize, num_classes=10,
        accelerator=make_accelerator(), progress=False,
    )  # fmt: skip
    assert output.model is work and not output.model.training
    assert output.own_count == 0 and output.target == 0 and "target_evidence" not in output.notes
    assert all(bool((v == 1).all()) for v in output.scores.values.values())
    assert not classifier_of(work)._forward_pre_hooks  # the feature tap is gone
    assert [p.requires_grad for p in work.parameters()] == flags
    changed = [
        not torch.equal(a, b)
        for a, b in zip(work.state_dict().values(), fixture.model.state_dict().values(), strict=True)
    ]
    assert any(changed)
    with pytest.raises(DefenseError, match="not one of the model's 10 classes"):
        MCLDef(target=10).score(
            work, groups, data, normalize=fixture.preprocessing.normalize, num_classes=10,
            accelerator=make_accelerator(), progress=False,
        )  # fmt: skip


def test_contrastive_loss_prefers_the_positive() -> None:
    torch.manual_seed(0)
    positive, negative = torch.randn(8, 16), torch.randn(8, 16)
    near_positive = model_contrastive_loss(positive, positive, negative, 0.5)
    near_negative = model_contrastive_loss(negative, positive, negative, 0.5)
    assert near_positive < near_negative
    cos = torch.stack([F.cosine_similarity(positive, positive), F.cosine_similarity(positive, negative)], 1)
    expected = F.cross_entropy(cos / 0.5, torch.zeros(8, dtype=torch.long))
    torch.testing.assert_close(near_positive, expected)


def test_random_crop_flip_is_seeded_and_shape_preserving() -> None:
    pixels = torch.rand(16, 3, 8, 8)
    first = random_crop_flip(pixels, pad=2, generator=torch.Generator().manual_seed(1))
    second = random_crop_flip(pixels, pad=2, generator=torch.Generator().manual_seed(1))
    assert first.shape == pixels.shape and torch.equal(first, second)
    unpadded = random_crop_flip(pixels, pad=0, generator=torch.Generator().manual_seed(1))
    for image, out in zip(pixels, unpadded, strict=True):  # no padding: each image kept or mirrored
        assert torch.equal(out, image) or torch.equal(out, image.flip(-1))
