"""The generic adapter: any torch ``nn.Module`` (torchvision models, hand-written nets)."""

from __future__ import annotations

from torch import nn

from hubdefend.adapters import register_adapter
from hubdefend.adapters.base import Adapter


@register_adapter
class TorchAdapter(Adapter):
    """Finds normalization layers by class in any module; cannot save a family layout."""

    family = "torch"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, nn.Module)
