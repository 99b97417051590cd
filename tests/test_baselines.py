"""CLP (data-free) and BNP (one clean batch): the cheap outlier-rule baselines, and sanitize's
data-free path (no data at all: the defense's own rule is the operating point)."""

from __future__ import annotations

import importlib

import pytest
import torch

import hubdefend
from hubdefend.defenses import data_free_defenses, get_defense
from hubdefend.defenses.base import layer_outliers
from hubdefend.defenses.bnp import channel_kl, gaussian_kl
from hubdefend.errors import DefenseError
from hubdefend.neurons import NeuronGroup
from hubdefend.training import make_accelerator


def test_clp_removes_the_backdoor_with_no_data_at_all(resnet18_backdoor, monkeypatch) -> None:
    clp = get_defense("clp")
    score = clp.score
    seen = []

    def score_and_record(self, model, groups, data, **kwargs):
        seen.append(data)
        return score(self, model, groups, data, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("a data-free run loaded defender data")

    # Proof that no data reaches the defense or the operating point: the defense is handed None,
    # and loading or splitting defender data fails. The test images below only measure the result.
    monkeypatch.setattr(clp, "score", score_and_record)
    engine = importlib.import_module("hubdefend.sanitize")  # the module (hubdefend.sanitize is the function)
    monkeypatch.setattr(engine, "_defender_data", refuse)
    monkeypatch.setattr(engine, "_reverse_trigger", refuse)
    result = hubdefend.sanitize(
        resnet18_backdoor.model,
        None,
        defense="clp",
        trigger=resnet18_backdoor.trigger,
        eval_data=resnet18_backdoor.test,
        progress=False,
    )
    report = result.report
    assert seen == [None]
    assert report.data["data_free"] and report.data["defender_images"] == 0
    assert report.operating_point["rule"] == "defense-rule"
    assert report.operating_point["budget_measure"] == "none (no clean data)"
    assert report.val_accuracy_before is None
    assert 0 < report.neurons_pruned <= 0.02 * report.neurons_total
    assert report.asr_before >= 0.9
    assert report.asr_after <= 0.20
    assert report.ba_after >= report.ba_before - 0.05


def test_clp_scores_are_the_filter_norm_times_the_bn_scale(resnet18_backdoor) -> None:
    model = resnet18_backdoor.model
    groups = hubdefend.discover(model, kinds=("norm",))
    output = get_defense("clp")().score(
        model, groups, None, normalize=None, num_classes=10, accelerator=make_accelerator(None)
    )
    # The stem: conv1 -> bn1. An independent computation from singular values of each filter.
    conv, bn = model.conv1, model.bn1
    filters = conv.weight.detach().reshape(conv.out_channels, conv.in_channels, -1)
    uclc = torch.stack([torch.linalg.svdvals(f)[0] for f in filters])
    uclc = uclc * (bn.weight / (bn.running_var + bn.eps).sqrt()).abs().detach()
    z = (uclc - uclc.mean()) / uclc.std()
    assert torch.allclose(output.scores.values["bn1"], -z, atol=1e-4)
    assert output.own_count == sum(int((v < -3).sum()) for v in output.scores.values.values())
    assert "clp" in data_free_defenses() and "bnp" not in data_free_defenses()


def test_layer_outliers_rule() -> None:
    groups = [
        NeuronGroup("a", "norm", "BatchNorm2d", 5, 1, "a"),
        NeuronGroup("b", "norm", "LayerNorm", 3, -1, "b"),
    ]
    values = {"a": torch.tensor([1.0, 1.0, 1.0, 1.0, 9.0])}
    scores, count = layer_outliers(groups, values, u=1.5)
    assert count == 1 and scores.ranked()[0][:2] == ("a", 4)
    assert torch.equal(scores.values["b"], torch.zeros(3))  # no values: never pruned
    assert layer_outliers(groups, values, u=3.0)[1] == 0


def test_bnp_kl_is_taken_on_the_norm_inputs(tiny_backdoor) -> None:
    model = tiny_backdoor.model.eval()
    groups = hubdefend.discover(model, kinds=("norm",))
    data = torch.utils.data.Subset(tiny_backdoor.defender, range(100))
    pixels = torch.stack([x for x, _ in data])
    normalize = tiny_backdoor.preprocessing.normalize
    kl = channel_kl(
        model, groups, pixels, normalize=normalize, batch_size=32, accelerator=make_accelerator(None)
    )
    first = groups[0].name
    captured = []
    handle = model.get_submodule(first).register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        model(normalize(pixels))
    handle.remove()
    x = captured[0].transpose(0, 1).reshape(captured[0].shape[1], -1)
    norm = model.get_submodule(first)
    expected = gaussian_kl(x.mean(1), x.var(1, unbiased=False), norm.running_mean, norm.running_var)
    assert set(kl) == {g.name for g in groups}  # every BatchNorm of the tiny CNN has running stats
    assert torch.allclose(kl[first], expected, rtol=1e-3, atol=1e-4)
    # KL is zero for identical Gaussians and grows with the mean shift.
    kl = gaussian_kl(torch.tensor([0.0, 1.0]), torch.ones(2), torch.zeros(2), torch.ones(2))
    assert kl[0].abs() < 1e-6 and kl[1] == pytest.approx(0.5)


def test_bnp_needs_running_statistics() -> None:
    import timm

    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2
    )
    data = [(torch.rand(3, 32, 32), 0)] * 32
    with pytest.raises(DefenseError, match="running statistics"):
        hubdefend.sanitize(vit, data, defense="bnp", kinds=("norm",), prune=1, progress=False)
