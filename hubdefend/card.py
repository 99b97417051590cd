"""The model card of a cleaned model: the `Report` rendered through huggingface_hub's `ModelCard`
from the Jinja template in ``hubdefend.cards``.

The YAML front matter keeps BA and ASR as separate metrics: ``EvalResult``s that share task,
dataset, config and split merge into one model-index entry, so ASR rows get their own
``dataset_config`` (the trigger spec).
"""

from __future__ import annotations

import json
import shlex
from importlib.resources import files
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from hubdefend.planning import DEFAULT_BA_BUDGET
from hubdefend.report import Report

TEMPLATE = "model_card.md"
_KIND_TEXT = {
    "norm": "normalization channels",
    "mlp": "MLP hidden units",
    "head": "attention heads",
    "attn": "attention channels",
}


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.2f}%"


def _eval_results(report: Report, dataset_name: str) -> list[EvalResult]:
    results = []
    common = {"task_type": "image-classification", "dataset_type": dataset_name, "dataset_name": dataset_name}
    for stage, ba, asr in (
        ("before", report.ba_before, report.asr_before),
        ("after", report.ba_after, report.asr_after),
    ):
        if ba is not None:
            results.append(
                EvalResult(
                    **common,
                    dataset_split="test",
                    metric_type="accuracy",
                    metric_value=round(ba, 4),
                    metric_name=f"BA ({stage} {report.defense})",
                    dataset_config=f"clean-{stage}",
                )
            )
        if asr is not None:
            results.append(
                EvalResult(
                    **common,
                    dataset_split="test",
                    metric_type="attack_success_rate",
                    metric_value=round(asr, 4),
                    metric_name=f"ASR ({stage} {report.defense})",
                    dataset_config=f"{report.trigger}-{stage}",
                )
            )
    return results


def card_data(
    report: Report, *, source_id: str, library: str, license: str | None, dataset_name: str
) -> ModelCardData:
    tags = ["backdoor-defense", "hubdefend", report.defense, "pruned", "image-classification"]
    return ModelCardData(
        base_model=source_id,
        base_model_relation="finetune",  # the Hub has no "pruned" relation
        library_name=library,
        pipeline_tag="image-classification",
        license=license,
        tags=tags,
        model_name=f"{source_id.split('/')[-1]}-{report.defense}-cleaned",
        eval_results=_eval_results(report, dataset_name) or None,
    )


def _usage(library: str, repo_id: str) -> str:
    if library == "timm":
        return (
            "```python\nimport timm\n\n"
            f'model = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()\n```'
        )
    return (
        "```python\nfrom transformers import AutoImageProcessor, AutoModelForImageClassification\n\n"
        f'processor = AutoImageProcessor.from_pretrained("{repo_id}")\n'
        f'model = AutoModelForImageClassification.from_pretrained("{repo_id}")\n```'
    )


def reproduce_command(report: Report, source_id: str) -> str:
    parts = ["hubdefend", "sanitize", source_id]
    if not report.data.get("data_free"):
        parts += ["--data", report.data.get("spec") or "DATA"]
    parts += ["--defense", report.defense]
    if report.data.get("eval_spec"):
        parts += ["--eval-data", report.data["eval_spec"]]
    if report.trigger:
        parts += ["--trigger", report.trigger]
    for key, value in _changed_options(report).items():
        parts += ["-o", f"{key}={value}"]
    if report.operating_point.get("rule_requested", "auto") != "auto":
        parts += ["--prune", str(report.operating_point.get("value"))]
    if report.neuron_kinds:  # explicit: the default depends on the model
        parts += ["--kinds", ",".join(report.neuron_kinds)]
    budget = report.operating_point.get("ba_budget", DEFAULT_BA_BUDGET)
    if budget != DEFAULT_BA_BUDGET:
        parts += ["--ba-budget", str(budget)]
    parts += ["--seed", str(report.seed), "--out", "cleaned"]
    return shlex.join(parts)


def _changed_options(report: Report) -> dict:
    """The defense options that differ from its defaults: what the command must repeat."""
    from hubdefend.defenses import get_defense

    try:
        defaults = get_defense(report.defense).config_cls().to_dict()
    except Exception:  # a defense from a plug-in that is not installed here: repeat every option
        defaults = {}
    # Compared as JSON: a report read back from report.json holds lists where the config has tuples.
    return {
        k: v
        for k, v in report.options.items()
        if k not in defaults or json.dumps(defaults[k], default=list) != json.dumps(v, default=list)
    }


def render_card(
    report: Report,
    *,
    source_id: str | None = None,
    repo_id: str | None = None,
    license: str | None = None,
    dataset_name: str = "clean-eval",
) -> ModelCard:
    """Render the model card of a cleaned model from its report."""
    source_id = source_id or report.model.get("source") or "unknown"
    library = report.model.get("family", "timm")
    library = library if library in ("timm", "transformers") else "pytorch"
    data = card_data(report, source_id=source_id, library=library, license=license, dataset_name=dataset_name)
    kinds = ", ".join(_KIND_TEXT.get(k, k) for k in report.neuron_kinds)
    if report.asr_after is not None:
        verdict = (
            f"With the known trigger, ASR went from {_pct(report.asr_before)} to {_pct(report.asr_after)}."
        )
    elif report.reversed_asr_after is not None:
        verdict = (
            f"The trigger rebuilt from clean data went from {_pct(report.reversed_asr_before)} to "
            f"{_pct(report.reversed_asr_after)} success."
        )
    else:
        verdict = "No trigger was known or rebuilt, so the effect on the backdoor was not measured."
    template = files("hubdefend.cards").joinpath(TEMPLATE).read_text()
    context: dict[str, Any] = {
        "report": report,
        "title": f"{source_id.split('/')[-1]}, backdoor-cleaned with hubdefend ({report.defense})",
        "source_id": source_id,
        "neuron_kind_text": kinds,
        "verdict_text": verdict,
        "eval_text": f"{report.data.get('eval_images')} clean test images"
        if report.data.get("eval_images")
        else "",
        "options_text": json.dumps(report.options, sort_keys=True),
        "pruned_rows": sorted(report.pruned_per_layer.items(), key=lambda row: -row[1]),
        "usage": _usage(library, repo_id or "ORG/NAME"),
        "command": reproduce_command(report, source_id),
        "pct": _pct,
    }
    return ModelCard.from_template(data, template_str=template, **context)
