"""CNP: Contrastive Neuron Pruning (Feng et al., IEEE TIP 2025; reference
HazardFY/Contrastive-Neuron-Pruning-for-Backdoor-Defense, ``optimize_mask_CL.py``).

Needs no labels. 1. The target: the model's own predictions are pseudo-labels; ANP-style neuron
noise makes the backdoor fire, and the class whose predicted count grows most is the target
(`hubdefend.target.infer_target`). 2. A trigger for that class, reversed Neural Cleanse style
(`InversionConfig.cnp`). 3. Masks learnt with a multi-positive InfoNCE on penultimate features:
the masked model on clean images, on reversed-trigger images and with adversarial neuron noise are
pulled toward the ORIGINAL model's clean features and pushed from its triggered features
(temperature 0.3). Neurons that carry the trigger must close to make triggered features look
clean, so the lowest masks are the backdoor's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hubdefend.defenses import register_defense
from hubdefend.defenses.base import Defense, DefenseConfig, DefenseOutput, NeuronScores
from hubdefend.errors import DefenseError
from hubdefend.inversion import InversionConfig, invert_trigger
from hubdefend.masks import NeuronMasks
from hubdefend.target import infer_target
from hubdefend.training import frozen, loader_for, run_steps


@dataclass(frozen=True)
class CNPConfig(DefenseConfig):
    """CNP's published defaults (``config.py`` and ``optimize_mask_CL.py``)."""

    eps: float = 0.4  # anp_eps, for target inference and the noisy view
    steps: int = 1  # anp_steps
    temperature: float = 0.3
    lr: float = 0.2  # mask SGD learning rate
    momentum: float = 0.9
    rounds: int = 30  # ceil(150 / 5) rounds, the plateau schedule steps once per round
    batches_per_round: int = 40  # 5 passes of 1000 images drawn with replacement, batch 128
    batch_size: int = 128
    plateau_factor: float = 0.5
    plateau_patience: int = 2
    min_lr: float = 0.01
    inversion_epochs: int = 20
    train_mode: bool = True  # norm layers use batch statistics during mask learning, as in the reference


def classifier_of(model: nn.Module) -> nn.Module:
    """The final classifier layer, whose input is the penultimate feature the loss compares."""
    if hasattr(model, "get_classifier"):  # timm
        head = model.get_classifier()
        if isinstance(head, nn.Module) and not isinstance(head, nn.Identity):
            return head
    for attr in ("classifier", "head", "fc"):
        head = getattr(model, attr, None)
        if isinstance(head, nn.Linear):
            return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise DefenseError("CNP needs the model's classifier layer to read penultimate features; none found.")
    return linears[-1]


class _Contrast(nn.Module):
    """The masked model and the original (masks bypassed) behind one ``forward``, returning the
    penultimate features of the five views the CNP loss compares, so that DDP sees one forward
    per backward."""

    def __init__(self, model: nn.Module, masks: NeuronMasks, normalize) -> None:
        super().__init__()
        self.model = model
        self.masks = masks
        self.normalize = normalize
        self._features: torch.Tensor | None = None
        self._handle = classifier_of(model).register_forward_pre_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple) -> None:
        self._features = args[0].flatten(1)

    def remove(self) -> None:
        self._handle.remove()

    def features(
        self, pixels: torch.Tensor, *, perturbed: bool = False, original: bool = False
    ) -> torch.Tensor:
        self.masks.perturbing, self.masks.bypassed = perturbed, original
        try:
            logits = self.model(self.normalize(pixels))
        finally:
            self.masks.perturbing, self.masks.bypassed = False, False
        self.last_logits = (
            logits if isinstance(logits, torch.Tensor) else getattr(logits, "logits", logits[0])
        )
        return self._features

    def logits(self, pixels: torch.Tensor, *, perturbed: bool = False) -> torch.Tensor:
        self.features(pixels, perturbed=perturbed)
        return self.last_logits

    def forward(self, clean: torch.Tensor, triggered: torch.Tensor) -> tuple[torch.Tensor, ...]:
        noisy = self.features(clean, perturbed=True)
        masked_clean = self.features(clean)
        masked_triggered = self.features(triggered)
        agreement_logits = self.last_logits
        with torch.no_grad():
            original_clean = self.features(clean, original=True)
            original_predictions = self.last_logits.argmax(1)
            original_triggered = self.features(triggered, original=True)
        agree = (agreement_logits.argmax(1) == original_predictions).float().mean()
        return noisy, masked_clean, masked_triggered, original_clean, original_triggered, agree


def contrastive_loss(
    noisy, masked_clean, masked_triggered, original_clean, original_triggered, temperature: float
) -> torch.Tensor:
    """CNP's multi-positive InfoNCE: three positives (each masked view vs the original clean
    feature) against three negatives (each masked view vs the original triggered feature); the
    cross-entropy of the six cosine logits is averaged over the three positive indices."""
    positives = [
        F.cosine_similarity(v, original_clean, dim=-1) for v in (masked_clean, masked_triggered, noisy)
    ]
    negatives = [
        F.cosine_similarity(v, original_triggered, dim=-1) for v in (noisy, masked_clean, masked_triggered)
    ]
    logits = torch.stack([*positives, *negatives], dim=1) / temperature
    return (
        sum(
            F.cross_entropy(logits, torch.full((logits.shape[0],), i, device=logits.device)) for i in range(3)
        )
        / 3
    )


@register_defense("cnp")
class CNP(Defense):
    config_cls = CNPConfig
    needs_labels = False
    deviations = (
        "Batches cycle through a seeded shuffle of the defender data instead of sampling with "
        "replacement, so every image is seen equally often.",
        "Penultimate features are read at the input of the model's classifier layer (any timm / "
        "transformers model), not through a get_final_fm method of three CIFAR networks.",
        "The model's running statistics are left untouched: masks are learnt on a private copy.",
    )

    def score(self, model, groups, data, *, normalize, num_classes, accelerator, seed=0, progress=True):
        cfg: CNPConfig = self.config
        evidence = infer_target(
            model, groups, data, normalize=normalize, num_classes=num_classes, accelerator=accelerator,
            eps=cfg.eps, batch_size=cfg.batch_size, seed=seed,
        )  # fmt: skip
        reversed_trigger = invert_trigger(
            model, data, normalize, evidence.target, accelerator=accelerator, progress=progress, seed=seed,
            config=InversionConfig.cnp(epochs=cfg.inversion_epochs, batch_size=cfg.batch_size),
        )  # fmt: skip
        generator = torch.Generator().manual_seed(seed)
        masks = NeuronMasks(groups, perturbation=cfg.eps > 0)
        optimizer = torch.optim.SGD(list(masks.mask), lr=cfg.lr, momentum=cfg.momentum)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience, min_lr=cfg.min_lr
        )
        loader = loader_for(data, batch_size=cfg.batch_size, seed=seed)
        with frozen(model, train_mode=cfg.train_mode), masks.attached_to(model):
            contrast = _Contrast(model, masks, normalize)
            try:
                contrast, optimizer, loader = accelerator.prepare(contrast, optimizer, loader)
                inner = accelerator.unwrap_model(contrast)
                round_agreement: list[float] = []

                def step(pixels: torch.Tensor, _labels: torch.Tensor) -> dict[str, float]:
                    with torch.no_grad():
                        pseudo = inner.logits(pixels).argmax(1)  # labels are never used
                    if cfg.eps > 0:
                        masks.adversarial_perturbation(
                            lambda: F.cross_entropy(inner.logits(pixels, perturbed=True), pseudo),
                            eps=cfg.eps, steps=cfg.steps, generator=generator, backward=accelerator.backward,
                        )  # fmt: skip
                    triggered = reversed_trigger.apply(pixels)
                    *views, agree = contrast(pixels, triggered)
                    loss = contrastive_loss(*views, cfg.temperature)
                    optimizer.zero_grad()
                    accelerator.backward(loss)
                    optimizer.step()
                    masks.clip_masks()
                    round_agreement.append(agree.item())
                    return {"loss": loss.item(), "agree": agree.item()}

                history = []
                for _ in range(cfg.rounds):
                    round_agreement.clear()
                    history += run_steps(
                        accelerator,
                        loader,
                        cfg.batches_per_round,
                        step,
                        description="CNP masks",
                        progress=progress,
                    )
                    # The reference steps its plateau schedule on the round's agreement between the
                    # masked model on triggered images and the original on clean ones.
                    scheduler.step(sum(round_agreement) / max(1, len(round_agreement)))
            finally:
                accelerator.unwrap_model(contrast).remove()
        values = {name: mask.cpu() for name, mask in masks.mask_values().items()}
        notes = {
            "target_evidence": evidence.to_dict(),
            "final": history[-1] if history else {},
            "final_lr": optimizer.param_groups[0]["lr"],
        }
        return DefenseOutput(NeuronScores(groups, values), reversed_trigger, evidence.target, notes)
