"""The backdoored-model factory: train a timm architecture on poisoned data, reproducibly.

Used to make the test fixtures and the benchmark models. Poisoning follows the field's conventions
(all-to-one, BackdoorBench style): a ``poison_rate`` share of the training images, drawn from the
non-target classes, get the trigger and the target label; clean-label attacks (SIG) poison target
class images and keep their labels; WaNet adds its noise mode (``cross_ratio`` times as many images
warped with random noise, keeping their true labels). The result is saved in timm's own layout with
``backdoor.json``, the record of how it was made.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import hubdefend
from hubdefend.errors import DataError
from hubdefend.training import logits_of, make_accelerator, progress_bar

RECORD_FILE = "backdoor.json"


@dataclass
class AttackRecipe:
    """Everything that determines a backdoored model. Same recipe, same model."""

    architecture: str = "resnet18"
    model_args: dict[str, Any] = field(default_factory=dict)
    trigger: str = "badnets:size=3,corner=br,target=0"
    poison_rate: float = 0.1
    train_data: str = "fmnist:train"
    test_data: str = "fmnist:test"
    train_limit: int | None = None
    test_limit: int | None = None
    image_size: int = 32
    num_classes: int = 10
    epochs: int = 4
    batch_size: int = 128
    optimizer: str = "sgd"  # "sgd" (momentum 0.9, nesterov) or "adamw"
    lr: float = 0.05
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BackdooredModel:
    """A trained model and the record of how it was made (recipe, BA, ASR, time)."""

    model: nn.Module
    record: dict[str, Any]

    def save(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        folder = hubdefend.save(self.model, directory, overwrite=overwrite)
        (folder / RECORD_FILE).write_text(json.dumps(self.record, indent=2) + "\n")
        return folder


def build_model(recipe: AttackRecipe) -> nn.Module:
    """The untrained timm model, with a pretrained config that says how to preprocess its input."""
    import timm

    torch.manual_seed(recipe.seed)
    overlay = {
        "input_size": (3, recipe.image_size, recipe.image_size),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
    }
    return timm.create_model(
        recipe.architecture,
        pretrained=False,
        num_classes=recipe.num_classes,
        pretrained_cfg_overlay=overlay,
        **recipe.model_args,
    )


def poison_indices(
    labels: torch.Tensor, rate: float, target: int, *, clean_label: bool, seed: int
) -> torch.Tensor:
    """Which training images carry the trigger: from the non-target classes (dirty label) or from
    the target class (clean label), seeded."""
    pool = torch.nonzero((labels == target) if clean_label else (labels != target)).flatten()
    count = min(len(pool), round(rate * len(labels)))
    generator = torch.Generator().manual_seed(seed)
    return pool[torch.randperm(len(pool), generator=generator)[:count]].sort().values


def _materialize(dataset, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    from hubdefend.data import materialize

    x, y = materialize(dataset, limit)
    if len(x) == 0:
        raise DataError("The training data is empty.")
    return x, y


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


def train_backdoored(
    recipe: AttackRecipe, *, train_set=None, test_set=None, progress: bool = True
) -> BackdooredModel:
    """Train ``recipe.architecture`` on data poisoned with ``recipe.trigger``; measure BA and ASR.

    Args:
        recipe: the attack and training settings.
        train_set / test_set: datasets of ``(pixels, label)`` at the model's input size; loaded from
            ``recipe.train_data`` / ``recipe.test_data`` when not given.
    """
    from hubdefend.data import load_data
    from hubdefend.preprocess import Preprocessing
    from hubdefend.triggers import parse_trigger

    started = time.perf_counter()
    trigger = parse_trigger(recipe.trigger)
    model = build_model(recipe)
    preprocessing = Preprocessing.from_timm(model)
    train_set = train_set if train_set is not None else load_data(recipe.train_data, preprocessing)
    test_set = test_set if test_set is not None else load_data(recipe.test_data, preprocessing)
    x, y = _materialize(train_set, recipe.train_limit)
    poisoned = poison_indices(
        y, recipe.poison_rate, trigger.target, clean_label=trigger.clean_label, seed=recipe.seed
    )
    x[poisoned] = trigger.apply(x[poisoned])
    if not trigger.clean_label:
        y[poisoned] = trigger.target
    noise_mode = hasattr(trigger, "apply_noise")
    generator = torch.Generator().manual_seed(recipe.seed)

    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    else:
        optimizer = torch.optim.SGD(
            params, lr=recipe.lr, momentum=0.9, nesterov=True, weight_decay=recipe.weight_decay
        )
    steps_per_epoch = math.ceil(len(x) / recipe.batch_size)
    total = recipe.epochs * steps_per_epoch
    warmup = int(recipe.warmup_epochs * steps_per_epoch)
    accelerator = make_accelerator()
    step = 0
    model.train()
    with progress_bar(accelerator, enabled=progress) as bar:
        task = bar.add_task(f"train {recipe.architecture}", total=total, status="")
        for _ in range(recipe.epochs):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), recipe.batch_size):
                batch = order[start : start + recipe.batch_size]
                pixels, labels = x[batch].clone(), y[batch]
                if noise_mode:  # WaNet's noise mode: random warps that keep their true labels
                    clean = ~torch.isin(batch, poisoned)
                    n_noise = int(round(getattr(trigger, "cross_ratio", 2) * recipe.poison_rate * len(batch)))
                    chosen = torch.nonzero(clean).flatten()[:n_noise]
                    if len(chosen):
                        pixels[chosen] = trigger.apply_noise(pixels[chosen], generator=generator)
                for group in optimizer.param_groups:
                    group["lr"] = _lr_at(step, total, warmup, recipe.lr)
                loss = F.cross_entropy(logits_of(model(preprocessing.normalize(pixels))), labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
                bar.update(task, advance=1, status=f"loss={loss.item():.3f}")
    model.eval()
    train_seconds = time.perf_counter() - started
    ba, asr = measure_backdoor(model, test_set, preprocessing, trigger, limit=recipe.test_limit)
    record = {
        "recipe": recipe.to_dict(),
        "trigger": trigger.to_spec(),
        "target": trigger.target,
        "poisoned_images": len(poisoned),
        "train_images": len(x),
        "ba": round(ba, 4),
        "asr": round(asr, 4),
        "train_seconds": round(train_seconds, 1),
        "hubdefend_version": hubdefend.__version__,
    }
    return BackdooredModel(model, record)


@torch.no_grad()
def measure_backdoor(
    model: nn.Module, test_set, preprocessing, trigger, *, limit: int | None = None
) -> tuple[float, float]:
    """BA on clean test images and ASR over the non-target test images, batched."""
    x, y = _materialize(test_set, limit)
    model.eval()
    clean_correct, hits, non_target = 0, 0, 0
    for start in range(0, len(x), 512):
        pixels, labels = x[start : start + 512], y[start : start + 512]
        clean_correct += (logits_of(model(preprocessing.normalize(pixels))).argmax(1) == labels).sum().item()
        keep = labels != trigger.target
        if keep.any():
            triggered = trigger.apply(pixels[keep])
            hits += (
                (logits_of(model(preprocessing.normalize(triggered))).argmax(1) == trigger.target)
                .sum()
                .item()
            )
            non_target += int(keep.sum())
    return clean_correct / len(x), hits / max(1, non_target)


def make_backdoored(
    recipe: AttackRecipe, directory: str | Path, *, progress: bool = True, overwrite: bool = False
) -> BackdooredModel:
    """Train per ``recipe`` and save in timm's layout with ``backdoor.json``; reuse a cached one."""
    folder = Path(directory)
    record_path = folder / RECORD_FILE
    if record_path.is_file() and not overwrite:
        record = json.loads(record_path.read_text())
        if record.get("recipe") == json.loads(json.dumps(recipe.to_dict())):
            return BackdooredModel(hubdefend.load(folder).model, record)
    result = train_backdoored(recipe, progress=progress)
    result.save(folder, overwrite=True)
    return result
