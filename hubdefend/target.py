"""Which class is the backdoor's target? Answered from clean images, without labels.

Under small adversarial neuron noise a backdoored model sends clean images to its target class
(ANP's observation; CNP's target inference): the target is the class whose share of predictions
grows most when ANP-style noise (random start in [-eps, eps], one signed ascent step on the
cross-entropy against the model's own predictions) perturbs every neuron.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from hubdefend.masks import NeuronMasks
from hubdefend.neurons import NeuronGroup
from hubdefend.training import MaskedModel, Normalize, frozen, loader_for


@dataclass
class TargetEvidence:
    """Prediction counts per class before and under neuron noise, and the class that grew most."""

    target: int
    counts_clean: list[int]
    counts_noisy: list[int]

    @property
    def growth(self) -> list[int]:
        return [noisy - clean for clean, noisy in zip(self.counts_clean, self.counts_noisy, strict=True)]

    def to_dict(self) -> dict:
        return {"target": self.target, "counts_clean": self.counts_clean, "counts_noisy": self.counts_noisy}


def infer_target(
    model: nn.Module,
    groups: list[NeuronGroup],
    data,
    *,
    normalize: Normalize,
    num_classes: int,
    accelerator: Accelerator,
    eps: float = 0.4,
    batch_size: int = 128,
    seed: int = 0,
) -> TargetEvidence:
    """Infer the backdoor target from clean images; labels in ``data`` are ignored."""
    generator = torch.Generator().manual_seed(seed)
    masks = NeuronMasks(groups, perturbation=True)
    loader = loader_for(data, batch_size=batch_size, seed=seed, shuffle=False)
    counts_clean = torch.zeros(num_classes, dtype=torch.long)
    counts_noisy = torch.zeros(num_classes, dtype=torch.long)
    with frozen(model, train_mode=False), masks.attached_to(model):
        masked_model, loader = accelerator.prepare(MaskedModel(model, masks, normalize), loader)
        for pixels, _ in loader:
            with torch.no_grad(), accelerator.autocast():
                pseudo = masked_model(pixels).argmax(1)

            def noisy_loss(pixels=pixels, pseudo=pseudo) -> torch.Tensor:
                with accelerator.autocast():
                    return F.cross_entropy(masked_model(pixels, "perturbed"), pseudo)

            masks.adversarial_perturbation(
                noisy_loss, eps=eps, generator=generator, backward=accelerator.backward
            )
            with torch.no_grad(), accelerator.autocast():
                noisy = masked_model(pixels, "perturbed").argmax(1)
            counts_clean += torch.bincount(
                accelerator.gather_for_metrics(pseudo).cpu(), minlength=num_classes
            )
            counts_noisy += torch.bincount(accelerator.gather_for_metrics(noisy).cpu(), minlength=num_classes)
    growth = counts_noisy - counts_clean
    return TargetEvidence(int(growth.argmax()), counts_clean.tolist(), counts_noisy.tolist())
