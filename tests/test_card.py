"""The card's reproduce command repeats exactly what the run changed."""

from __future__ import annotations

import json
import shlex

from hubdefend.card import reproduce_command
from hubdefend.defenses.rnp import RNPConfig
from hubdefend.report import Report


def _report(options: dict) -> Report:
    return Report(
        defense="rnp",
        options=options,
        model={},
        data={"spec": "fmnist:train", "eval_spec": "fmnist:test"},
        neuron_kinds=["norm"],
        neurons_total=10,
        neurons_pruned=1,
        pruned={"bn": [0]},
        operating_point={"rule_requested": "count", "value": 1, "ba_budget": 0.05},
        trigger="badnets:size=3,corner=br,target=0",
    )


def test_reproduce_command_repeats_changed_options_only() -> None:
    options = {**RNPConfig().to_dict(), "recovering_epochs": 5}
    # read back from report.json, tuples are lists: they must still count as defaults
    report = Report.from_dict(json.loads(_report(options).to_json()))
    argv = shlex.split(reproduce_command(report, "org/model"))
    assert argv[:3] == ["hubdefend", "sanitize", "org/model"]
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "-o"] == ["recovering_epochs=5"]
    for flag, value in (
        ("--data", "fmnist:train"),
        ("--eval-data", "fmnist:test"),
        ("--prune", "1"),
        ("--kinds", "norm"),
        ("--ba-budget", "0.05"),
    ):
        assert argv[argv.index(flag) + 1] == value
