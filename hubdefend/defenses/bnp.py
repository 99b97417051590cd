"""BNP: BatchNorm statistics-based pruning (Zheng et al., "Pre-activation Distributions Expose
Backdoor Neurons", NeurIPS 2022; reference RJ-T/NIPS2022_EP_BNP). Clean data, no labels.

A norm layer's running statistics were gathered on the poisoned training set. On clean images, a
backdoor neuron's pre-activation distribution departs from them more than its neighbours': score
each channel by ``KL(N(clean mean, clean var) || N(running mean, running var))`` and prune channels
above ``mean + u * std`` of their layer (u = 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice

import torch

from hubdefend.defenses import register_defense
from hubdefend.defenses.base import Defense, DefenseConfig, DefenseOutput, layer_outliers
from hubdefend.errors import DefenseError
from hubdefend.synthesis import norm_input_statistics, running_stat_layers
from hubdefend.training import loader_for


@dataclass(frozen=True)
class BNPConfig(DefenseConfig):
    """BNP's published defaults."""

    u: float = 3.0  # prune channels whose KL exceeds mean + u * std of their layer
    batch_size: int = 128
    max_batches: int | None = None  # None: every defender image (the reference uses its clean loader)


@register_defense("bnp")
class BNP(Defense):
    config_cls = BNPConfig
    needs_labels = False
    deviations = (
        "Clean statistics are pooled over every defender image (exact mean and variance over all "
        "pixels), not averaged over batches.",
        "Groups without running statistics (LayerNorm, MLP units) have no KL and are never pruned.",
    )

    @torch.no_grad()
    def score(self, model, groups, data, *, normalize, num_classes, accelerator, seed=0, progress=True):
        cfg: BNPConfig = self.config
        batches = loader_for(data, batch_size=cfg.batch_size, seed=seed, shuffle=False)
        pixels = torch.cat([pixels for pixels, _ in islice(batches, cfg.max_batches)])
        values = channel_kl(
            model, groups, pixels, normalize=normalize, batch_size=cfg.batch_size, accelerator=accelerator
        )
        if not values:
            raise DefenseError(
                "BNP needs norm layers with running statistics (BatchNorm); this model has none. Try anp or cnp."
            )
        scores, count = layer_outliers(groups, values, cfg.u)
        return DefenseOutput(scores, own_count=count, notes={"layers_scored": len(values), "u": cfg.u})


def gaussian_kl(
    mean0: torch.Tensor, var0: torch.Tensor, mean1: torch.Tensor, var1: torch.Tensor
) -> torch.Tensor:
    """``KL(N(mean0, var0) || N(mean1, var1))`` per channel."""
    var0, var1 = var0.clamp_min(1e-8), var1.clamp_min(1e-8)
    return 0.5 * ((var1 / var0).log() + (var0 + (mean0 - mean1) ** 2) / var1 - 1)


def channel_kl(model, groups, pixels, *, normalize, batch_size, accelerator) -> dict[str, torch.Tensor]:
    """Per channel of every norm group with running statistics: how far its input's distribution on
    ``pixels`` departs from the running one, ``KL(N(mean, var) || N(running mean, running var))``.
    Groups without running statistics are left out."""
    with_stats = {name for name, _ in running_stat_layers(model)}
    layers = [g.name for g in groups if g.kind == "norm" and g.name in with_stats]
    stats = norm_input_statistics(
        model, pixels, normalize=normalize, layers=layers, batch_size=batch_size, accelerator=accelerator
    )
    kl = {}
    for name, (mean, var) in stats.items():
        norm = model.get_submodule(name)
        kl[name] = gaussian_kl(mean, var, norm.running_mean.float().cpu(), norm.running_var.float().cpu())
    return kl
