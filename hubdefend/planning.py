"""Pruning rules: turn neuron scores into a plan, sweep them, and choose the operating point from
clean data only.

The references print a sweep and leave the choice to the user, or pick it with test ASR, which no
defender has. `choose_operating_point` uses only what a defender has: the clean validation split
(accuracy may fall by at most ``ba_budget``) and, when a trigger was reversed from clean data, that
reversed trigger's success on the held-out clean images. All rules are deterministic: the ranking
breaks ties by module order, then neuron index.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from hubdefend.bake import PruningPlan
from hubdefend.defenses.base import NeuronScores
from hubdefend.errors import PlanError

REFERENCE_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 19))  # the references sweep 0.05..0.9
NEURON_FRACTIONS = (0.0025, 0.005, 0.01, 0.02, 0.03, 0.05)  # CNP's operating point is about 1%
# Below the fractions: a backdoor that sits in a handful of channels (RNP on the ResNet-18 BadNets
# benchmark model: the first fraction, 12 of 4800, already costs 2.5 BA points; 4 do the job).
NEURON_COUNTS = (1, 2, 4, 8)
DEFAULT_BA_BUDGET = 0.02
REVERSED_ASR_SLACK = 0.05


@dataclass(frozen=True)
class PruneRule:
    """How many neurons to prune: ``auto``, a ``threshold`` on scores, or a ``count``."""

    kind: str
    value: float | int | None = None

    @classmethod
    def parse(cls, prune: str | float | int) -> PruneRule:
        """``"auto"``; a float in [0, 1) is a threshold (prune scores below it); an int >= 0 is a
        count of the lowest-scored neurons. Strings are parsed the same way (``"0.2"``, ``"48"``)."""
        if isinstance(prune, str):
            text = prune.strip().lower()
            if text == "auto":
                return cls("auto")
            try:
                prune = int(text) if text.isdigit() else float(text)
            except ValueError:
                raise PlanError(
                    f"--prune {prune!r}: give 'auto', a threshold such as 0.2, or a count such as 48."
                ) from None
        if isinstance(prune, bool):
            raise PlanError("prune must be 'auto', a threshold in [0, 1) or a neuron count, not a bool.")
        if isinstance(prune, int):
            if prune < 0:
                raise PlanError(f"prune={prune}: a neuron count cannot be negative.")
            return cls("count", prune)
        if isinstance(prune, float) and 0.0 <= prune < 1.0:
            return cls("threshold", prune)
        raise PlanError(
            f"prune={prune!r}: give 'auto', a threshold in [0, 1) (e.g. 0.2) or a count (e.g. 48)."
        )


def plan_by_count(scores: NeuronScores, count: int) -> PruningPlan:
    """The ``count`` lowest-scored neurons."""
    return _plan_of(scores.ranked()[:count])


def _plan_of(rows: list[tuple[str, int, float]]) -> PruningPlan:
    pruned: dict[str, list[int]] = {}
    for name, index, _ in rows:
        pruned.setdefault(name, []).append(index)
    return PruningPlan({name: sorted(indices) for name, indices in pruned.items()})


def protect_critical(
    scores: NeuronScores,
    keeps_accuracy: Callable[[PruningPlan], bool],
    *,
    limit: int,
    max_protected: int = 16,
) -> tuple[NeuronScores, list[tuple[str, int]], int]:
    """Walk the ranking lowest first and protect the neurons clean data cannot spare.

    Our addition to every reference: a defense's lowest scores sometimes include a neuron that
    clean behaviour depends on (a stem channel, a narrow layer), and pruning it costs tens of
    accuracy points, so every threshold past it is useless. Here neurons join the plan in chunks
    of doubling size; a chunk that breaks ``keeps_accuracy`` is bisected, and each single neuron
    that breaks it alone is protected (its score becomes +inf, so it ranks last) instead of ending
    the walk. The walk covers the ``limit`` lowest neurons and stops after ``max_protected``
    protections (the accuracy budget is spent by then). Costs about log2(limit) evaluations plus
    log2(chunk) per protected neuron.

    Returns the scores with protected neurons at +inf, the protected ``(group, index)`` pairs,
    and how many neurons the walk admitted (the candidates beyond it were never checked).
    """
    ranked = scores.ranked()[:limit]
    kept: list[tuple[str, int, float]] = []
    protected: list[tuple[str, int]] = []

    def admit(rows: list[tuple[str, int, float]]) -> None:
        if not rows or len(protected) >= max_protected:
            return
        if keeps_accuracy(_plan_of(kept + rows)):
            kept.extend(rows)
        elif len(rows) == 1:
            protected.append(rows[0][:2])
        else:
            admit(rows[: len(rows) // 2])
            admit(rows[len(rows) // 2 :])

    start, size = 0, 1
    while start < len(ranked) and len(protected) < max_protected:
        admit(ranked[start : start + size])
        start, size = start + size, size * 2
    values = {name: tensor.clone().float() for name, tensor in scores.values.items()}
    for name, index in protected:
        values[name][index] = float("inf")
    return NeuronScores(scores.groups, values), protected, len(kept)


def count_below(scores: NeuronScores, threshold: float) -> int:
    """How many neurons score strictly below ``threshold`` (the references' rule: mask < t)."""
    return sum(1 for _, _, score in scores.ranked() if score < threshold)


def plan_by_threshold(scores: NeuronScores, threshold: float) -> PruningPlan:
    return plan_by_count(scores, count_below(scores, threshold))


@dataclass
class SweepPoint:
    """One candidate operating point and what clean data says about it."""

    neurons_pruned: int
    threshold: float | None  # the reference threshold that gives this count, when one does
    val_accuracy: float | None  # on all the defender's clean images (held-out + defender); None: no data
    reversed_asr: float | None = None
    # Measured with the real trigger for the report only, never used to choose.
    ba: float | None = None
    asr: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def max_candidate(scores: NeuronScores, max_fraction: float = 0.1) -> int:
    """The most neurons any automatic point prunes: ``max_fraction`` of them (more is never a small
    BA cost)."""
    return max(1, int(len(scores.ranked()) * max_fraction))


def candidate_counts(
    scores: NeuronScores, *, max_fraction: float = 0.1, cap: int | None = None
) -> list[tuple[int, float | None]]:
    """Candidate prune counts: the reference threshold sweep, plus a few small counts and fixed
    fractions of all neurons; each once, capped at ``max_fraction`` of the neurons or at ``cap``."""
    total = len(scores.ranked())
    cap = min(max_candidate(scores, max_fraction), cap if cap is not None else total)
    candidates: dict[int, float | None] = {0: None}
    for threshold in REFERENCE_THRESHOLDS:
        count = count_below(scores, threshold)
        if count <= cap:
            candidates.setdefault(count, threshold)
    counts = [*NEURON_COUNTS, *(max(1, round(total * fraction)) for fraction in NEURON_FRACTIONS)]
    for count in counts:
        if count <= cap:
            candidates.setdefault(count, None)
    return sorted(candidates.items())


@torch.no_grad()
def sweep(
    scores: NeuronScores,
    candidates: list[tuple[int, float | None]],
    evaluate: Callable[[PruningPlan], dict[str, float | None]],
) -> list[SweepPoint]:
    """Evaluate each candidate count; ``evaluate(plan)`` returns ``val_accuracy`` and optionally
    ``reversed_asr``, ``ba`` and ``asr``."""
    points = []
    for count, threshold in candidates:
        measured = evaluate(plan_by_count(scores, count))
        points.append(SweepPoint(count, threshold, **measured))
    return points


@dataclass
class OperatingPoint:
    neurons_pruned: int
    rule: str
    explanation: str

    def to_dict(self) -> dict:
        return asdict(self)


def choose_operating_point(
    points: list[SweepPoint], *, ba_budget: float = DEFAULT_BA_BUDGET
) -> OperatingPoint:
    """Pick a point from clean data only.

    Within the accuracy budget (validation accuracy at most ``ba_budget`` below the unpruned
    model's): with a reversed trigger, the fewest neurons whose reversed-trigger success is within
    `REVERSED_ASR_SLACK` of the lowest any in-budget point reaches; without one, the reference
    threshold 0.2 if in budget, else the largest in-budget point below it.
    """
    base = next(p for p in points if p.neurons_pruned == 0)
    floor = base.val_accuracy - ba_budget
    allowed = [p for p in points if p.val_accuracy >= floor - 1e-9]
    budget_text = (
        f"clean accuracy on the defender's images at most {ba_budget * 100:.1f} points below the unpruned "
        f"{base.val_accuracy:.3f}"
    )
    if base.reversed_asr is not None:
        best = min(p.reversed_asr for p in allowed)
        chosen = min(
            (p for p in allowed if p.reversed_asr <= best + REVERSED_ASR_SLACK),
            key=lambda p: p.neurons_pruned,
        )
        return OperatingPoint(
            chosen.neurons_pruned,
            "reversed-trigger",
            f"fewest neurons whose reversed-trigger success on held-out clean images ({chosen.reversed_asr:.3f}) "
            f"is within {REVERSED_ASR_SLACK:.2f} of the lowest in budget ({best:.3f}), with {budget_text}",
        )
    at_reference = [p for p in allowed if p.threshold == 0.2]
    if at_reference:
        chosen = at_reference[0]
        return OperatingPoint(
            chosen.neurons_pruned, "threshold-0.2", f"the reference threshold 0.2, within {budget_text}"
        )
    below = [p for p in allowed if p.threshold is not None and p.threshold < 0.2] or [base]
    chosen = max(below, key=lambda p: p.neurons_pruned)
    return OperatingPoint(
        chosen.neurons_pruned,
        "threshold-in-budget",
        f"threshold 0.2 costs too much accuracy; the largest lower threshold with {budget_text}",
    )
