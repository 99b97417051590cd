"""timm models: discovery of MLP units and heads, and timm's own Hub layout.

The layout is what ``timm.create_model("hf-hub:org/name", pretrained=True)`` reads: ``config.json``
(``architecture``, ``num_classes``, ``model_args``, ``pretrained_cfg``) and ``model.safetensors``.
timm >= 1.0.20 records each model's constructor arguments, so ``save_for_hf`` can write them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from torch import nn

from hubdefend.adapters import register_adapter
from hubdefend.adapters.base import Adapter, LoadedModel
from hubdefend.errors import HubDefendError, NotAModelError, UnknownArchitectureError, WeightsMismatchError
from hubdefend.neurons import NeuronGroup


def mlp_group(name: str, projection: nn.Linear) -> NeuronGroup:
    """The hidden units of an MLP, masked at the input of its output projection."""
    return NeuronGroup(
        name=name,
        kind="mlp",
        layer_type=type(projection).__name__,
        num_neurons=projection.in_features,
        channel_dim=-1,
        hook_point=name,
        hook_on="input",
        gamma="weight",
        beta=None,
    )


def head_group(name: str, projection: nn.Linear, num_heads: int) -> NeuronGroup:
    """The heads of an attention layer, masked as slices of its output projection's input."""
    return NeuronGroup(
        name=name,
        kind="head",
        layer_type=type(projection).__name__,
        num_neurons=num_heads,
        channel_dim=-1,
        hook_point=name,
        hook_on="input",
        gamma="weight",
        beta=None,
        neuron_width=projection.in_features // num_heads,
    )


def _join(prefix: str, child: str) -> str:
    return f"{prefix}.{child}" if prefix else child


@register_adapter
class TimmAdapter(Adapter):
    family = "timm"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__module__.startswith("timm.") and hasattr(model, "pretrained_cfg")

    def architecture(self, model: nn.Module) -> str:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        return cfg.get("architecture") or type(model).__name__

    def transformer_units(self, model: nn.Module) -> list[NeuronGroup]:
        groups = []
        for name, module in model.named_modules():
            fc2 = getattr(module, "fc2", None)
            if "Mlp" in type(module).__name__ and isinstance(fc2, nn.Linear):
                groups.append(mlp_group(_join(name, "fc2"), fc2))
            proj, num_heads = getattr(module, "proj", None), getattr(module, "num_heads", None)
            if (
                isinstance(proj, nn.Linear)
                and isinstance(num_heads, int)
                and proj.in_features % num_heads == 0
            ) and (hasattr(module, "qkv") or hasattr(module, "q")):
                groups.append(head_group(_join(name, "proj"), proj, num_heads))
        return groups

    # -- layout ---------------------------------------------------------------------------------
    @classmethod
    def can_load(cls, config: dict[str, Any]) -> bool:
        return "architecture" in config

    def save(self, model: nn.Module, directory: Path, *, image_processor: Any = None) -> None:
        from timm.models import save_for_hf

        try:
            save_for_hf(model, str(directory), safe_serialization=True)
        except ValueError as exc:  # constructor arguments timm cannot serialise
            raise HubDefendError(f"timm cannot describe this model in config.json: {exc}") from exc

    def load(self, directory: Path, config: dict[str, Any]) -> LoadedModel:
        import timm

        architecture = config["architecture"]
        if not timm.is_model(architecture):
            raise UnknownArchitectureError(
                f"{directory}/config.json names timm architecture {architecture!r}, which timm "
                f"{timm.__version__} does not know. Upgrade timm, or check the config for a typo."
            )
        if not (directory / "model.safetensors").is_file():
            raise NotAModelError(
                f"{directory} has a timm config.json but no model.safetensors. hubdefend loads safetensors "
                "weights only; convert the checkpoint with safetensors first."
            )
        try:
            model = timm.create_model(f"local-dir:{directory}", pretrained=True)
        except (RuntimeError, ValueError, OSError, SafetensorError) as exc:  # shapes, or a corrupt file
            raise WeightsMismatchError(
                f"The weights in {directory}/model.safetensors do not fit {architecture!r} as config.json "
                f"describes it: {str(exc).splitlines()[0]} Check that the config and weights belong together."
            ) from exc
        return LoadedModel(model.eval(), "timm", architecture, config, source=str(directory))
