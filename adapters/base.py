"""The adapter interface: what every model family must tell hubdefend."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from hubdefend.errors import HubDefendError
from hubdefend.neurons import NeuronGroup, attention_channels, find_norm_groups


@dataclass
class LoadedModel:
    """A model loaded from a folder (or, later, the Hub), with what is needed to use it.

    Attributes:
        model: the model, in eval mode, on CPU.
        family: ``"timm"`` or ``"transformers"``.
        architecture: timm model name, or the transformers architecture class name.
        config: the parsed ``config.json``.
        image_processor: the transformers image processor when the folder has one.
        source: where it came from (a folder path or a Hub id).
        revision: the pinned commit sha for Hub models; ``None`` for local folders.
    """

    model: nn.Module
    family: str
    architecture: str
    config: dict[str, Any]
    image_processor: Any = None
    source: str = ""
    revision: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Adapter:
    """One model family. Subclasses override what differs; `discover` of norms is shared."""

    family: ClassVar[str] = "torch"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether this adapter understands ``model``."""
        raise NotImplementedError

    def architecture(self, model: nn.Module) -> str:
        """A name for the model's architecture, as its family spells it."""
        return type(model).__name__

    def discover(self, model: nn.Module, *, kinds: tuple[str, ...]) -> list[NeuronGroup]:
        """Neuron groups of ``model`` of the given kinds, norms first."""
        groups = find_norm_groups(model) if "norm" in kinds else []
        units = self.transformer_units(model)
        if "attn" in kinds:  # every family that knows its heads knows their channels
            units = [attention_channels(g) if g.kind == "head" else g for g in units]
        return groups + [g for g in units if g.kind in kinds]

    def transformer_units(self, model: nn.Module) -> list[NeuronGroup]:
        """MLP hidden units and attention heads; none unless the family knows its blocks (the
        ``attn`` channels are derived from the heads)."""
        return []

    # -- family layout -----------------------------------------------------------------------
    @classmethod
    def can_load(cls, config: dict[str, Any]) -> bool:
        """Whether a folder whose ``config.json`` is ``config`` is in this family's layout."""
        return False

    def save(self, model: nn.Module, directory: Path, *, image_processor: Any = None) -> None:
        """Write ``model`` into the empty folder ``directory`` in the family's own layout."""
        raise HubDefendError(
            f"{type(model).__name__} is a plain torch module: it has no model family layout that stock "
            "libraries can load. Save its weights with safetensors.torch.save_model(model, path) instead, "
            "or use a timm or transformers model."
        )

    def load(self, directory: Path, config: dict[str, Any]) -> LoadedModel:
        """Build the model saved in ``directory``."""
        raise NotImplementedError
