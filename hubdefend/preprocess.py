"""How a model wants its images: resize/crop to its input size, then normalise with its mean/std.

The pipeline is raw image -> resize/crop -> pixels in [0, 1] -> [trigger] -> normalize, so that
triggers land in pixel space, as the field's evaluation conventions require.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torchvision import transforms

from hubdefend.errors import DataError

_INTERPOLATION = {
    "bilinear": transforms.InterpolationMode.BILINEAR,
    "bicubic": transforms.InterpolationMode.BICUBIC,
    "nearest": transforms.InterpolationMode.NEAREST,
}


@dataclass(frozen=True)
class Preprocessing:
    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    crop_mode: str = "center"

    @classmethod
    def from_timm(cls, model_or_cfg: Any) -> Preprocessing:
        """From a timm model (or its pretrained config), as ``resolve_model_data_config`` says."""
        from timm.data import resolve_data_config, resolve_model_data_config

        if isinstance(model_or_cfg, dict):
            cfg = resolve_data_config(pretrained_cfg=model_or_cfg)
        else:
            cfg = resolve_model_data_config(model_or_cfg)
        return cls(
            tuple(cfg["input_size"]),
            tuple(cfg["mean"]),
            tuple(cfg["std"]),
            cfg.get("interpolation", "bilinear"),
            float(cfg.get("crop_pct") or 1.0),
            cfg.get("crop_mode", "center"),
        )

    @classmethod
    def from_image_processor(cls, processor: Any) -> Preprocessing:
        """From a transformers image processor (resize to ``size``, optional center crop)."""
        size = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
        size = size or processor.size
        height = size.get("height") or size.get("shortest_edge")
        width = size.get("width") or size.get("shortest_edge")
        mean = tuple(processor.image_mean) if getattr(processor, "do_normalize", True) else (0.0, 0.0, 0.0)
        std = tuple(processor.image_std) if getattr(processor, "do_normalize", True) else (1.0, 1.0, 1.0)
        resample = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(
            int(getattr(processor, "resample", 2)), "bilinear"
        )
        return cls((3, int(height), int(width)), mean, std, resample, 1.0, "center")

    @classmethod
    def from_model(cls, model: Any, image_processor: Any = None) -> Preprocessing:
        if image_processor is not None:
            return cls.from_image_processor(image_processor)
        if getattr(model, "pretrained_cfg", None):
            return cls.from_timm(model)
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "image_size"):
            size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
            warnings.warn(
                "No image processor: using the config's image size with ImageNet mean/std.", stacklevel=2
            )
            return cls((getattr(config, "num_channels", 3), size, size))
        raise DataError(
            f"Cannot tell how {type(model).__name__} preprocesses images. Pass preprocessing=Preprocessing(...)."
        )

    def pixel_transform(self):
        """PIL image -> float tensor in [0, 1] at the model's input size (no normalisation)."""
        _, height, width = self.input_size
        interpolation = _INTERPOLATION.get(self.interpolation, transforms.InterpolationMode.BILINEAR)
        scaled = (int(height / self.crop_pct), int(width / self.crop_pct))
        resize = transforms.Resize(scaled[0] if height == width else scaled, interpolation=interpolation)
        return transforms.Compose([resize, transforms.CenterCrop((height, width)), transforms.ToTensor()])

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: dict) -> Preprocessing:
        return cls(
            **{
                **payload,
                "input_size": tuple(payload["input_size"]),
                "mean": tuple(payload["mean"]),
                "std": tuple(payload["std"]),
            }
        )
