"""Data-free detection (hubdefend/detect.py): `hubdefend scan MODEL` decides without any data.

The statistics are checked on their own (robust z-scores against the OTHER classes, the Monte Carlo
p-value's calibration under its null, MM-BD's gamma test); the verdict on the session fixtures (the
bundled example's recipe: a BadNets model with target 0 and the same model trained clean), in
process and through the CLI's exit status; the detectors are seeded, leave the model as it was, and
run on tiny ViTs (timm and transformers) as well as on the ResNet.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from hubdefend.detect import (
    NULL_SAMPLES,
    MaxMargin,
    NeuronCollapse,
    TriggerDominance,
    UniversalTrigger,
    detect_backdoor,
    gamma_fit,
    gamma_order_p_value,
    max_z_p_value,
    robust_z,
)
from hubdefend.errors import DataError
from hubdefend.preprocess import Preprocessing
from hubdefend.scan import VERDICT_NONE, VERDICT_SUSPECTED, detection_images, scan
from hubdefend.schemas import validate

# A small budget for the tests that check mechanics, not the verdict.
_TRIGGERS = UniversalTrigger(images=4, steps=5)
CHEAP = (_TRIGGERS, TriggerDominance(triggers=_TRIGGERS), MaxMargin(restarts=2, steps=5))
EXIT_BACKDOOR_SUSPECTED = 10


# ---- statistics ---------------------------------------------------------------------------------
def test_robust_z_measures_each_class_against_the_others() -> None:
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])
    # Class 4 against [1, 2, 3, 4]: median 2.5, MAD 1, Qn's 3rd smallest pairwise distance 1.
    assert float(robust_z(scores, "mad")[4]) == pytest.approx((100 - 2.5) / 1.4826)
    assert float(robust_z(scores, "qn")[4]) == pytest.approx((100 - 2.5) / 2.2219)
    # Class 0 against [2, 3, 4, 100]: the outlier moves neither the median (3.5) nor the spread much.
    assert float(robust_z(scores, "mad")[0]) == pytest.approx((1 - 3.5) / 1.4826)
    # Equal other classes: the spread is floored, not zero (class 0 sits at the others' median).
    flat = robust_z(torch.tensor([5.0, 5.0, 5.0, 5.0, 6.0]))
    assert math.isfinite(float(flat[4])) and float(flat[4]) > 1e3 and float(flat[0]) == 0
    with pytest.raises(DataError, match="at least 3 classes"):
        robust_z(torch.tensor([1.0, 2.0]))
    with pytest.raises(DataError, match="scale="):
        robust_z(scores, "iqr")


@pytest.mark.parametrize("scale", ["qn", "mad"])
def test_p_value_is_calibrated_under_its_null(scale: str) -> None:
    """K normal scores with no special class: P(p < 0.1) is 0.1, with the max over K included."""
    generator = torch.Generator().manual_seed(123)
    draws = torch.randn(400, 10, generator=generator, dtype=torch.float64)
    maxima = robust_z(draws, scale).amax(dim=-1)
    p_values = [max_z_p_value(float(v), 10, scale) for v in maxima]
    assert 0.06 <= sum(p < 0.1 for p in p_values) / len(p_values) <= 0.14
    assert 0.42 <= sum(p < 0.5 for p in p_values) / len(p_values) <= 0.58
    assert max_z_p_value(3.0, 10, scale) > max_z_p_value(6.0, 10, scale) > max_z_p_value(12.0, 10, scale)
    assert max_z_p_value(1e9, 10, scale) == 1 / (NULL_SAMPLES + 1)
    assert max_z_p_value(float("nan"), 10, scale) == 1.0


def test_gamma_fit_and_mm_bd_order_statistic_test() -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        sample = torch.distributions.Gamma(3.0, 0.5).sample((4000,))  # shape 3, scale 2
        null_stats = torch.distributions.Gamma(4.0, 0.2).sample((10,))
    shape, scale = gamma_fit(sample)
    assert shape == pytest.approx(3.0, rel=0.1) and scale == pytest.approx(2.0, rel=0.1)
    outlier = null_stats.clone()
    outlier[6] = 20 * null_stats.max()
    top, p_value = gamma_order_p_value(outlier)
    assert top == 6 and p_value < 1e-4
    top, p_value = gamma_order_p_value(null_stats)
    assert top == int(null_stats.argmax()) and p_value > 0.01


# ---- the verdict on the session fixtures ----------------------------------------------------------
@pytest.fixture(scope="module")
def scans(tiny_backdoor, tiny_clean) -> dict:
    return {
        "backdoor": scan(str(tiny_backdoor.folder), progress=False),
        "clean": scan(str(tiny_clean.folder), progress=False),
    }


def test_flags_the_backdoored_fixture_and_its_target(scans, tiny_backdoor) -> None:
    assert tiny_backdoor.record["asr"] > 0.9 and tiny_backdoor.record["target"] == 0
    result = scans["backdoor"]
    detection = result.detection
    assert detection["method"] == "data-free"
    assert result.verdict == VERDICT_SUSPECTED and result.suspected_target == 0
    assert detection["top_class"] == 0 and detection["p_value"] < detection["alpha"] == 0.01
    assert result.anomaly_index == max(detection["anomaly_index"]) == detection["anomaly_index"][0]
    assert set(detection["detectors"]) == {"universal-trigger", "trigger-dominance", "mm-bd"}
    for evidence in detection["detectors"].values():
        assert (
            len(evidence["scores"])
            == len(evidence["statistic"])
            == len(evidence["details"]["robust_z"])
            == 10
        )
    # The target's universal trigger beats every other class's trigger; no clean class's does.
    dominance = detection["detectors"]["trigger-dominance"]["statistic"]
    assert dominance[0] > 0 > max(dominance[1:])
    validate(json.loads(json.dumps(result.to_dict())), "scan")


def test_does_not_flag_the_clean_fixture(scans) -> None:
    result = scans["clean"]
    assert result.verdict == VERDICT_NONE and result.suspected_target is None
    assert result.detection["p_value"] >= 0.01
    assert "p = " in result.detection["note"]  # the CLI prints the note: top class, index, p-value
    validate(json.loads(json.dumps(result.to_dict())), "scan")


def test_clean_index_is_below_the_backdoored_one(scans) -> None:
    assert scans["clean"].anomaly_index < scans["backdoor"].anomaly_index


@pytest.mark.parametrize(("name", "expected"), [("backdoor", EXIT_BACKDOOR_SUSPECTED), ("clean", 0)])
def test_cli_exit_status(name: str, expected: int, scans, tiny_backdoor, tiny_clean) -> None:
    """`hubdefend scan FOLDER --json` in a fresh process: exit 10 for the backdoor, 0 for the clean
    model, and the same seeded scores as in process."""
    folder = (tiny_backdoor if name == "backdoor" else tiny_clean).folder
    proc = subprocess.run(
        [sys.executable, "-m", "hubdefend", "scan", str(folder), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    )
    assert proc.returncode == expected, proc.stderr[-3000:]
    payload = json.loads(proc.stdout)
    validate(payload, "scan")
    assert payload["verdict"] == scans[name].verdict
    assert payload["detection"]["anomaly_index"] == pytest.approx(
        scans[name].detection["anomaly_index"], abs=1e-3
    )


# ---- with the defender's clean images (`scan --data`) -------------------------------------------
@pytest.fixture(scope="module")
def data_scans(tiny_backdoor, tiny_clean) -> dict:
    return {
        name: scan(str(fixture.folder), data="fmnist:test", progress=False)
        for name, fixture in (("backdoor", tiny_backdoor), ("clean", tiny_clean))
    }


def test_with_data_flags_the_backdoor_and_not_the_clean_model(data_scans, scans) -> None:
    flagged, clean = data_scans["backdoor"], data_scans["clean"]
    assert flagged.verdict == VERDICT_SUSPECTED and flagged.suspected_target == 0
    assert clean.verdict == VERDICT_NONE and clean.detection["p_value"] >= 0.01
    assert clean.anomaly_index < flagged.anomaly_index
    for result in (flagged, clean):
        detection = result.detection
        assert detection["method"] == "clean-data" and detection["images"] == 500
        assert set(detection["detectors"]) == {
            "universal-trigger", "trigger-dominance", "mm-bd", "neuron-collapse"
        }  # fmt: skip
        collapse = detection["detectors"]["neuron-collapse"]
        assert collapse["weight"] == 0  # reported beside the others, not in the verdict
        assert sum(collapse["details"]["counts_noisy"]) == sum(collapse["details"]["counts_clean"]) == 500
        validate(json.loads(json.dumps(result.to_dict())), "scan")
    # The clean images change the universal triggers: they are fitted on them as well.
    with_data = flagged.detection["detectors"]["universal-trigger"]["statistic"]
    assert with_data != scans["backdoor"].detection["detectors"]["universal-trigger"]["statistic"]


def test_detection_images_show_every_class_in_any_prefix(tiny_backdoor) -> None:
    images = detection_images(tiny_backdoor.test, seed=0)
    assert images.shape == (500, 3, 32, 32)
    # The same images in the same order, seed after seed; labels recovered by matching pixels.
    assert torch.equal(images, detection_images(tiny_backdoor.test, seed=0))
    pixels = torch.stack([tiny_backdoor.test[i][0] for i in range(len(tiny_backdoor.test))])
    labels = torch.tensor([tiny_backdoor.test[i][1] for i in range(len(tiny_backdoor.test))])
    first = [int(labels[(pixels == image).flatten(1).all(1)][0]) for image in images[:20]]
    assert first == list(range(10)) * 2
    small = torch.utils.data.Subset(tiny_backdoor.test, range(30))
    assert len(detection_images(small, seed=0)) == 30  # fewer than 500: all of them


def test_detectors_that_need_data_and_bad_images(tiny_backdoor) -> None:
    model, normalize = tiny_backdoor.model, tiny_backdoor.preprocessing.normalize
    with pytest.raises(DataError, match="need clean images"):
        detect_backdoor(model, normalize, 10, (3, 32, 32), detectors=(*CHEAP, NeuronCollapse()))
    with pytest.raises(DataError, match="images must be N x 3 x 32 x 32"):
        detect_backdoor(model, normalize, 10, (3, 32, 32), images=torch.rand(4, 1, 32, 32), detectors=CHEAP)
    with pytest.raises(DataError, match="Unknown detector"):
        detect_backdoor(model, normalize, 10, (3, 32, 32), detectors=("neural-cleanse",))


# ---- mechanics ----------------------------------------------------------------------------------
def test_seeded_and_leaves_the_model_as_it_was(tiny_backdoor) -> None:
    model = tiny_backdoor.model
    before = copy.deepcopy(model.state_dict())
    model.train()
    model.fc.weight.requires_grad_(False)
    shape = tiny_backdoor.preprocessing.input_size
    normalize = tiny_backdoor.preprocessing.normalize
    try:
        first = detect_backdoor(model, normalize, 10, shape, detectors=CHEAP, seed=3)
        second = detect_backdoor(model, normalize, 10, shape, detectors=CHEAP, seed=3)
        other = detect_backdoor(model, normalize, 10, shape, detectors=CHEAP, seed=4)
        assert model.training and all(m.training for m in model.modules())
        assert not model.fc.weight.requires_grad and model.fc.bias.requires_grad
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, before[name]), name
    finally:
        model.fc.weight.requires_grad_(True)
        model.eval()
    assert [d.scores for d in first.detectors] == [d.scores for d in second.detectors]
    assert first.anomaly_index == second.anomaly_index and first.p_value == second.p_value
    assert [d.scores for d in first.detectors] != [d.scores for d in other.detectors]
    # Each detector draws from its own stream: the order of the detectors does not matter.
    reordered = detect_backdoor(model, normalize, 10, shape, detectors=CHEAP[::-1], seed=3)
    assert {d.name: d.scores for d in reordered.detectors} == {d.name: d.scores for d in first.detectors}


def _tiny_transformers_vit(num_classes: int):
    from transformers import ViTConfig, ViTForImageClassification

    from tests.zoo import SMALL_TRANSFORMERS_CONFIGS

    torch.manual_seed(0)
    config = ViTConfig(**SMALL_TRANSFORMERS_CONFIGS["vit"], num_labels=num_classes)
    return ViTForImageClassification(config).eval()


def _tiny_timm_vit(num_classes: int):
    import timm

    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=num_classes).eval()


@pytest.mark.parametrize("build", [_tiny_transformers_vit, _tiny_timm_vit], ids=["transformers", "timm"])
def test_runs_on_tiny_vits(build) -> None:
    model = build(6)
    result = detect_backdoor(
        model, Preprocessing(input_size=(3, 32, 32)).normalize, 6, (3, 32, 32), detectors=CHEAP
    )
    assert len(result.anomaly_index) == 6 and 0 < result.p_value <= 1
    for output in result.detectors:
        assert len(output.scores) == 6 and all(math.isfinite(v) for v in output.scores)
    json.dumps(result.to_dict())


def test_too_few_classes_for_a_verdict() -> None:
    model = _tiny_transformers_vit(4)
    normalize = Preprocessing(input_size=(3, 32, 32)).normalize
    result = detect_backdoor(model, normalize, 4, (3, 32, 32), detectors=CHEAP)
    assert result.suspected_target is None and result.p_value == 1.0 and "too few" in result.note
    with pytest.raises(DataError, match="compares classes"):
        detect_backdoor(model, normalize, 2, (3, 32, 32), detectors=CHEAP)
    with pytest.raises(DataError, match="positive weight"):
        detect_backdoor(model, normalize, 4, (3, 32, 32), detectors=(MaxMargin(weight=0.0, steps=1),))
