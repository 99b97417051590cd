"""Pruning rules and the clean-data operating point."""

from __future__ import annotations

import pytest
import torch

from hubdefend.defenses import NeuronScores
from hubdefend.errors import PlanError
from hubdefend.neurons import NeuronGroup
from hubdefend.planning import (
    PruneRule,
    SweepPoint,
    candidate_counts,
    choose_operating_point,
    count_below,
    plan_by_count,
    plan_by_threshold,
    protect_critical,
)


def _group(name: str, n: int, bakeable: bool = True) -> NeuronGroup:
    return NeuronGroup(name, "norm", "BatchNorm2d", n, 1, name, gamma="weight" if bakeable else None)


@pytest.fixture
def scores() -> NeuronScores:
    groups = [_group("a", 4), _group("b", 3), _group("c", 2, bakeable=False)]
    values = {
        "a": torch.tensor([0.9, 0.1, 0.5, 0.1]),
        "b": torch.tensor([0.05, 1.0, 0.3]),
        "c": torch.tensor([0.0, 0.0]),
    }
    return NeuronScores(groups, values)


def test_prune_rule_parsing() -> None:
    assert PruneRule.parse("auto") == PruneRule("auto")
    assert PruneRule.parse("0.2") == PruneRule("threshold", 0.2)
    assert PruneRule.parse(0.2) == PruneRule("threshold", 0.2)
    assert PruneRule.parse("48") == PruneRule("count", 48)
    assert PruneRule.parse(48) == PruneRule("count", 48)
    for bad in ("lots", 1.5, -3, True):
        with pytest.raises(PlanError):
            PruneRule.parse(bad)


def test_ranking_is_deterministic_and_skips_unbakeable(scores: NeuronScores) -> None:
    # lowest first; the tie at 0.1 keeps module order then index order; group c has no affine weight
    assert [(n, i) for n, i, _ in scores.ranked()] == [
        ("b", 0),
        ("a", 1),
        ("a", 3),
        ("b", 2),
        ("a", 2),
        ("a", 0),
        ("b", 1),
    ]
    assert plan_by_count(scores, 3).pruned == {"b": [0], "a": [1, 3]}
    assert plan_by_threshold(scores, 0.2).pruned == {"b": [0], "a": [1, 3]}
    assert count_below(scores, 0.1) == 1  # strict, as in the references (mask < t)


def test_candidates_are_unique_and_capped(scores: NeuronScores) -> None:
    counts = [c for c, _ in candidate_counts(scores, max_fraction=0.5)]
    assert counts == sorted(set(counts)) and counts[0] == 0 and max(counts) <= 3


def _points(rasr: list[float | None], acc: list[float]) -> list[SweepPoint]:
    return [
        SweepPoint(k, 0.2 if k == 2 else None, a, r) for k, (r, a) in enumerate(zip(rasr, acc, strict=True))
    ]


def test_reversed_trigger_rule_takes_fewest_neurons_near_the_floor() -> None:
    points = _points([0.99, 0.6, 0.08, 0.05, 0.04], [0.90, 0.90, 0.895, 0.89, 0.80])
    chosen = choose_operating_point(points, ba_budget=0.02)
    # k=4 is out of budget (10 points); the in-budget floor is 0.05, k=2 (0.08) is within slack
    assert chosen.neurons_pruned == 2 and chosen.rule == "reversed-trigger"


def test_without_a_reversed_trigger_the_reference_threshold_must_fit_the_budget() -> None:
    points = _points([None] * 4, [0.9, 0.9, 0.85, 0.84])
    chosen = choose_operating_point(points, ba_budget=0.02)
    assert chosen.rule == "threshold-in-budget" and chosen.neurons_pruned == 0
    points = _points([None] * 4, [0.9, 0.9, 0.89, 0.84])
    assert choose_operating_point(points, ba_budget=0.02).neurons_pruned == 2


def test_critical_neurons_are_protected_not_pruned(scores: NeuronScores) -> None:
    # ranking: b0, a1, a3, b2, a2, a0, b1; pretend pruning a1 (alone or with others) breaks accuracy
    def keeps_accuracy(plan) -> bool:
        return 1 not in plan.pruned.get("a", [])

    guarded, protected, admitted = protect_critical(scores, keeps_accuracy, limit=5)
    assert protected == [("a", 1)] and admitted == 4
    assert plan_by_count(guarded, 4).pruned == {"a": [2, 3], "b": [0, 2]}
    assert scores.values["a"][1] == 0.1  # the defense's own scores are not changed


def test_protection_stops_after_its_limit(scores: NeuronScores) -> None:
    guarded, protected, admitted = protect_critical(scores, lambda plan: False, limit=7, max_protected=2)
    assert len(protected) == 2 and admitted == 0
