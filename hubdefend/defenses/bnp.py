"""BNP: BatchNorm statistics-based pruning (Zheng et al., "Pre-activation Distributions Expose
Backdoor Neurons", NeurIPS 2022; reference RJ-T/NIPS2022_EP_BNP). Clean data, no labels.

A norm layer's running statistics were gathered on the poisoned training set. On clean images, a
backdoor neuron's pre-activation distribution departs from them more than its neighbours': score
each channel by ``KL(N(clean mean, clean var) || N(running mean, running var))`` and prune channels
above ``mean + u * std`` of their layer (u = 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hubdefend.defenses import register_defense
from hubdefend.defenses.base import Defense, DefenseConfig, DefenseOutput, layer_outliers
from hubdefend.errors import DefenseError
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
        stats = batch_statistics(
            model, groups, data, normalize, accelerator, cfg.batch_size, cfg.max_batches, seed
        )
        values = {}
        for name, (mean, var) in stats.items():
            norm = model.get_submodule(name)
            values[name] = gaussian_kl(
                mean, var, norm.running_mean.float().cpu(), norm.running_var.float().cpu()
            )
        scores, count = layer_outliers(groups, values, cfg.u)
        return DefenseOutput(scores, own_count=count, notes={"layers_scored": len(values), "u": cfg.u})


def gaussian_kl(
    mean0: torch.Tensor, var0: torch.Tensor, mean1: torch.Tensor, var1: torch.Tensor
) -> torch.Tensor:
    """``KL(N(mean0, var0) || N(mean1, var1))`` per channel."""
    var0, var1 = var0.clamp_min(1e-8), var1.clamp_min(1e-8)
    return 0.5 * ((var1 / var0).log() + (var0 + (mean0 - mean1) ** 2) / var1 - 1)


def batch_statistics(model, groups, data, normalize, accelerator, batch_size, max_batches, seed):
    """Mean and variance of each norm layer's INPUT per channel over ``data`` (eval mode)."""
    layers = {
        g.name: model.get_submodule(g.name)
        for g in groups
        if g.kind == "norm" and getattr(model.get_submodule(g.name), "running_mean", None) is not None
    }
    if not layers:
        raise DefenseError(
            "BNP needs norm layers with running statistics (BatchNorm); this model has none. Try anp or cnp."
        )
    sums: dict[str, list[torch.Tensor]] = {}

    def record(name, channel_dim):
        def hook(module, args):
            x = args[0].detach().double()
            x = x.movedim(channel_dim, 0).reshape(x.shape[channel_dim], -1)
            total = sums.setdefault(
                name,
                [
                    torch.zeros((), dtype=torch.double),
                    torch.zeros(x.shape[0], dtype=torch.double),
                    torch.zeros(x.shape[0], dtype=torch.double),
                ],
            )
            total[0] += x.shape[1]
            total[1] += x.sum(1).cpu()
            total[2] += (x * x).sum(1).cpu()

        return hook

    channel_dims = {g.name: g.channel_dim for g in groups}
    handles = [layer.register_forward_pre_hook(record(n, channel_dims[n])) for n, layer in layers.items()]
    model.eval().to(accelerator.device)
    try:
        for index, (pixels, _) in enumerate(
            loader_for(data, batch_size=batch_size, seed=seed, shuffle=False)
        ):
            if max_batches is not None and index >= max_batches:
                break
            with accelerator.autocast():
                model(normalize(pixels.to(accelerator.device)))
    finally:
        for handle in handles:
            handle.remove()
    stats = {}
    for name, (count, total, squares) in sums.items():
        mean = total / count
        stats[name] = (mean.float(), (squares / count - mean * mean).clamp_min(0).float())
    return stats
