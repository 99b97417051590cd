"""Neurons: what a prunable unit is, and how to find the normalization layers that hold them.

A *neuron* is one channel of a normalization layer (``kind="norm"``), one hidden unit of a
transformer MLP (``kind="mlp"``), one attention head (``kind="head"``) or one channel of the
attention output before its projection (``kind="attn"``: a head is ``head_dim`` of them). A `NeuronGroup` names
the layer that holds a set of them and says where the value to mask can be reached: for a plain norm
its output; for a fused norm+activation (timm's ``BatchNormAct2d``, transformers'
``BitGroupNormActivation``) the input of its activation, so that masking happens before the
non-linearity; for ``mlp``, ``head`` and ``attn`` units the input of the block's output projection.

This module is mechanism only: it never imports defenses, adapters or model families.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

NEURON_KINDS = ("norm", "mlp", "head", "attn")
# Two views of the same projection input: one model's neurons use at most one of them.
EXCLUSIVE_KINDS = ("head", "attn")


@dataclass(frozen=True)
class NeuronGroup:
    """One layer's worth of neurons.

    Attributes:
        name: module path of the layer that owns the neurons (the norm layer, or the output
            projection for ``mlp``/``head``/``attn`` units), as in ``model.get_submodule(name)``.
        kind: ``"norm"``, ``"mlp"``, ``"head"`` or ``"attn"``.
        layer_type: class name of the module at ``name`` (``"BatchNormAct2d"``, ``"Linear"``...).
        num_neurons: number of neurons (channels, hidden units, heads or attention channels).
        channel_dim: dimension of the hooked tensor that indexes neurons: ``1`` (channels-first,
            NCHW) or ``-1`` (channels-last, tokens).
        hook_point: module path where the value before any fused activation is reached.
        hook_on: ``"output"`` (forward hook on ``hook_point``), ``"input"`` (forward pre-hook on
            ``hook_point``, e.g. a fused layer's activation) or ``"recompute"`` (the layer's
            activation is inline; the hook recomputes the pre-activation value from the input).
        gamma: attribute of ``name`` holding the scale (parameter or buffer); ``None`` when the
            layer has no affine weight. For ``mlp``/``head``/``attn`` units: the projection's ``weight``.
        beta: attribute holding the shift, or ``None``.
        gamma_offset: the layer computes ``x * (gamma_offset + gamma)``: 1 for Gemma-style RMS
            norms, 0 otherwise.
        neuron_width: features per neuron along ``channel_dim`` (``head_dim`` for heads, else 1).
    """

    name: str
    kind: str
    layer_type: str
    num_neurons: int
    channel_dim: int
    hook_point: str
    hook_on: str = "output"
    gamma: str | None = "weight"
    beta: str | None = "bias"
    gamma_offset: float = 0.0
    neuron_width: int = 1

    @property
    def bakeable(self) -> bool:
        """Whether pruning these neurons can be written into the weights."""
        return self.gamma is not None

    def to_dict(self) -> dict:
        return asdict(self)


# --- which modules are normalization layers ---------------------------------------------------
# Decided per layer, never per model: many models mix channels-first and channels-last norms.

_TORCH_NORM_BASES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm*, Lazy*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
)
# Norms that subclass nothing of the above, recognised by class name. The name must END in one of
# these words (plus an optional dimension/variant suffix), so that containers such as
# ConvNormAct, NormLinear or EvaBlockPostNorm are not mistaken for norms.
_NORM_NAME = re.compile(
    r"(BatchNorm|LayerNorm|GroupNorm|RmsNorm|RMSNorm|InstanceNorm|SimpleNorm|EvoNorm|FilterResponseNorm)"
    r"(\d?[dD]?)(Act|Activation|Tlu)?(\d[dD])?(Fp32|NoBias)?$"
)
_EVONORM = re.compile(r"EvoNorm\dd[BS]\da?$")
_GEMMA_RMS = re.compile(r"Gemma\d*RMSNorm$")
# Norm-like layers we deliberately leave out: GlobalResponseNorm mixes channels (x + g*x*N(x) + b),
# so zeroing one of its gammas does not silence a channel.
_NOT_NEURON_NORMS = re.compile(r"GlobalResponseNorm")


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer whose channels are neurons."""
    cls_name = type(module).__name__
    if _NOT_NEURON_NORMS.search(cls_name):
        return False
    if isinstance(module, _TORCH_NORM_BASES):
        return True
    return bool(_NORM_NAME.search(cls_name) or _EVONORM.search(cls_name))


def _tensor_attr(module: nn.Module, name: str) -> torch.Tensor | None:
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) else None


def _channel_dim(module: nn.Module) -> int:
    cls_name = type(module).__name__
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
        return 1
    if getattr(module, "data_format", None) == "channels_first":  # transformers ConvNext norms
        return 1
    if re.search(r"(BatchNorm|GroupNorm|InstanceNorm|EvoNorm|FilterResponseNorm)", cls_name):
        return 1
    if re.search(r"2[dD]", cls_name):  # LayerNorm2d, RmsNorm2d, SimpleNorm2d subclass channels-last norms
        return 1
    return -1


def _num_channels(module: nn.Module) -> int | None:
    for attr in ("weight", "bias", "running_mean"):
        tensor = _tensor_attr(module, attr)
        if tensor is not None and tensor.ndim == 1:
            return int(tensor.shape[0])
    for attr in ("num_features", "num_channels"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, (tuple, list)) and len(shape) == 1:
        return int(shape[0])
    return None


def _activation_child(module: nn.Module) -> str | None:
    """The child that a fused norm+activation layer applies after normalising, if any."""
    for child in ("act", "activation"):
        if isinstance(getattr(module, child, None), nn.Module):
            return child
    return None


def norm_group(name: str, module: nn.Module) -> NeuronGroup | None:
    """Describe the norm layer ``module`` at path ``name`` as a `NeuronGroup`.

    Returns ``None`` for layers whose neurons cannot be addressed one by one (a LayerNorm over
    several trailing dims, a norm with no channel count).
    """
    num = _num_channels(module)
    shape = getattr(module, "normalized_shape", None)
    if num is None or (isinstance(shape, (tuple, list)) and len(shape) != 1):
        return None
    cls_name = type(module).__name__
    hook_point, hook_on = name, "output"
    act = _activation_child(module)
    if act is not None:
        hook_point, hook_on = f"{name}.{act}" if name else act, "input"
    elif cls_name.startswith("FilterResponseNormTlu"):
        hook_on = "recompute"  # its TLU max(x, tau) is inline in forward, not a child module
    gamma = "weight" if _tensor_attr(module, "weight") is not None else None
    beta = "bias" if _tensor_attr(module, "bias") is not None else None
    return NeuronGroup(
        name=name,
        kind="norm",
        layer_type=cls_name,
        num_neurons=num,
        channel_dim=_channel_dim(module),
        hook_point=hook_point,
        hook_on=hook_on,
        gamma=gamma,
        beta=beta,
        gamma_offset=1.0 if _GEMMA_RMS.search(cls_name) else 0.0,
    )


def attention_channels(heads: NeuronGroup) -> NeuronGroup:
    """The ``attn`` view of a ``head`` group: each of its ``head_dim`` features per head is a neuron.

    Why a finer unit than the head: on the ViT benchmark model one head carries a BadNets backdoor,
    but masking that head costs 3.4 BA points, where an oracle masking 80 of the 1152 channels
    (spread over all blocks) leaves ASR at 6.5% for 0.8 points (`benchmarks/oracle_pruning.py`).
    """
    return replace(heads, kind="attn", num_neurons=heads.num_neurons * heads.neuron_width, neuron_width=1)


def iter_norm_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(path, module)`` for every normalization layer, in module order."""
    for name, module in model.named_modules():
        if is_norm_layer(module):
            yield name, module


def find_norm_groups(model: nn.Module) -> list[NeuronGroup]:
    """Every normalization layer of ``model`` as a `NeuronGroup`, in module order."""
    groups = []
    for name, module in iter_norm_layers(model):
        group = norm_group(name, module)
        if group is not None:
            groups.append(group)
    return groups


def total_neurons(groups: list[NeuronGroup]) -> int:
    return sum(g.num_neurons for g in groups)
