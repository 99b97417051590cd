"""The shape every defense shares: (model, neuron groups, defender data or none) -> neuron scores.

Deciding is apart from applying, as in ``torch.nn.utils.prune``: a defense only scores neurons; a
pruning rule (`hubdefend.planning`) turns scores into a plan; `hubdefend.bake` writes it.
Convention: a LOWER score means more backdoor-related, so neurons are pruned lowest first (the
learned masks of ANP, RNP and CNP are such scores as they are).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from accelerate import Accelerator
from torch import nn

from hubdefend.errors import DefenseError
from hubdefend.neurons import NeuronGroup
from hubdefend.training import Normalize


@dataclass
class NeuronScores:
    """Per-neuron scores (lower = prune first), one 1-D tensor per group, in group order."""

    groups: list[NeuronGroup]
    values: dict[str, torch.Tensor]

    def ranked(self) -> list[tuple[str, int, float]]:
        """Every bakeable neuron as ``(group name, index, score)``, lowest score first.

        Ties keep module order, then index order, so the ranking is deterministic.
        """
        rows = []
        for group in self.groups:
            if not group.bakeable:
                continue
            for index, score in enumerate(self.values[group.name].tolist()):
                rows.append((group.name, index, float(score)))
        return sorted(rows, key=lambda row: row[2])  # sorted() is stable: ties keep module order

    def to_dict(self) -> dict[str, list[float]]:
        return {name: [round(v, 6) for v in tensor.tolist()] for name, tensor in self.values.items()}


@dataclass
class DefenseOutput:
    """What `Defense.score` returns: the scores, and what the defense learnt on the way.

    Attributes:
        scores: per-neuron scores.
        reversed_trigger: a `hubdefend.inversion.ReversedTrigger` when the defense reversed one.
        target: the class the defense believes is the backdoor target, when it inferred one.
        notes: facts for the report (e.g. RNP's unlearning epochs, ANP's final losses).
        own_count: how many of the lowest-scored neurons the defense's OWN published rule prunes
            (e.g. CLP's "mean + 3 std per layer"). It is the automatic operating point when there is
            no clean data to choose one with, and always for a defense that changed weights after
            pruning (`model`), whose weights only make sense with that plan.
        model: the defense's copy of the model when the defense changed WEIGHTS (MCLDef's
            fine-tuning, DBR-PU's unlearning); the plan is baked into it instead of the source.
    """

    scores: NeuronScores
    reversed_trigger: Any = None
    target: int | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    own_count: int | None = None
    model: nn.Module | None = None


@dataclass(frozen=True)
class DefenseConfig:
    """Base of every defense's config: its paper's defaults, stored verbatim in the report."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def layer_outliers(
    groups: list[NeuronGroup], values: dict[str, torch.Tensor], u: float, *, robust: bool = False
) -> tuple[NeuronScores, int]:
    """Scores and count for the "mean + u std per layer" rule of CLP, BNP and DBR-PU.

    ``values`` holds a suspicion per neuron (higher = more backdoor-like) for the groups that have
    one. The score is minus the neuron's z-score within its layer, so the rule's neurons are exactly
    the globally lowest ``count`` (score < -u); groups without values score 0 and are never pruned.
    ``robust``: the z-score is ``(v - median) / (1.4826 * MAD)`` instead.
    """
    scores = {}
    for group in groups:
        value = values.get(group.name)
        if value is None or value.numel() < 2:
            scores[group.name] = torch.zeros(group.num_neurons)
            continue
        value = value.detach().double().cpu()
        if robust:
            median = value.median()
            z = (value - median) / ((value - median).abs().median() * 1.4826).clamp_min(1e-12)
        else:
            z = (value - value.mean()) / value.std().clamp_min(1e-12)
        scores[group.name] = (-z).float()
    count = sum(int((scores[g.name] < -u).sum()) for g in groups if g.bakeable)
    return NeuronScores(groups, scores), count


class Defense:
    """A backdoor defense. Subclasses set the class attributes and implement `score`."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[DefenseConfig]] = DefenseConfig
    needs_data: ClassVar[bool] = True
    needs_labels: ClassVar[bool] = True
    # Works from a handful of images (fewer than sanitize's MIN_DEFENDER_IMAGES): they all go to the
    # defense, none is held out, and its own rule is the operating point.
    few_shot: ClassVar[bool] = False
    # Deviations from the reference implementation, named for the report.
    deviations: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: DefenseConfig | None = None, **options: Any) -> None:
        known = set(self.config_cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise DefenseError(
                f"{self.name} has no option(s) {', '.join(unknown)}. Its options: {', '.join(sorted(known))}."
            )
        if config is None:
            config = self.config_cls(**options)
        elif options:
            config = type(config)(**{**config.to_dict(), **options})
        self.config = config

    def score(
        self,
        model: nn.Module,
        groups: list[NeuronGroup],
        data,
        *,
        normalize: Normalize,
        num_classes: int,
        accelerator: Accelerator,
        seed: int = 0,
        progress: bool = True,
    ) -> DefenseOutput:
        """Score every neuron of ``groups``. ``model`` is a private copy the defense may change."""
        raise NotImplementedError
