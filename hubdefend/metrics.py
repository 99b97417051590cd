"""The field's evaluation conventions: BA, ASR, robust accuracy and per-class accuracy.

- BA (benign accuracy): top-1 accuracy on clean images.
- ASR (attack success rate): share of triggered images predicted as the target class, counted
  only over images whose true class is not the target (those would count as "successes" for free).
- Robust accuracy: share of the same non-target triggered images still predicted as their true class.

Triggers are applied to pixels in [0, 1], before the model's own normalisation. Evaluation runs
batched under Accelerate; predictions are gathered with ``gather_for_metrics`` so that several
processes count every image exactly once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset

from hubdefend.errors import DataError
from hubdefend.preprocess import Preprocessing

EVAL_BATCH_SIZE = 256


@dataclass
class Evaluation:
    """What `evaluate` measured.

    Attributes:
        ba: benign accuracy on the clean images.
        asr: attack success rate over the non-target images (None without a trigger).
        robust_accuracy: triggered non-target images still predicted as their true class (None
            without a trigger).
        per_class_accuracy: clean accuracy per class index (None for a class with no images).
        n_clean: clean images evaluated.
        n_triggered: triggered images that ASR and robust accuracy count (the non-target ones).
        target: the trigger's target class (None without a trigger).
    """

    ba: float
    asr: float | None
    robust_accuracy: float | None
    per_class_accuracy: list[float | None]
    n_clean: int
    n_triggered: int
    target: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def logits_of(output: Any) -> torch.Tensor:
    """Logits from a model output: a tensor, a transformers ``ImageClassifierOutput`` or a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is not None:
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise DataError(f"Cannot find logits in a model output of type {type(output).__name__}.")


def predict_logits(
    model: torch.nn.Module, pixels: torch.Tensor, preprocessing: Preprocessing
) -> torch.Tensor:
    """The model's logits for a batch of pixels in [0, 1] (normalised here with ``preprocessing``)."""
    return logits_of(model(preprocessing.normalize(pixels)))


def evaluate(
    model: torch.nn.Module,
    loader: DataLoader | Dataset,
    preprocessing: Preprocessing,
    *,
    trigger: Any = None,
    accelerator: Accelerator | None = None,
    progress: bool = True,
) -> Evaluation:
    """BA, and with a trigger ASR and robust accuracy, of ``model`` on ``loader``.

    Args:
        model: a classifier returning logits or a transformers output with ``.logits``.
        loader: a DataLoader (or Dataset) of ``(pixels in [0, 1], label)``.
        preprocessing: the model's preprocessing (its `Preprocessing.normalize` is applied here).
        trigger: any object with ``.apply(pixels) -> pixels`` and ``.target``; applied to every
            image, counted over the non-target ones.
        accelerator: an `accelerate.Accelerator`; built when not given.
        progress: show a progress bar (main process only).

    Returns:
        An `Evaluation`. The model's train/eval modes are restored; it stays on the accelerator's device.

    Raises:
        DataError: no images, or (with a trigger) no image outside the target class.
    """
    if trigger is not None and not (hasattr(trigger, "apply") and hasattr(trigger, "target")):
        raise DataError(
            f"A trigger needs .apply(pixels) and .target; got {type(trigger).__name__}. "
            "Parse a spec with hubdefend.triggers.parse_trigger."
        )
    if not isinstance(loader, DataLoader):
        from hubdefend.data import make_loader

        loader = make_loader(loader, batch_size=EVAL_BATCH_SIZE, shuffle=False)
    accelerator = accelerator or Accelerator()
    target = int(trigger.target) if trigger is not None else None
    modes = {module: module.training for module in model.modules()}
    model.to(accelerator.device)
    model.eval()
    prepared = accelerator.prepare(loader)
    labels_all: list[torch.Tensor] = []
    clean_all: list[torch.Tensor] = []
    triggered_all: list[torch.Tensor] = []
    num_classes = 0
    try:
        with torch.no_grad(), _progress(accelerator, progress) as bar:
            task = bar.add_task("evaluate", total=len(prepared))
            for pixels, labels in prepared:
                labels = torch.as_tensor(labels, device=pixels.device).long()
                with accelerator.autocast():
                    logits = predict_logits(model, pixels, preprocessing)
                    num_classes = max(num_classes, logits.shape[-1])
                    clean = logits.argmax(-1)
                    if trigger is not None:
                        triggered = predict_logits(model, trigger.apply(pixels), preprocessing).argmax(-1)
                # gather_for_metrics drops the samples a multi-process sampler repeats to even out batches.
                labels_all.append(accelerator.gather_for_metrics(labels).cpu())
                clean_all.append(accelerator.gather_for_metrics(clean).cpu())
                if trigger is not None:
                    triggered_all.append(accelerator.gather_for_metrics(triggered).cpu())
                bar.update(task, advance=1)
    finally:
        for module, mode in modes.items():
            module.training = mode
    if not labels_all:
        raise DataError("The evaluation data is empty: give at least one (image, label) pair.")
    labels, clean = torch.cat(labels_all), torch.cat(clean_all)
    return summarize(
        labels,
        clean,
        torch.cat(triggered_all) if trigger is not None else None,
        target=target,
        num_classes=num_classes,
    )


def summarize(
    labels: torch.Tensor,
    clean: torch.Tensor,
    triggered: torch.Tensor | None = None,
    *,
    target: int | None = None,
    num_classes: int | None = None,
) -> Evaluation:
    """Apply the conventions to predicted classes (the pure part of `evaluate`).

    Args:
        labels: true classes, shape ``N``.
        clean: predicted classes on clean images.
        triggered: predicted classes on triggered images (with ``target``), or None.
        target: the trigger's target class.
        num_classes: length of ``per_class_accuracy`` (default: one past the largest class seen).
    """
    labels, clean = labels.long().flatten(), clean.long().flatten()
    if len(labels) == 0:
        raise DataError("The evaluation data is empty: give at least one (image, label) pair.")
    classes = num_classes or int(max(labels.max().item(), clean.max().item())) + 1
    correct = clean == labels
    per_class: list[float | None] = []
    for c in range(classes):
        members = labels == c
        count = int(members.sum())
        per_class.append(float(correct[members].sum()) / count if count else None)
    asr = robust = None
    n_triggered = 0
    if triggered is not None:
        if target is None:
            raise DataError("Triggered predictions need the trigger's target class.")
        keep = labels != target  # the target class's own images would count as successes for free
        n_triggered = int(keep.sum())
        if n_triggered == 0:
            raise DataError(
                f"Every evaluation image is of the target class {target}, so ASR is undefined: "
                "evaluate on images of the other classes too."
            )
        hits = triggered.long().flatten()[keep]
        asr = float((hits == target).float().mean())
        robust = float((hits == labels[keep]).float().mean())
    return Evaluation(
        ba=float(correct.float().mean()),
        asr=asr,
        robust_accuracy=robust,
        per_class_accuracy=per_class,
        n_clean=len(labels),
        n_triggered=n_triggered,
        target=target,
    )


def _progress(accelerator: Accelerator, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not (enabled and accelerator.is_main_process),
        transient=True,
    )
