"""Write a pruning plan into a model's weights: no hooks afterwards, same state_dict keys.

For a norm neuron, pruning sets its effective scale to 0 (``gamma = -gamma_offset``), keeping the
shift unless ``zero_beta`` is asked for; this is what the reference defenses do, and it equals the
hooked model with that mask at 0. For ``mlp``, ``head`` and ``attn`` units it zeroes the matching input
columns of the output projection, so the model still loads in stock timm / transformers.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from hubdefend.errors import MaskError, PlanError
from hubdefend.masks import is_masked
from hubdefend.neurons import NEURON_KINDS, NeuronGroup


@dataclass
class PruningPlan:
    """Which neurons to prune: group name -> sorted neuron indices.

    Attributes:
        pruned: group name -> neuron indices to prune.
        zero_beta: also zero the shift of pruned norm neurons (off by default, as in ANP/RNP/CNP).
    """

    pruned: dict[str, list[int]] = field(default_factory=dict)
    zero_beta: bool = False

    @classmethod
    def coerce(
        cls, plan: PruningPlan | Mapping[str, Iterable[int]], *, zero_beta: bool | None = None
    ) -> PruningPlan:
        """Accept a plan or a plain ``{group name: [indices]}`` dict."""
        if isinstance(plan, PruningPlan):
            result = cls(dict(plan.pruned), plan.zero_beta)
        elif isinstance(plan, Mapping):
            result = cls({str(k): sorted({int(i) for i in v}) for k, v in plan.items()})
        else:
            raise PlanError(
                f"A pruning plan must be a PruningPlan or a dict {{group name: [neuron indices]}}, "
                f"not {type(plan).__name__}."
            )
        if zero_beta is not None:
            result.zero_beta = zero_beta
        result.pruned = {k: v for k, v in result.pruned.items() if v}
        return result

    @property
    def num_pruned(self) -> int:
        return sum(len(v) for v in self.pruned.values())

    def to_dict(self) -> dict:
        return {"pruned": self.pruned, "zero_beta": self.zero_beta}


def _check_plan(plan: PruningPlan, groups: Sequence[NeuronGroup]) -> dict[str, NeuronGroup]:
    by_name: dict[str, list[NeuronGroup]] = {}
    for group in groups:
        by_name.setdefault(group.name, []).append(group)
    for name, indices in plan.pruned.items():
        if name not in by_name:
            known = ", ".join(list(by_name)[:5])
            raise PlanError(
                f"The plan names layer {name!r}, which is not a neuron group of this model "
                f"(e.g. {known}, ...). Build the plan from discover(model) of the same model."
            )
        if len(by_name[name]) > 1:
            kinds = " and ".join(g.kind for g in by_name[name])
            raise PlanError(
                f"{name!r} holds {kinds} neurons, and the plan does not say which it prunes: pass "
                "groups=discover(model, kinds=...) with the kinds the plan was made for."
            )
        group = by_name[name][0]
        bad = [i for i in indices if not 0 <= i < group.num_neurons]
        if bad:
            raise PlanError(
                f"The plan prunes neurons {bad[:5]} of {name!r}, which has only {group.num_neurons} neurons "
                f"(valid indices 0..{group.num_neurons - 1})."
            )
        if not group.bakeable:
            raise PlanError(
                f"{name!r} ({group.layer_type}) has no affine weight, so pruning it cannot be written into "
                "the model's weights. Leave this layer out of the plan."
            )
    return {name: candidates[0] for name, candidates in by_name.items()}


@torch.no_grad()
def bake(
    model: nn.Module,
    plan: PruningPlan | Mapping[str, Iterable[int]],
    *,
    groups: Sequence[NeuronGroup] | None = None,
    zero_beta: bool | None = None,
    inplace: bool = False,
) -> nn.Module:
    """Prune the plan's neurons into the weights of ``model``.

    Args:
        model: a model without hubdefend hooks (detach masks first).
        plan: a `PruningPlan` or ``{group name: [neuron indices]}``.
        groups: the model's neuron groups, as the plan was made from; discovered (all kinds) when
            not given. Needed for a plan over ``head`` or ``attn`` neurons, which share their layer.
        zero_beta: override the plan's ``zero_beta``.
        inplace: write into ``model`` itself instead of a deep copy.

    Returns:
        The pruned model (a copy unless ``inplace``), with the same state_dict keys.

    Raises:
        MaskError: the model still carries mask hooks.
        PlanError: the plan names layers or neurons the model does not have, or a layer without an
            affine weight. Nothing is changed then.
    """
    if is_masked(model):
        raise MaskError("The model still carries hubdefend mask hooks: detach the masks before baking.")
    plan = PruningPlan.coerce(plan, zero_beta=zero_beta)
    if groups is None:
        from hubdefend.adapters import discover  # late import: adapters build on this module

        groups = [group for kind in NEURON_KINDS for group in discover(model, kinds=(kind,))]
    by_name = _check_plan(plan, groups)  # all checks before the first write: all or nothing
    target = model if inplace else copy.deepcopy(model)
    for name, indices in plan.pruned.items():
        group = by_name[name]
        layer = target.get_submodule(name)
        index = torch.as_tensor(indices, dtype=torch.long)
        if group.kind == "norm":
            getattr(layer, group.gamma)[index] = -group.gamma_offset
            if plan.zero_beta and group.beta is not None:
                getattr(layer, group.beta)[index] = 0.0
        else:  # mlp units, heads and attention channels: zero the projection's input columns
            columns = (index[:, None] * group.neuron_width + torch.arange(group.neuron_width)).flatten()
            getattr(layer, group.gamma)[:, columns] = 0.0
    return target
