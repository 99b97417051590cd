"""CLP: Channel Lipschitzness-based Pruning (Zheng et al., ECCV 2022; reference
rkteddy/channel-Lipschitzness-based-pruning). Data-free.

A backdoor channel answers a tiny trigger with a large activation: its upper bound on the channel
Lipschitz constant (UCLC) is an outlier. For a convolution followed by BatchNorm, the channel's map is
``x -> gamma / sigma * (W_k * x)``, whose Lipschitz bound is the largest singular value of the filter
``W_k`` (reshaped to in_channels x kernel) times ``|gamma / sigma|``. Channels above ``mean + u *
std`` of their layer are pruned (u = 3 by default).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hubdefend.defenses import register_defense
from hubdefend.defenses.base import Defense, DefenseConfig, DefenseOutput, layer_outliers


@dataclass(frozen=True)
class CLPConfig(DefenseConfig):
    """CLP's published default (``CLP.py``: ``u = 3``)."""

    u: float = 3.0  # prune channels whose UCLC exceeds mean + u * std of their layer


@register_defense("clp")
class CLP(Defense):
    config_cls = CLPConfig
    needs_data = False
    needs_labels = False
    deviations = (
        "Works on any norm layer with running statistics that follows a convolution in module order "
        "(BatchNorm2d and timm's fused BatchNormAct2d alike); the reference handles BatchNorm2d only. "
        "Other groups (LayerNorm, MLP units) have no UCLC and are never pruned.",
        "With clean data, sanitize's automatic operating point (accuracy budget, reversed trigger) "
        "replaces the u rule; with no data, the u rule is the operating point, as in the paper.",
    )

    def score(self, model, groups, data, *, normalize, num_classes, accelerator, seed=0, progress=True):
        cfg: CLPConfig = self.config
        wanted = {g.name for g in groups}
        values, convolution = {}, None
        # As in the reference: a norm layer belongs to the convolution registered just before it.
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d):
                convolution = module
            elif name in wanted and convolution is not None:
                uclc = _uclc(convolution, module)
                if uclc is not None:
                    values[name] = uclc
                convolution = None
        scores, count = layer_outliers(groups, values, cfg.u)
        notes = {"layers_scored": len(values), "layers_without_uclc": len(groups) - len(values), "u": cfg.u}
        return DefenseOutput(scores, own_count=count, notes=notes)


@torch.no_grad()
def _uclc(convolution: nn.Conv2d, norm: nn.Module) -> torch.Tensor | None:
    """Per output channel: top singular value of its filter times |gamma / sigma|."""
    running_var, gamma = getattr(norm, "running_var", None), getattr(norm, "weight", None)
    weight = convolution.weight
    if running_var is None or gamma is None or weight.shape[0] != running_var.numel():
        return None
    scale = (gamma / (running_var + getattr(norm, "eps", 1e-5)).sqrt()).abs()
    filters = weight.detach().float().reshape(weight.shape[0], weight.shape[1], -1)
    return torch.linalg.matrix_norm(filters, ord=2) * scale.float()
