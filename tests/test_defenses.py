"""The defense engine on the tiny backdoored fixture: each defense at the automatic operating point
removes the backdoor at a small clean-accuracy cost; seeds make plans reproducible; bad input gets
clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hubdefend
from hubdefend.defenses import get_defense, list_defenses
from hubdefend.errors import DataError, DefenseError, UnknownDefenseError
from hubdefend.sanitize import sanitize

# Smaller than the papers' defaults so that CI stays fast; the benchmark runs the defaults.
FAST_OPTIONS = {
    "anp": {"iterations": 150, "batch_size": 64},
    "rnp": {"recovering_epochs": 10},
    "cnp": {"rounds": 2, "batches_per_round": 5, "inversion_epochs": 5},
}
# What the efficacy tests give each defense on the ResNet-18 fixture (still far below the papers').
# ANP is not here: at 150 or 300 of its 2000 iterations its ranking finds this backdoor for seed 0 but
# not for seeds 1 and 2 (the sweep's reversed-trigger success stays at 100%; see the issue note), so
# a CI assertion would hold by the choice of seed, not by the method.
EFFICACY_OPTIONS = {
    "rnp": {},  # its defaults: 20 recovery epochs on 500 images take seconds
    "cnp": {"rounds": 4, "batches_per_round": 10, "inversion_epochs": 10},
}


# The mask-learning defenses, whose operating point the engine chooses from clean data; the
# outlier-rule baselines (CLP, BNP) and the data-free defenses have their own test files.
MASK_DEFENSES = ("anp", "cnp", "rnp")


def run(fixture, defense: str, **kwargs):
    return sanitize(
        fixture.model,
        fixture.defender,
        defense=defense,
        trigger=fixture.trigger,
        eval_data=fixture.test,
        progress=False,
        **{**FAST_OPTIONS.get(defense, {}), **kwargs},
    )


@pytest.fixture(scope="module", params=MASK_DEFENSES)
def defended(request, tiny_backdoor):
    return request.param, run(tiny_backdoor, request.param)


def test_fixture_is_backdoored(tiny_backdoor, tiny_clean) -> None:
    assert tiny_backdoor.record["asr"] >= 0.9
    assert tiny_backdoor.record["ba"] >= 0.75
    assert tiny_clean.record["asr"] <= 0.1  # the same training without poisoning plants nothing


@pytest.mark.parametrize("defense", sorted(EFFICACY_OPTIONS))
def test_defense_removes_the_backdoor_at_the_automatic_point(resnet18_backdoor, defense: str) -> None:
    # The defender has 625 clean images (500 for the defense, 125 held out); the operating point is
    # chosen from them alone (reversed trigger + 2-point budget); the trigger and test set only measure.
    # RNP runs its published budget here: with the reference's train-mode recovery and final-mask
    # ranking it missed this backdoor (see RNP.deviations for what we changed and why).
    report = run(resnet18_backdoor, defense, **EFFICACY_OPTIONS[defense]).report
    assert report.asr_before >= 0.9
    assert report.asr_after <= 0.20, report.sweep
    assert report.ba_after >= report.ba_before - 0.05, report.sweep
    assert 0 < report.neurons_pruned <= 0.02 * report.neurons_total


def test_automatic_point_keeps_the_clean_budget(defended) -> None:
    # Efficacy on the narrow test_resnet is not expected (see the resnet18_backdoor fixture); what the
    # engine guarantees on any model, and this checks, is the clean-data rule itself.
    name, result = defended
    report = result.report
    assert report.asr_before >= 0.9
    assert (
        report.val_accuracy_after >= report.val_accuracy_before - report.operating_point["ba_budget"] - 1e-6
    )
    assert report.neurons_pruned == result.plan.num_pruned
    assert report.operating_point["rule"] == "reversed-trigger"
    assert report.suspected_target == 0  # neuron-noise target inference finds the BadNets target
    assert report.sweep and report.sweep[0]["neurons_pruned"] == 0
    counts = [p["neurons_pruned"] for p in report.sweep]
    assert counts == sorted(counts) and report.neurons_pruned in counts
    assert not hubdefend.is_masked(result.model)


def test_report_is_json_with_the_contract_fields(defended, tmp_path: Path) -> None:
    name, result = defended
    folder = result.save(tmp_path / "cleaned")
    payload = json.loads((folder / "report.json").read_text())
    for key in (
        "defense", "options", "neurons_total", "neurons_pruned", "pruned", "operating_point", "ba_before", "ba_after",
        "asr_before", "asr_after", "seconds", "peak_memory_mb", "hubdefend_version", "schema_version",
    ):  # fmt: skip
        assert key in payload, key
    assert payload["defense"] == name
    reloaded = hubdefend.load(folder)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(x), result.model(x))


def test_input_model_is_untouched(tiny_backdoor) -> None:
    before = {k: v.clone() for k, v in tiny_backdoor.model.state_dict().items()}
    run(tiny_backdoor, "rnp", prune=5)
    after = tiny_backdoor.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_same_seed_same_plan(tiny_backdoor) -> None:
    first = run(tiny_backdoor, "anp", seed=3, prune=10).plan.pruned
    second = run(tiny_backdoor, "anp", seed=3, prune=10).plan.pruned
    assert first == second and first


def test_prune_override(tiny_backdoor) -> None:
    result = run(tiny_backdoor, "rnp", prune=7)
    assert result.report.neurons_pruned == 7 and result.report.operating_point["rule"] == "count"
    result = run(tiny_backdoor, "rnp", prune=0.2)
    assert result.report.operating_point["rule"] == "threshold"


def test_rnp_unlearning_stops_at_its_threshold(tiny_backdoor) -> None:
    report = run(tiny_backdoor, "rnp", prune=1).report
    assert report.notes["unlearning_final_accuracy"] <= 0.20
    assert report.notes["unlearning_steps"] > 0


def test_rnp_reference_choices_run_and_bad_ones_are_refused(tiny_backdoor) -> None:
    # The reference's recovery (batch statistics) and ranking (final mask) stay one option away.
    reference = run(tiny_backdoor, "rnp", prune=3, recover_mode="train", rank_by="final", recovering_epochs=2)
    ours = run(tiny_backdoor, "rnp", prune=3, recovering_epochs=2)
    assert reference.report.options["rank_by"] == "final" and ours.report.options["rank_by"] == "mean"
    assert reference.report.neurons_pruned == ours.report.neurons_pruned == 3
    assert not torch.equal(
        torch.cat(list(reference.scores.values.values())), torch.cat(list(ours.scores.values.values()))
    )
    with pytest.raises(DefenseError, match="recover_mode 'eval' or 'train'"):
        run(tiny_backdoor, "rnp", recover_mode="batch")


def test_cnp_ignores_labels(tiny_backdoor) -> None:
    torch.manual_seed(0)
    shuffled = [(x, int(torch.randint(0, 10, ()))) for x, _ in tiny_backdoor.defender]
    plans = [
        sanitize(
            tiny_backdoor.model, data, defense="cnp", prune=10, progress=False, **FAST_OPTIONS["cnp"]
        ).plan
        for data in (tiny_backdoor.defender, shuffled)
    ]
    assert plans[0].pruned == plans[1].pruned and plans[0].num_pruned == 10


def test_bad_input(tiny_backdoor) -> None:
    with pytest.raises(UnknownDefenseError, match="Choose one of"):
        sanitize(tiny_backdoor.model, tiny_backdoor.defender, defense="nope")
    with pytest.raises(DataError, match="needs clean defender data"):
        sanitize(tiny_backdoor.model, None, defense="anp")
    with pytest.raises(DataError, match="at least"):
        sanitize(
            tiny_backdoor.model, torch.utils.data.Subset(tiny_backdoor.defender, range(5)), defense="anp"
        )
    with pytest.raises(DataError):
        sanitize(tiny_backdoor.model, [(x, 42) for x, _ in list(tiny_backdoor.defender)[:40]], defense="anp")
    with pytest.raises(DefenseError, match="no option"):
        sanitize(tiny_backdoor.model, tiny_backdoor.defender, defense="anp", nonsense=1)
    with pytest.raises(DefenseError, match="no head neurons; it has norm"):
        sanitize(tiny_backdoor.model, tiny_backdoor.defender, defense="anp", kinds=("head",))
    with pytest.raises(DefenseError, match="0.02 for 2 points"):
        sanitize(tiny_backdoor.model, tiny_backdoor.defender, defense="anp", ba_budget=2)
    broken = hubdefend.load(tiny_backdoor.folder).model
    next(broken.parameters()).data[0] = float("nan")
    with pytest.raises(DefenseError, match="NaN"):
        sanitize(broken, tiny_backdoor.defender, defense="anp")
    assert get_defense("anp").needs_data
    assert set(MASK_DEFENSES) < set(list_defenses())


def test_two_processes_end_with_identical_masks(tiny_backdoor, tmp_path: Path) -> None:
    options = json.dumps({"iterations": 20, "batch_size": 32})
    command = [
        # accelerate 1.15 runs ONE process for `--cpu --num_processes 2`; `--multi_gpu` on a machine without
        # GPUs starts two gloo CPU processes (the script builds Accelerator(cpu=True)).
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(Path(__file__).parent / "ddp_score.py"), str(tiny_backdoor.folder), str(tmp_path), "anp", options,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, timeout=600, env=env, cwd=Path(__file__).parent.parent)
    rank0 = torch.load(tmp_path / "masks-rank0.pt")
    rank1 = torch.load(tmp_path / "masks-rank1.pt")
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert any((v < 1).any() for v in rank0.values())  # the masks did train


@pytest.mark.parametrize("defense", MASK_DEFENSES)
def test_defenses_run_on_vit_mlp_units_and_attention_channels(tiny_backdoor, defense: str) -> None:
    # MLP units and attention channels have no shift (beta), so their xi perturbation takes no
    # gradient: the noise step must skip it rather than fail (it did, on the first real ViT). Both
    # kinds are the default.
    import timm

    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10
    )
    data = torch.utils.data.Subset(tiny_backdoor.defender, range(64))
    options = {"anp": {"iterations": 2, "batch_size": 32}, "rnp": {"recovering_epochs": 1}}.get(
        defense, {"rounds": 1, "batches_per_round": 1, "inversion_epochs": 1}
    )
    result = sanitize(vit, data, defense=defense, prune=3, progress=False, **options)
    assert result.report.neuron_kinds == ["mlp", "attn"] and result.report.neurons_pruned == 3


def test_transformers_vit_gets_its_units(tiny_backdoor) -> None:
    # transformers 5 renamed its ViT blocks (o_proj, fc1/fc2); the adapter once found no units there
    # and sanitize silently fell back to LayerNorm channels.
    from tests import zoo

    vit, _ = zoo.build_transformers("vit")
    data = torch.utils.data.Subset(tiny_backdoor.defender, range(64))
    result = sanitize(vit, data, defense="rnp", prune=3, progress=False, recovering_epochs=1)
    assert result.report.neuron_kinds == ["mlp", "attn"] and result.report.neurons_pruned == 3
    assert all(".attention.o_proj" in name or ".mlp.fc2" in name for name in result.report.pruned)
