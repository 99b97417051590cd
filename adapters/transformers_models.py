"""transformers models: discovery of MLP units and heads, and ``save_pretrained`` layout.

Never uses transformers' ``head_mask`` argument: it reaches the attention kernel as its
``attention_mask`` and so its meaning depends on ``attn_implementation``. Heads are masked as
slices of the attention output projection's input instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from torch import nn

from hubdefend.adapters import register_adapter
from hubdefend.adapters.base import Adapter, LoadedModel
from hubdefend.adapters.timm_models import _join, head_group, mlp_group
from hubdefend.errors import NotAModelError, UnknownArchitectureError, WeightsMismatchError
from hubdefend.neurons import NeuronGroup


@register_adapter
class TransformersAdapter(Adapter):
    family = "transformers"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        try:
            from transformers import PreTrainedModel
        except ImportError:  # pragma: no cover - transformers is a dependency
            return False
        return isinstance(model, PreTrainedModel)

    def architecture(self, model: nn.Module) -> str:
        return type(model).__name__

    def transformer_units(self, model: nn.Module) -> list[NeuronGroup]:
        # BERT-style blocks (ViT, DeiT, BEiT, Swin, ...): `intermediate` -> `output.dense`, and
        # `attention.attention` (heads) -> `attention.output.dense`.
        groups = []
        for name, module in model.named_modules():
            dense = getattr(getattr(module, "output", None), "dense", None)
            if hasattr(module, "intermediate") and isinstance(dense, nn.Linear):
                groups.append(mlp_group(_join(name, "output.dense"), dense))
            self_attention = getattr(module, "attention", None)
            num_heads = getattr(self_attention, "num_attention_heads", None)
            if (
                isinstance(num_heads, int)
                and isinstance(dense, nn.Linear)
                and not hasattr(module, "intermediate")
            ):
                groups.append(head_group(_join(name, "output.dense"), dense, num_heads))
        return groups

    # -- layout ---------------------------------------------------------------------------------
    @classmethod
    def can_load(cls, config: dict[str, Any]) -> bool:
        return "model_type" in config

    def save(self, model: nn.Module, directory: Path, *, image_processor: Any = None) -> None:
        model.save_pretrained(directory, safe_serialization=True)
        if image_processor is not None:
            image_processor.save_pretrained(directory)

    def load(self, directory: Path, config: dict[str, Any]) -> LoadedModel:
        from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

        if not (directory / "model.safetensors").is_file():
            raise NotAModelError(
                f"{directory} has a transformers config.json but no model.safetensors. hubdefend loads "
                "safetensors weights only; save the model with save_pretrained(..., safe_serialization=True)."
            )
        try:
            model_config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
        except (ValueError, KeyError) as exc:
            raise UnknownArchitectureError(
                f"{directory}/config.json has model_type {config.get('model_type')!r}, which transformers "
                f"cannot build without remote code: {str(exc).splitlines()[0]} Upgrade transformers, or check "
                "the config."
            ) from exc
        try:
            model = AutoModelForImageClassification.from_pretrained(
                directory, config=model_config, trust_remote_code=False
            )
        except (RuntimeError, ValueError, OSError, SafetensorError) as exc:  # shapes, or a corrupt file
            raise WeightsMismatchError(
                f"The weights in {directory}/model.safetensors do not fit the model that config.json "
                f"describes: {str(exc).splitlines()[0]} Check that the config and weights belong together."
            ) from exc
        processor = None
        if (directory / "preprocessor_config.json").is_file():
            processor = AutoImageProcessor.from_pretrained(directory, trust_remote_code=False)
        architecture = (config.get("architectures") or [type(model).__name__])[0]
        return LoadedModel(
            model.eval(), "transformers", architecture, config, processor, source=str(directory)
        )
