"""`hubdefend scan`: is this model backdoored, and if so, clean it and publish the result.

Detection is `hubdefend.detect`: a universal trigger per class, whether it dominates the other
classes' triggers, and MM-BD's maximum-margin statistic; each class is compared with the model's
other classes and a backdoor is suspected when the top class's p-value, corrected for the maximum
over K classes, is below 0.01. Without data the triggers are fitted on neutral images; with clean
data (``--data``; up to `DETECTION_IMAGES`, stratified over classes, labels unused) on those as
well, and ANP's neuron-noise collapse test is reported beside them. With a defense, an output
folder or a push target scan also sanitizes and writes the cleaned model, its card,
``report.json`` and plots.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import hubdefend
from hubdefend.report import SCHEMA_VERSION

VERDICT_SUSPECTED = "backdoor_suspected"
VERDICT_NONE = "no_evidence"
DETECTION_IMAGES = 500


@dataclass
class ScanResult:
    """Everything `scan` found and did; ``to_dict()`` is the ``--json`` output and ``report.json``."""

    source: dict[str, Any]
    model: dict[str, Any]
    verdict: str = VERDICT_NONE
    suspected_target: int | None = None
    anomaly_index: float | None = None
    detection: dict[str, Any] = field(default_factory=dict)
    sanitize: dict[str, Any] | None = None
    pushed: dict[str, Any] | None = None
    out: str | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        payload = dict(self.sanitize or {})
        payload.update(
            {
                "source": self.source,
                "model_facts": self.model,
                "verdict": self.verdict,
                "suspected_target": self.suspected_target,
                "anomaly_index": self.anomaly_index,
                "detection": self.detection,
                "pushed": self.pushed,
                "out": self.out,
                "warnings": self.warnings,
                "hubdefend_version": hubdefend.__version__,
                "schema_version": SCHEMA_VERSION,
            }
        )
        return payload


def _facts(loaded) -> dict[str, Any]:
    groups = hubdefend.discover(loaded.model)
    return {
        "family": loaded.family,
        "architecture": loaded.architecture,
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "norm_layers": len(groups),
        "neurons": sum(g.num_neurons for g in groups),
    }


def detection_images(dataset, seed: int, limit: int = DETECTION_IMAGES) -> torch.Tensor:
    """Up to ``limit`` clean images of ``dataset``, stratified over its classes and in round-robin
    class order, so that any prefix (the universal triggers take the first few) shows every class."""
    from hubdefend.data import defender_split, materialize

    if len(dataset) > limit:
        dataset, _ = defender_split(dataset, n=limit, val_fraction=0.0, seed=seed)
    pixels, labels = materialize(dataset)
    rank = torch.empty_like(labels)
    for label in labels.unique():
        where = (labels == label).nonzero().squeeze(1)
        rank[where] = torch.arange(len(where))
    return pixels[torch.argsort(rank * (int(labels.max()) + 1) + labels)]


def _load_clean(loaded, data: str):
    """The clean dataset ``data`` names, preprocessed for the loaded model, and that preprocessing."""
    from hubdefend.data import load_data
    from hubdefend.preprocess import Preprocessing

    preprocessing = Preprocessing.from_model(loaded.model, image_processor=loaded.image_processor)
    return load_data(data, preprocessing), preprocessing


def _detect(loaded, seed: int, clean, preprocessing=None) -> dict[str, Any]:
    """`hubdefend.detect.detect_backdoor` on the loaded model (with the ``clean`` dataset's images
    and their ``preprocessing`` when given); a note instead when it cannot run."""
    from hubdefend.detect import detect_backdoor
    from hubdefend.errors import HubDefendError
    from hubdefend.preprocess import Preprocessing
    from hubdefend.sanitize import num_classes_of

    hint = "" if clean is None else " (with --data)"
    try:
        if preprocessing is None:
            preprocessing = Preprocessing.from_model(loaded.model, image_processor=loaded.image_processor)
        num_classes = num_classes_of(loaded.model)
    except HubDefendError as error:
        return {"method": None, "note": f"No detector ran{hint}: {error}"}
    if num_classes < 3:
        return {
            "method": None,
            "note": f"No detector ran: {num_classes} classes are too few to compare with each other.",
        }
    images = None if clean is None else detection_images(clean, seed)
    found = detect_backdoor(
        loaded.model,
        preprocessing.normalize,
        num_classes,
        tuple(preprocessing.input_size),
        images=images,
        seed=seed,
    )
    detection = found.to_dict()
    if not found.suspected and "note" not in detection:
        detection["note"] = (
            f"{found.method}: top class {found.top_class}, anomaly index {max(found.anomaly_index):.2f}, "
            f"p = {found.p_value:.2g} (flags at p < {found.alpha})"
            + ("; --data fits the triggers on clean images too" if clean is None else "")
        )
    return detection


def scan(
    source: str,
    *,
    data: str | None = None,
    defense: str | None = None,
    trigger: str | None = None,
    eval_data: str | None = None,
    out: str | Path | None = None,
    push: str | None = None,
    pr: bool = False,
    private: bool = False,
    allow_pickle: bool = False,
    seed: int = 0,
    progress: bool = True,
    **options: Any,
) -> ScanResult:
    """Scan ``source`` (Hub id, folder or ``timm:NAME``); see the module docstring."""
    from hubdefend.errors import DataError
    from hubdefend.sources import load

    if data is None and (push or out is not None or defense):
        raise DataError(
            "Cleaning a model (--defense, --out, --push, --pr) needs clean images: pass --data with a few hundred "
            "clean, labelled images."
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load(source, allow_pickle=allow_pickle)
    result = ScanResult(
        source={"id": loaded.source or source, "revision": loaded.revision},
        model=_facts(loaded),
        warnings=[str(w.message) for w in caught],
    )
    if push:  # refuse before any work: a push onto the scanned repo, no token
        from hubdefend.hub_push import check_push

        check_push(push, create_pr=pr, source_repo=loaded.source)
    # Loaded once: the detectors and the defense take their images from the same dataset.
    clean, preprocessing = (None, None) if data is None else _load_clean(loaded, data)
    result.detection = _detect(loaded, seed, clean, preprocessing)
    if result.detection["method"] is not None:
        result.suspected_target = result.detection["suspected_target"]
        result.anomaly_index = max(result.detection["anomaly_index"])
        result.verdict = VERDICT_SUSPECTED if result.suspected_target is not None else VERDICT_NONE
    if data is None or (defense is None and out is None and push is None):
        return result

    from hubdefend.sanitize import sanitize

    cleaned = sanitize(
        loaded,
        clean,
        defense=defense or "anp",
        trigger=trigger,
        eval_data=eval_data,
        seed=seed,
        preprocessing=preprocessing,
        progress=progress,
        **options,
    )
    result.sanitize = cleaned.report.to_dict()
    folder = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="hubdefend-scan-")) / "cleaned"
    write_outputs(
        cleaned, folder, source_id=result.source["id"], repo_id=push, license=loaded.extra.get("license")
    )
    result.out = str(folder)
    if push:
        from hubdefend.hub_push import push_folder

        pushed = push_folder(folder, push, create_pr=pr, private=private, source_repo=loaded.source)
        result.pushed = pushed.to_dict()
    return result


def write_outputs(cleaned, folder: Path, *, source_id: str, repo_id: str | None, license: str | None) -> Path:
    """Cleaned model in its family layout, ``README.md`` (the card), ``report.json`` and plots."""
    from hubdefend.card import render_card
    from hubdefend.plots import plot_report

    folder = cleaned.save(folder)
    card = render_card(cleaned.report, source_id=source_id, repo_id=repo_id, license=license)
    card.save(folder / "README.md")
    plot_report(cleaned.report, cleaned.scores.to_dict(), folder)
    return folder
