"""`sanitize(model, data)`: the front door. Score neurons with a defense, choose how many to prune
from clean data only, bake the plan into a copy, measure, and report.

The input model is never changed: the defense works on a private copy, and the cleaned model is
another copy with the plan baked into plain weights.
"""

from __future__ import annotations

import copy
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

import hubdefend
from hubdefend.adapters import LoadedModel, adapter_for, available_kinds
from hubdefend.bake import PruningPlan, bake
from hubdefend.defenses import DefenseOutput, NeuronScores, data_free_defenses, few_shot_defenses, get_defense
from hubdefend.errors import DataError, DefenseError
from hubdefend.masks import NeuronMasks
from hubdefend.planning import (
    DEFAULT_BA_BUDGET,
    OperatingPoint,
    PruneRule,
    SweepPoint,
    candidate_counts,
    choose_operating_point,
    count_below,
    max_candidate,
    plan_by_count,
    protect_critical,
    sweep,
)
from hubdefend.report import Report
from hubdefend.training import logits_of, make_accelerator

MIN_DEFENDER_IMAGES = 20


@dataclass
class SanitizeResult:
    """What `sanitize` returns.

    Attributes:
        model: the cleaned copy (plan baked into plain weights, no hooks).
        scores: the defense's per-neuron scores.
        plan: the pruning plan that was baked.
        report: the `Report`.
        loaded: the source model with its family facts (for saving in the family layout).
        reversed_trigger: the trigger reversed from clean data, when there is one.
    """

    model: nn.Module
    scores: NeuronScores
    plan: PruningPlan
    report: Report
    loaded: LoadedModel
    reversed_trigger: Any = None

    def save(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write the cleaned model in its family layout plus ``report.json``."""
        folder = hubdefend.save(
            self.model, directory, image_processor=self.loaded.image_processor, overwrite=overwrite
        )
        self.report.save(folder / "report.json")
        return folder

    def card(self, *, repo_id: str | None = None, license: str | None = None):
        """The model card (a huggingface_hub ``ModelCard``), as `hubdefend scan` writes it."""
        from hubdefend.card import render_card

        return render_card(self.report, source_id=self.loaded.source, repo_id=repo_id, license=license)

    def push_to_hub(self, repo_id: str, *, create_pr: bool = False, private: bool = False):
        """Publish the cleaned model, its card, ``report.json`` and plots in ONE commit (or a pull
        request); refuses to overwrite the source repo without ``create_pr``. Returns a `PushResult`."""
        import tempfile

        from hubdefend.hub_push import check_push, push_folder
        from hubdefend.scan import write_outputs

        check_push(repo_id, create_pr=create_pr, source_repo=self.loaded.source)
        with tempfile.TemporaryDirectory(prefix="hubdefend-push-") as tmp:
            folder = write_outputs(
                self,
                Path(tmp) / "cleaned",
                source_id=self.loaded.source or "local model",
                repo_id=repo_id,
                license=None,
            )
            return push_folder(
                folder, repo_id, create_pr=create_pr, private=private, source_repo=self.loaded.source
            )


def _as_loaded(model: nn.Module | LoadedModel | str) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, (str, Path)):
        from hubdefend.sources import load

        return load(str(model))
    adapter = adapter_for(model)
    return LoadedModel(model, adapter.family, adapter.architecture(model), {})


def num_classes_of(model: nn.Module) -> int:
    """The number of classes a classifier predicts."""
    for attr in ("num_classes", "num_labels"):
        value = getattr(model, attr, None) or getattr(getattr(model, "config", None), attr, None)
        if isinstance(value, int) and value > 0:
            return value
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1].out_features
    raise DefenseError("Cannot tell how many classes this model predicts; pass num_classes=.")


def default_kinds(model: nn.Module) -> tuple[str, ...]:
    """Norm channels for CNNs; MLP hidden units and attention channels for transformers.

    Not a transformer's LayerNorm channels: each is one residual coordinate shared by every block.
    Attention channels as well as MLP units: on the ViT benchmark model a BadNets backdoor lives in
    the first block's attention, where even an oracle ranking needs 512 MLP units for ASR 32%
    (`benchmarks/oracle_pruning.py`). Channels rather than whole heads: the backdoor head costs 3.4
    BA points, more than the automatic point's budget, while RNP over MLP units and attention
    channels prunes 94 (most of them that head's) for ASR 7.2% at 1.0 point."""
    found = available_kinds(model) if _has_attention(model) else ()
    return tuple(kind for kind in ("mlp", "attn") if kind in found) or ("norm",)


def _has_attention(model: nn.Module) -> bool:
    return any(hasattr(m, "num_heads") or hasattr(m, "num_attention_heads") for m in model.modules())


def _check_finite(model: nn.Module) -> None:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise DefenseError(
                f"The model's {name} holds NaN or infinite values, so no defense can be measured on it. "
                "Check the checkpoint; re-download or re-save it."
            )


class _Evaluator:
    """Batched predictions of one model under masks that stand for a pruning plan: every sweep
    point is measured on the same model with hooks, with no copy per point."""

    def __init__(
        self, model: nn.Module, groups, normalize, accelerator: Accelerator, batch_size: int = 256
    ) -> None:
        self.model = model.eval()
        self.masks = NeuronMasks(groups)
        self.index = {g.name: i for i, g in enumerate(groups)}
        self.normalize = normalize
        self.device = accelerator.device
        self.accelerator = accelerator
        self.batch_size = batch_size
        self.model.to(self.device)
        self.masks.to(self.device)

    @torch.no_grad()
    def set_plan(self, plan: PruningPlan) -> None:
        for mask in self.masks.mask:
            mask.fill_(1.0)
        for name, indices in plan.pruned.items():
            self.masks.mask[self.index[name]][indices] = 0.0

    @torch.no_grad()
    def logits(self, pixels: torch.Tensor, transform=None) -> torch.Tensor:
        out = []
        for start in range(0, len(pixels), self.batch_size):
            x = pixels[start : start + self.batch_size].to(self.device)
            if transform is not None:
                x = transform(x)
            with self.accelerator.autocast():
                out.append(logits_of(self.model(self.normalize(x))).float().cpu())
        return torch.cat(out) if out else torch.empty(0)

    def predict(self, pixels: torch.Tensor, transform=None) -> torch.Tensor:
        return self.logits(pixels, transform).argmax(1) if len(pixels) else torch.empty(0, dtype=torch.long)


def _expected_accuracy(predictions: torch.Tensor, reference_probs: torch.Tensor) -> float:
    """Accuracy estimated without labels: the probability the unpruned model gives each answer."""
    return reference_probs[torch.arange(len(predictions)), predictions].mean().item()


def _asr(predictions: torch.Tensor, labels: torch.Tensor, target: int) -> float | None:
    keep = labels != target  # the field's convention: only images whose true class is not the target
    return None if keep.sum() == 0 else (predictions[keep] == target).float().mean().item()


def sanitize(
    model: nn.Module | LoadedModel | str,
    data=None,
    defense: str = "anp",
    trigger=None,
    eval_data=None,
    prune: str | float | int = "auto",
    seed: int = 0,
    accelerator: Accelerator | None = None,
    *,
    preprocessing=None,
    kinds: tuple[str, ...] | None = None,
    defender_size: int | float | None = None,
    ba_budget: float = DEFAULT_BA_BUDGET,
    eval_sweep: bool = False,
    mixed_precision: str | None = None,
    progress: bool = True,
    **options: Any,
) -> SanitizeResult:
    """Find and prune a model's backdoor neurons with clean data only.

    Args:
        model: a timm / transformers / torch model, a `LoadedModel`, or a source (folder, ``timm:NAME``).
        data: the defender's clean data: a Dataset or DataLoader of ``(pixels, label)`` pairs, or a
            data spec (``fmnist:train``, an image folder, ``hf:NAME``). 20% of it is held out as the
            clean validation split that chooses the operating point.
        defense: a registered defense name (`hubdefend.defenses.list_defenses`).
        trigger: the attack's trigger (spec string or object) when known, to measure ASR.
        eval_data: clean test data for BA (and ASR with ``trigger``); never used to choose.
        prune: ``"auto"``, a threshold in [0, 1) or a neuron count.
        seed: seeds the split, the defense and the sweep: same inputs, same plan.
        accelerator: an `accelerate.Accelerator`; built when not given.
        preprocessing: a `hubdefend.preprocess.Preprocessing`; read from the model when not given.
        kinds: neuron kinds to prune; default `default_kinds` (norm for CNNs, mlp and attn for transformers).
        defender_size: use only this many (int) or this fraction (float) of ``data`` for the defense.
        ba_budget: the clean accuracy the automatic point may spend (default 2 points). Label-free
            defenses estimate accuracy without labels (see `_expected_accuracy`).
        eval_sweep: also measure BA/ASR on ``eval_data`` at every sweep point (for benchmarks).
        mixed_precision: ``"bf16"`` or ``"fp16"`` when building the accelerator.
        **options: the defense's config fields (e.g. ``iterations=500`` for ANP).
    """
    from hubdefend.data import load_data, materialize, spec_of
    from hubdefend.preprocess import Preprocessing

    started = time.perf_counter()
    defense_cls = get_defense(defense)
    defense_obj = defense_cls(**options)
    rule = PruneRule.parse(prune)
    if not 0 <= ba_budget < 1:
        raise DefenseError(
            f"ba_budget={ba_budget} is not a fraction of clean accuracy: give one in [0, 1), e.g. 0.02 for 2 points."
        )
    loaded = _as_loaded(model)
    source_model = loaded.model
    _check_finite(source_model)
    # The groups name module paths, the same in the private copy made below.
    kinds = tuple(kinds or default_kinds(source_model))
    groups = [g for g in hubdefend.discover(source_model, kinds=kinds) if g.kind in kinds]
    if not groups:
        found = available_kinds(source_model)
        raise DefenseError(
            f"This model has no {' or '.join(kinds)} neurons; it has {', '.join(found) or 'none the adapters know'}: "
            "pass kinds= with those."
        )
    if preprocessing is None:
        preprocessing = Preprocessing.from_model(source_model, image_processor=loaded.image_processor)
    num_classes = num_classes_of(source_model)
    accelerator = make_accelerator(accelerator, mixed_precision=mixed_precision)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    if data is None and defense_cls.needs_data:
        raise DataError(
            f"The {defense} defense needs clean defender data (pass data=...). "
            f"Data-free defenses: {', '.join(data_free_defenses()) or 'none registered yet'}."
        )
    defender, val, val_x, val_y, check_x, check_y = (
        _nothing_held_out(None)  # a data-free defense with no data at all
        if data is None
        else _defender_data(data, preprocessing, defense_cls, num_classes, defender_size, seed)
    )

    # 1. Score neurons on a private copy.
    work = copy.deepcopy(source_model).eval()
    torch.manual_seed(seed)
    defense_started = time.perf_counter()
    output: DefenseOutput = defense_obj.score(
        work,
        groups,
        defender,
        normalize=preprocessing.normalize,
        num_classes=num_classes,
        accelerator=accelerator,
        seed=seed,
        progress=progress,
    )
    defense_seconds = time.perf_counter() - defense_started
    # A defense that changed weights (fine-tuning, unlearning) hands back its copy: the plan is
    # baked into it, and only the defense's own count fits those weights.
    base_model = output.model.eval() if output.model is not None else source_model
    del work
    own_rule = rule.kind == "auto" and (val is None or output.model is not None)
    if own_rule and output.own_count is None:
        raise DefenseError(
            f"The {defense} defense has no pruning rule of its own, so with no clean data nothing can choose "
            "how many neurons to prune: pass data=... or prune=COUNT."
        )

    # 2. A reversed trigger for the automatic operating point, when the defense did not make one.
    reversed_trigger, target = output.reversed_trigger, output.target
    if reversed_trigger is None and rule.kind == "auto" and not own_rule:
        reversed_trigger, target = _reverse_trigger(
            source_model, groups, defender, preprocessing, num_classes, accelerator, seed, progress
        )

    # 3. Sweep candidates on the original model with masks, choose, bake.
    evaluator = _Evaluator(copy.deepcopy(base_model), groups, preprocessing.normalize, accelerator)
    # "Before" is the model the user gave: a defense that changed weights is judged against it.
    source = (
        evaluator
        if output.model is None
        else _Evaluator(copy.deepcopy(source_model), groups, preprocessing.normalize, accelerator)
    )
    label_free = not defense_cls.needs_labels
    # Label-free defenses never see labels: clean accuracy is the EXPECTED accuracy under the unpruned
    # model's own predictive distribution (mean probability it gives to the pruned model's answer).
    # Plain agreement overstates the cost: on the ResNet-18 fixture, pruning CNP's backdoor neuron
    # changed 5.6% of predictions but cost 1.4 accuracy points; the expected accuracy fell 1.3.
    has_check = len(check_x) > 0
    reference_probs = torch.softmax(source.logits(check_x), 1) if label_free and has_check else None
    val_truth = source.predict(val_x) if label_free else val_y
    eval_x = eval_y = None
    trigger_obj = _parse_trigger(trigger)
    if eval_data is not None:
        eval_set = load_data(eval_data, preprocessing) if isinstance(eval_data, str) else eval_data
        eval_x, eval_y = materialize(eval_set)

    def measure(
        plan: PruningPlan, *, with_eval: bool, reversed: bool = True, on: _Evaluator = evaluator
    ) -> dict[str, float | None]:
        on.set_plan(plan)
        result: dict[str, float | None] = {"val_accuracy": None}
        if has_check:
            predictions = on.predict(check_x)
            result["val_accuracy"] = (
                _expected_accuracy(predictions, reference_probs)
                if label_free
                else (predictions == check_y).float().mean().item()
            )
        if reversed and reversed_trigger is not None:
            result["reversed_asr"] = _asr(on.predict(val_x, reversed_trigger.apply), val_truth, target)
        if with_eval and eval_x is not None:
            result["ba"] = (on.predict(eval_x) == eval_y).float().mean().item()
            if trigger_obj is not None:
                result["asr"] = _asr(on.predict(eval_x, trigger_obj.apply), eval_y, trigger_obj.target)
        return result

    scores, protected = output.scores, []
    with evaluator.masks.attached_to(evaluator.model):
        candidates = candidate_counts(scores)
        own = output.own_count
        if own_rule:
            candidates = _with_candidate(candidates, own, None)
        elif rule.kind == "auto":
            floor = measure(PruningPlan(), with_eval=False)["val_accuracy"] - ba_budget
            scores, protected, admitted = protect_critical(
                scores,
                lambda plan: measure(plan, with_eval=False, reversed=False)["val_accuracy"] >= floor - 1e-9,
                limit=max(max_candidate(scores), own or 0),
            )
            candidates = candidate_counts(scores, cap=admitted)
            if own is not None and own <= admitted:  # the defense's published point is a candidate too
                candidates = _with_candidate(candidates, own, None)
        elif rule.kind == "count":
            candidates = _with_candidate(candidates, min(rule.value, len(scores.ranked())), None)
        elif rule.kind == "threshold":
            candidates = _with_candidate(candidates, count_below(scores, rule.value), rule.value)
        points = sweep(scores, candidates, lambda plan: measure(plan, with_eval=eval_sweep))
        operating = (
            _own_operating_point(
                defense, output.own_count, data is None, few_shot=data is not None and val is None
            )
            if own_rule
            else _operating_point(rule, scores, points, ba_budget)
        )
        plan = plan_by_count(scores, operating.neurons_pruned)
        before = measure(PruningPlan(), with_eval=True, on=source)
        after = measure(plan, with_eval=True)
    cleaned = bake(base_model, plan, groups=groups)

    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else _process_peak_mb()
    report = Report(
        defense=defense,
        options=defense_obj.config.to_dict(),
        model={
            "family": loaded.family,
            "architecture": loaded.architecture,
            "source": loaded.source,
            "revision": loaded.revision,
        },
        data={
            "spec": spec_of(data),
            "eval_spec": spec_of(eval_data),
            "defender_images": 0 if defender is None else len(defender),
            "validation_images": 0 if val is None else len(val),
            "labels_used": defense_cls.needs_labels,
            "eval_images": None if eval_x is None else len(eval_x),
            "clean_data_only": True,
            "data_free": data is None,
        },
        weights_changed=output.model is not None,
        neuron_kinds=list(kinds),
        neurons_total=len(scores.ranked()),
        neurons_pruned=plan.num_pruned,
        protected={name: [i for n, i in protected if n == name] for name, _ in protected},
        pruned=plan.pruned,
        operating_point={
            **operating.to_dict(),
            "rule_requested": rule.kind,
            "value": rule.value,
            "ba_budget": ba_budget,
            "budget_measure": "none (no clean data)"
            if not has_check
            else "expected accuracy under the unpruned model's predictions (no labels)"
            if label_free
            else "clean accuracy",
        },
        ba_before=before.get("ba"),
        ba_after=after.get("ba"),
        asr_before=before.get("asr"),
        asr_after=after.get("asr"),
        trigger=None if trigger_obj is None else trigger_obj.to_spec(),
        val_accuracy_before=before["val_accuracy"],
        val_accuracy_after=after["val_accuracy"],
        reversed_asr_before=before.get("reversed_asr"),
        reversed_asr_after=after.get("reversed_asr"),
        suspected_target=target,
        deviations=list(defense_cls.deviations),
        notes=output.notes,
        sweep=[p.to_dict() for p in points],
        seconds=round(time.perf_counter() - started, 2),
        defense_seconds=round(defense_seconds, 2),
        peak_memory_mb=None if peak is None else round(peak, 1),
        seed=seed,
    )
    return SanitizeResult(cleaned, output.scores, plan, report, loaded, reversed_trigger)


def _defender_data(data, preprocessing, defense_cls, num_classes, defender_size, seed):
    """The defender images, the held-out validation split, and the images the budget is checked on."""
    from hubdefend.data import check_labels, defender_split, load_data, materialize

    dataset = load_data(data, preprocessing) if isinstance(data, str) else data
    if isinstance(dataset, torch.utils.data.DataLoader):
        dataset = dataset.dataset
    if len(dataset) < MIN_DEFENDER_IMAGES:
        if not defense_cls.few_shot:
            raise DataError(
                f"Only {len(dataset)} defender images: give at least {MIN_DEFENDER_IMAGES} (the references use "
                f"500), or use a few-shot defense: {', '.join(few_shot_defenses())}."
            )
        if len(dataset) == 0:
            raise DataError("The defender data is empty.")
        return _nothing_held_out(dataset)  # too few to hold any out: the defense's own rule chooses
    if defense_cls.needs_labels:
        check_labels(dataset, num_classes)
    if isinstance(defender_size, float):
        defender, val = defender_split(
            dataset, fraction=defender_size, seed=seed, labels_needed=defense_cls.needs_labels
        )
    else:
        defender, val = defender_split(
            dataset, n=defender_size, seed=seed, labels_needed=defense_cls.needs_labels
        )
    val_x, val_y = materialize(val)
    # The accuracy budget is checked on every clean image the defender has (the held-out split AND
    # the defender images): 125 held-out images alone move 0.8 points per image, as much noise as
    # the budget itself. The defense fits masks, never weights, on the defender images, so the bias
    # is small. The reversed trigger, which is fitted to the defender images, is judged on the
    # held-out split only.
    defender_x, defender_y = materialize(defender)
    return defender, val, val_x, val_y, torch.cat([val_x, defender_x]), torch.cat([val_y, defender_y])


def _nothing_held_out(defender):
    """`_defender_data`'s answer when no image can be held out: every image (or none) is the defender's,
    and nothing is left to check a budget or a reversed trigger with."""
    nothing, no_labels = torch.empty(0), torch.empty(0, dtype=torch.long)
    return defender, None, nothing, no_labels, nothing, no_labels


def _with_candidate(candidates, count: int, threshold: float | None) -> list[tuple[int, float | None]]:
    """The sweep's candidates plus the user's point (one entry per count)."""
    merged = dict(candidates)
    merged[count] = threshold if threshold is not None else merged.get(count)
    return sorted(merged.items())


def _own_operating_point(defense: str, count: int, data_free: bool, *, few_shot: bool) -> OperatingPoint:
    why = (
        "no clean data was given to choose with"
        if data_free
        else f"too few images to hold any out (fewer than {MIN_DEFENDER_IMAGES})"
        if few_shot
        else "it changed weights to fit that plan"
    )
    return OperatingPoint(count, "defense-rule", f"{count} neurons by {defense}'s own published rule ({why})")


def _operating_point(
    rule: PruneRule, scores: NeuronScores, points: list[SweepPoint], ba_budget: float
) -> OperatingPoint:
    if rule.kind == "count":
        count = min(int(rule.value), len(scores.ranked()))
        return OperatingPoint(count, "count", f"the {count} lowest-scored neurons, as asked")
    if rule.kind == "threshold":
        return OperatingPoint(
            count_below(scores, rule.value), "threshold", f"neurons scoring below {rule.value}, as asked"
        )
    return choose_operating_point(points, ba_budget=ba_budget)


def _parse_trigger(trigger):
    if trigger is None:
        return None
    from hubdefend.triggers import parse_trigger

    return parse_trigger(trigger)


def _reverse_trigger(model, groups, defender, preprocessing, num_classes, accelerator, seed, progress):
    """The suspected target, then a Neural Cleanse trigger for it, from clean data only.

    The target is the top class of `hubdefend.detect` on the defender's images (labels unused), with
    the neuron-noise collapse (`infer_target`, CNP's rule, used alone before) at weight 1 beside the
    two universal-trigger detectors. Each alone names a wrong target on one benchmark model: the
    collapse on the ViT (class counts under noise stay flat, growth <= 18 of 500 images), the
    trigger detectors on the test suite's ResNet-18 fixture (class 2); combined as robust z-scores
    they name class 0 on both and on ResNet-18 Blended. The collapse alone remains the rule below 3
    classes, which the detectors cannot compare."""
    from hubdefend.data import materialize
    from hubdefend.detect import NeuronCollapse, detect_backdoor
    from hubdefend.inversion import invert_trigger
    from hubdefend.target import infer_target

    work = copy.deepcopy(model).eval()
    if num_classes >= 3:
        collapse = NeuronCollapse(weight=1.0)
        target = detect_backdoor(
            work,
            preprocessing.normalize,
            num_classes,
            tuple(preprocessing.input_size),
            images=materialize(defender, limit=collapse.images)[0],
            detectors=("universal-trigger", "trigger-dominance", collapse),
            seed=seed,
            device=accelerator.device,
        ).top_class
    else:
        target = infer_target(
            work,
            groups,
            defender,
            normalize=preprocessing.normalize,
            num_classes=num_classes,
            accelerator=accelerator,
            seed=seed,
        ).target
    reversed_trigger = invert_trigger(
        work,
        defender,
        preprocessing.normalize,
        target,
        accelerator=accelerator,
        progress=progress,
        seed=seed,
    )
    return reversed_trigger, target


def _process_peak_mb() -> float | None:
    """Peak resident memory of this process (CPU runs): an upper bound on the defense's own."""
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return None if not usage or math.isnan(usage) else usage / 1024
