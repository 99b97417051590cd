"""ANP: Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021; reference csdongxian/ANP_backdoor).

Backdoor neurons are the ones whose small adversarial perturbation most easily flips the model, so
ANP learns a mask per neuron that keeps clean accuracy under such perturbations; backdoor neurons
end with low masks. Per batch: random start ``delta, xi ~ U[-eps, eps]``; one signed-gradient
ascent step of size ``eps`` on the perturbed model's cross-entropy (no projection, as in the
reference); then one SGD step on the masks of ``alpha * CE(masked) + (1 - alpha) * CE(masked +
perturbed)``, masks clamped to [0, 1]. Norm layers in train mode, as in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hubdefend.defenses import register_defense
from hubdefend.defenses.base import Defense, DefenseConfig, DefenseOutput, NeuronScores
from hubdefend.masks import NeuronMasks
from hubdefend.training import MaskedModel, frozen, loader_for, run_steps


@dataclass(frozen=True)
class ANPConfig(DefenseConfig):
    """ANP's published defaults (``optimize_mask_cifar.py``)."""

    eps: float = 0.4  # anp_eps: perturbation budget of delta and xi
    steps: int = 1  # anp_steps: ascent steps per batch, each of size eps / steps
    alpha: float = 0.2  # anp_alpha: weight of the clean loss
    lr: float = 0.2  # mask SGD learning rate
    momentum: float = 0.9
    iterations: int = 2000  # nb_iter
    batch_size: int = 128
    train_mode: bool = True  # norm layers use batch statistics during mask learning


@register_defense("anp")
class ANP(Defense):
    config_cls = ANPConfig
    deviations = (
        "The model's running statistics are left untouched: masks are learnt on a private copy "
        "(the reference updates them on the defender data, then reloads the checkpoint to prune).",
        "Batches cycle through a seeded shuffle of the defender data instead of sampling with "
        "replacement, so every image is seen equally often.",
    )

    def score(self, model, groups, data, *, normalize, num_classes, accelerator, seed=0, progress=True):
        cfg: ANPConfig = self.config
        generator = torch.Generator().manual_seed(seed)
        masks = NeuronMasks(groups, perturbation=cfg.eps > 0)
        optimizer = torch.optim.SGD(list(masks.mask), lr=cfg.lr, momentum=cfg.momentum)
        loader = loader_for(data, batch_size=cfg.batch_size, seed=seed)
        with frozen(model, train_mode=cfg.train_mode), masks.attached_to(model):
            masked_model = MaskedModel(model, masks, normalize)
            masked_model, optimizer, loader = accelerator.prepare(masked_model, optimizer, loader)

            def step(pixels: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
                if cfg.eps > 0:
                    # Ascend the perturbed loss (the reference descends on -CE with signed grads).
                    masks.adversarial_perturbation(
                        lambda: F.cross_entropy(masked_model(pixels, "perturbed"), labels),
                        eps=cfg.eps, steps=cfg.steps, generator=generator, backward=accelerator.backward,
                    )  # fmt: skip
                    perturbed, clean = masked_model(pixels, "both")
                    robust_loss = F.cross_entropy(perturbed, labels)
                else:
                    clean = masked_model(pixels, "clean")
                    robust_loss = torch.zeros((), device=clean.device)
                clean_loss = F.cross_entropy(clean, labels)
                loss = cfg.alpha * clean_loss + (1 - cfg.alpha) * robust_loss
                optimizer.zero_grad()
                accelerator.backward(loss)
                optimizer.step()
                masks.clip_masks()
                return {"clean_loss": clean_loss.item(), "robust_loss": robust_loss.item()}

            history = run_steps(
                accelerator, loader, cfg.iterations, step, description="ANP masks", progress=progress
            )
        values = {name: mask.cpu() for name, mask in masks.mask_values().items()}
        return DefenseOutput(NeuronScores(groups, values), notes={"final": history[-1] if history else {}})
