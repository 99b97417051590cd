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

# Two generations of transformers' vision blocks. transformers 5 (ViT, DeiT, DINOv2, BEiT, Swin, CLIP,
# SigLIP...): `XAttention` holds q_proj/k_proj/v_proj and o_proj (or out_proj), `XMLP` holds fc1/fc2.
# BERT-style (Data2Vec-vision, MobileViT, Swin v2, PVT, CvT, Perceiver): `XAttention` holds the heads
# in `attention` or `self` and projects them with `output.dense`; the layer holds `intermediate` and
# `output.dense`.
_MLP_PAIRS = (("fc1", "fc2"), ("dense1", "dense2"), ("up_proj", "down_proj"))
_QUERIES = ("q_proj", "query", "qkv")
_OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "proj")


def _linear(module: nn.Module, path: str) -> nn.Linear | None:
    try:
        child = module.get_submodule(path)
    except AttributeError:
        return None
    return child if isinstance(child, nn.Linear) else None


def _num_heads(module: nn.Module | None) -> int | None:
    for attr in ("num_attention_heads", "num_heads"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _mlp_output(module: nn.Module) -> str | None:
    """The path (under ``module``) of the projection whose inputs are ``module``'s MLP hidden units."""
    for up, down in _MLP_PAIRS:
        up_layer, down_layer = _linear(module, up), _linear(module, down)
        if (
            up_layer is not None
            and down_layer is not None
            and up_layer.out_features == down_layer.in_features
        ):
            return down
    if hasattr(module, "intermediate") and _linear(module, "output.dense") is not None:
        return "output.dense"
    return None


def _heads_output(module: nn.Module) -> tuple[str, int] | None:
    """(path of the projection whose input is the concatenated heads, number of heads), if
    ``module`` is an attention layer. torch's nn.MultiheadAttention (SigLIP's pooling head) is not
    one: it applies out_proj's weight functionally, so no hook on out_proj ever runs."""
    if isinstance(module, nn.MultiheadAttention):
        return None
    num_heads = _num_heads(module)
    if num_heads is not None and any(_linear(module, query) is not None for query in _QUERIES):
        for projection in _OUTPUT_PROJECTIONS:
            layer = _linear(module, projection)
            if layer is not None and layer.in_features % num_heads == 0:
                return projection, num_heads
    if hasattr(module, "intermediate"):  # a BERT-style layer, not its attention
        return None
    for child in ("attention", "self"):
        num_heads = _num_heads(getattr(module, child, None))
        layer = _linear(module, "output.dense")
        if num_heads is not None and layer is not None and layer.in_features % num_heads == 0:
            return "output.dense", num_heads
    return None


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
        groups = []
        for name, module in model.named_modules():
            mlp = _mlp_output(module)
            if mlp is not None:
                groups.append(mlp_group(_join(name, mlp), module.get_submodule(mlp)))
            heads = _heads_output(module)
            if heads is not None:
                projection, num_heads = heads
                groups.append(
                    head_group(_join(name, projection), module.get_submodule(projection), num_heads)
                )
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
