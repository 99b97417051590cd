"""BA, ASR (over non-target images), robust accuracy and per-class accuracy, batched under Accelerate."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from accelerate import Accelerator

from hubdefend.training import logits_of, progress_bar


@dataclass
class Evaluation:
    ba: float
    asr: float | None
    robust_accuracy: float | None
    per_class_accuracy: list[float]
    n_clean: int
    n_triggered: int

    def to_dict(self) -> dict:
        return asdict(self)


def predict_logits(model, pixels: torch.Tensor, preprocessing) -> torch.Tensor:
    return logits_of(model(preprocessing.normalize(pixels)))


@torch.no_grad()
def evaluate(
    model,
    loader,
    preprocessing,
    *,
    trigger=None,
    accelerator: Accelerator | None = None,
    progress: bool = True,
) -> Evaluation:
    accelerator = accelerator or Accelerator()
    was_training = model.training
    model.eval().to(accelerator.device)
    loader = accelerator.prepare(loader)
    labels_all, clean_all, trig_all = [], [], []
    try:
        with progress_bar(accelerator, enabled=progress) as bar:
            task = bar.add_task("evaluate", total=len(loader), status="")
            for pixels, labels in loader:
                labels = torch.as_tensor(labels, device=pixels.device)
                clean = predict_logits(model, pixels, preprocessing).argmax(1)
                labels_all.append(accelerator.gather_for_metrics(labels).cpu())
                clean_all.append(accelerator.gather_for_metrics(clean).cpu())
                if trigger is not None:
                    trig = predict_logits(model, trigger.apply(pixels), preprocessing).argmax(1)
                    trig_all.append(accelerator.gather_for_metrics(trig).cpu())
                bar.update(task, advance=1)
    finally:
        model.train(was_training)
    labels, clean = torch.cat(labels_all), torch.cat(clean_all)
    classes = int(max(labels.max().item(), clean.max().item())) + 1
    per_class = [
        ((clean == labels) & (labels == c)).sum().item() / max(1, (labels == c).sum().item())
        for c in range(classes)
    ]
    asr = robust = None
    n_triggered = 0
    if trigger is not None:
        triggered = torch.cat(trig_all)
        keep = labels != trigger.target
        n_triggered = int(keep.sum())
        if n_triggered:
            asr = (triggered[keep] == trigger.target).float().mean().item()
            robust = (triggered[keep] == labels[keep]).float().mean().item()
    return Evaluation(
        (clean == labels).float().mean().item(), asr, robust, per_class, len(labels), n_triggered
    )
