"""Real architectures for the coverage tests: timm, transformers and torchvision, built offline.

Also the independent oracle of what a normalization layer is: structural, not hubdefend's class
table, so a norm class that hubdefend does not know shows up as a miss.
"""

from __future__ import annotations

import random
import warnings

import torch
from torch import nn

TIMM_SAMPLE_SEED = 0
TIMM_SAMPLE_SIZE = 100
TIMM_MAX_PARAMS = 30_000_000  # keeps the suite inside its CPU budget; bigger ones are listed, not hidden
INPUT_SIZE = 64

# Layers that hold norm-like parameters but are deliberately not neuron groups, with the reason.
EXCLUDED_NORM_CLASSES = {
    # x + gamma * (x * N(x)) + beta mixes channels through N(x); gamma = 0 does not silence a channel.
    "GlobalResponseNorm": "channel-mixing response norm",
}
_CHILD_OK = (nn.Identity, nn.Dropout)


def _is_activation(module: nn.Module) -> bool:
    return type(module).__module__.startswith(("torch.nn.modules.activation", "timm.layers.activations")) or (
        "activation" in type(module).__module__
    )


def oracle_is_norm(module: nn.Module) -> bool:
    """A normalization layer, by structure: a torch norm base class, or a class named *Norm* that
    owns a per-channel parameter/buffer and has no children but an activation or dropout."""
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
        return True
    if "Norm" not in type(module).__name__:
        return False
    own = [t for t in [*module._parameters.values(), *module._buffers.values()] if t is not None]
    if not any(t.ndim == 1 for t in own):
        return False
    return all(isinstance(c, _CHILD_OK) or _is_activation(c) for c in module.children())


def oracle_norm_names(model: nn.Module) -> set[str]:
    return {
        name
        for name, module in model.named_modules()
        if oracle_is_norm(module) and type(module).__name__ not in EXCLUDED_NORM_CLASSES
    }


def timm_sample() -> tuple[list[str], list[str]]:
    """A fixed, seeded sample of timm architectures small enough for CPU CI, and the ones passed
    over because they are bigger than `TIMM_MAX_PARAMS`."""
    import timm

    names = timm.list_models()
    random.Random(TIMM_SAMPLE_SEED).shuffle(names)
    chosen, too_big = [], []
    for name in names:
        if len(chosen) == TIMM_SAMPLE_SIZE:
            break
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = timm.create_model(name, pretrained=False)
        params = sum(p.numel() for p in model.parameters())
        (chosen if params <= TIMM_MAX_PARAMS else too_big).append(name)
    return chosen, too_big


def build_timm(name: str) -> tuple[nn.Module, torch.Tensor]:
    """A timm model with random weights and an input it accepts: 64x64 where the architecture
    takes it, else its own default input size."""
    import timm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kwargs in ({"img_size": INPUT_SIZE}, {}):
            torch.manual_seed(0)
            try:
                model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
            except TypeError:  # the architecture takes no img_size
                continue
            cfg = model.pretrained_cfg
            channels, *default_size = cfg["input_size"]
            size = default_size if cfg.get("fixed_input_size") or not kwargs else [INPUT_SIZE, INPUT_SIZE]
            candidates = [size] if size == default_size else [size, default_size]
            for hw in candidates:
                x = torch.randn(2, channels, *hw)
                try:
                    with torch.no_grad():
                        model(x)
                except Exception:  # noqa: BLE001
                    continue  # e.g. halo / window attention that needs its own size
                return model, x
    raise RuntimeError(f"no input size found that {name} accepts")


# Small configs for transformers image classifiers (HUB.md); model types not listed use their
# default config, which is slower but still real.
_VIT_LIKE = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
)
SMALL_TRANSFORMERS_CONFIGS: dict[str, dict] = {
    "vit": _VIT_LIKE,
    "vit_msn": _VIT_LIKE,
    "beit": _VIT_LIKE,
    "data2vec-vision": _VIT_LIKE,
    "ijepa": _VIT_LIKE,
    "deit": {**_VIT_LIKE, "architectures": ["DeiTForImageClassification"]},
    "levit": dict(
        image_size=64,
        hidden_sizes=[16, 32, 48],
        num_attention_heads=[1, 2, 3],
        depths=[1, 1, 1],
        key_dim=[8, 8, 8],
        architectures=["LevitForImageClassification"],
    ),
    "dinov2": {**_VIT_LIKE, "mlp_ratio": 2},
    "dinov2_with_registers": {**_VIT_LIKE, "mlp_ratio": 2},
    "swin": dict(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4),
    "swinv2": dict(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4),
    "donut-swin": dict(
        image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4
    ),
    "resnet": dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"),
    "convnext": dict(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1]),
    "convnextv2": dict(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1]),
    "efficientnet": dict(width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128, image_size=64),
    "mobilenet_v2": dict(depth_multiplier=0.1, image_size=64),
    "mobilenet_v1": dict(depth_multiplier=0.25, image_size=64),
    "bit": dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_groups=4),
    "regnet": dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8),
    "poolformer": dict(num_encoder_blocks=2, depths=[1, 1], hidden_sizes=[8, 16], image_size=64),
    "perceiver": dict(
        architectures=["PerceiverForImageClassificationLearned"],
        d_latents=32,
        num_latents=8,
        num_blocks=1,
        num_self_attends_per_block=1,
        num_self_attention_heads=2,
        num_cross_attention_heads=1,
        image_size=32,
        d_model=32,
    ),
    "timm_wrapper": dict(architecture="test_resnet"),
    "imagegpt": dict(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=65),
    "clip": dict(vision_config=dict(_VIT_LIKE)),
    "metaclip_2": dict(vision_config=dict(_VIT_LIKE)),
    "siglip": dict(vision_config=dict(_VIT_LIKE)),
    "siglip2": dict(
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            patch_size=8,
            num_patches=16,
        )
    ),
}
# Model types that cannot run here, with the reason (printed by the coverage test).
UNBUILDABLE_TRANSFORMERS = {
    "dinat": "needs the natten CUDA/C++ extension",
    "shieldgemma2": "a 2.7B-parameter Gemma-3 language model with a vision tower: too big for CPU CI",
}


def transformers_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    return sorted(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)


def build_transformers(model_type: str) -> tuple[nn.Module, torch.Tensor]:
    from transformers import AutoConfig, AutoModelForImageClassification

    torch.manual_seed(0)
    overrides = dict(SMALL_TRANSFORMERS_CONFIGS.get(model_type, {}))
    config = AutoConfig.for_model(model_type, num_labels=10, **overrides)
    model = AutoModelForImageClassification.from_config(config).eval()
    if model_type == "siglip2":  # NaFlex: pre-patchified pixels with their grid shapes
        patches, dim = 16, 3 * 8 * 8
        return model, {
            "pixel_values": torch.randn(2, patches, dim),
            "pixel_attention_mask": torch.ones(2, patches, dtype=torch.long),
            "spatial_shapes": torch.tensor([[4, 4], [4, 4]]),
        }
    if model_type == "imagegpt":  # reads colour-cluster ids, not pixels
        return model, torch.randint(0, config.vocab_size - 1, (2, config.n_positions))
    vision = getattr(config, "vision_config", config)
    size = getattr(vision, "image_size", 64)
    size = size if isinstance(size, int) else size[0]
    channels = getattr(vision, "num_channels", 3)
    return model, torch.randn(2, channels, size, size)


TORCHVISION_MODELS = [
    "resnet18",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "convnext_tiny",
    "regnet_y_400mf",
    "shufflenet_v2_x0_5",
]


def build_torchvision(name: str, *, frozen_bn: bool = False) -> tuple[nn.Module, torch.Tensor]:
    import torchvision

    torch.manual_seed(0)
    kwargs = {"norm_layer": torchvision.ops.FrozenBatchNorm2d} if frozen_bn else {}
    model = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs).eval()
    return model, torch.randn(2, 3, 64, 64)


def logits(model: nn.Module, x: torch.Tensor | dict) -> torch.Tensor:
    out = model(**x) if isinstance(x, dict) else model(x)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out[0]  # PPLCNet: last_hidden_state
