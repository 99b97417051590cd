"""How a model wants its images: channels, resize/crop to its input size, then its mean/std.

The pipeline is raw image -> RGB or grey (the model's channel count) -> resize/crop exactly as the
model's own transforms do -> pixels in [0, 1] -> [trigger, applied by callers] -> `normalize`.
Triggers land in pixel space, as the field's evaluation conventions require.

Three resize conventions exist in practice and differ by a grey level or a one-pixel crop offset,
which matters for pixel-exact triggers, so `Preprocessing.style` names the one to follow:

- ``"timm"``: timm's eval transform (torchvision transforms on PIL images: PIL resampling, crop
  offsets rounded half to even). Built from timm's own code, so it is identical by construction.
- ``"transformers"``: transformers' default (torchvision-backend) image processors: the PIL image
  becomes a uint8 tensor, resized by ``torchvision.transforms.v2.functional.resize`` with
  antialiasing; crop offsets floored, zero padding where the crop is larger than the image.
- ``"transformers-pil"``: transformers' PIL-backend processors: PIL resampling, floored crop offsets.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from PIL import Image

from hubdefend.errors import DataError

STYLES = ("timm", "transformers", "transformers-pil")
CROP_MODES = ("center", "squash", "border")
# PIL resample codes, as transformers image processors store them.
_PIL_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_PIL_RESAMPLE_CODES = {name: code for code, name in _PIL_RESAMPLE_NAMES.items()}
# A crop_pct derived from two integer sizes may sit a hair under the integer it came from.
_FLOOR_SLACK = 1e-6


@dataclass(frozen=True)
class Preprocessing:
    """How one model turns an image into its input tensor.

    Attributes:
        input_size: ``(C, H, W)`` of the model input; C is 1 (grey) or 3 (RGB).
        mean: per-channel mean subtracted from pixels in [0, 1].
        std: per-channel standard deviation the centred pixels are divided by.
        interpolation: ``bilinear``, ``bicubic``, ``nearest``, ``lanczos``, ``box`` or ``hamming``.
        crop_pct: share of the resized image kept by the crop (1.0: no crop margin).
        crop_mode: ``center`` (keep aspect, resize the short edge, crop), ``squash`` (resize both
            edges, crop) or ``border`` (timm only: fit the long edge, pad).
        style: whose resize code to follow: ``timm``, ``transformers`` or ``transformers-pil``.
    """

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    crop_mode: str = "center"
    style: str = "timm"

    def __post_init__(self) -> None:
        size = tuple(int(v) for v in self.input_size)
        if len(size) != 3 or size[0] not in (1, 3) or min(size[1:]) < 1:
            raise DataError(
                f"input_size={self.input_size!r}: give (channels, height, width) with 1 or 3 channels."
            )
        channels = size[0]
        mean, std = _per_channel(self.mean, channels, "mean"), _per_channel(self.std, channels, "std")
        if any(s <= 0 for s in std):
            raise DataError(f"std={std}: every standard deviation must be positive.")
        if self.style not in STYLES:
            raise DataError(f"style={self.style!r}: choose one of {', '.join(STYLES)}.")
        if self.crop_mode not in CROP_MODES or (self.crop_mode == "border" and self.style != "timm"):
            raise DataError(
                f"crop_mode={self.crop_mode!r}: choose center or squash (border only with style='timm')."
            )
        if self.interpolation not in _PIL_RESAMPLE_CODES:
            raise DataError(
                f"interpolation={self.interpolation!r}: choose one of {', '.join(_PIL_RESAMPLE_CODES)}."
            )
        if not self.crop_pct or float(self.crop_pct) <= 0:
            raise DataError(
                f"crop_pct={self.crop_pct!r}: give the positive share of the image kept, e.g. 0.875."
            )
        # Frozen: normalise field types through object.__setattr__ so equality and JSON are stable.
        object.__setattr__(self, "input_size", size)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "crop_pct", float(self.crop_pct))

    # -- constructors -------------------------------------------------------------------------------

    @classmethod
    def from_timm(cls, model_or_pretrained_cfg: Any) -> Preprocessing:
        """Read a timm model's eval preprocessing, as ``timm.data.resolve_model_data_config`` resolves it.

        Args:
            model_or_pretrained_cfg: a timm model, or its ``pretrained_cfg`` (dict or ``PretrainedCfg``).
        """
        from timm.data import resolve_data_config, resolve_model_data_config

        cfg_in = model_or_pretrained_cfg
        if hasattr(cfg_in, "to_dict") and not isinstance(cfg_in, torch.nn.Module):
            cfg_in = cfg_in.to_dict()
        if isinstance(cfg_in, dict):
            cfg = resolve_data_config(pretrained_cfg=cfg_in)
        elif isinstance(cfg_in, torch.nn.Module):
            cfg = resolve_model_data_config(cfg_in)
        else:
            raise DataError(
                f"from_timm needs a timm model or its pretrained_cfg, not {type(cfg_in).__name__}."
            )
        return cls(
            input_size=tuple(cfg["input_size"]),
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
            interpolation=cfg.get("interpolation") or "bilinear",
            # timm's eval transform treats a missing crop_pct as its default (0.875).
            crop_pct=float(cfg.get("crop_pct") or _timm_default_crop_pct()),
            crop_mode=cfg.get("crop_mode") or "center",
            style="timm",
        )

    @classmethod
    def from_image_processor(cls, processor: Any, *, num_channels: int = 3) -> Preprocessing:
        """Read a transformers image processor (size, crop, resample, rescale, mean/std).

        Args:
            processor: a transformers image processor (torchvision or PIL backend).
            num_channels: the model's input channels (``config.num_channels``).

        Raises:
            DataError: the processor does not resize to one fixed size.
        """
        name = type(processor).__name__
        if getattr(processor, "do_resize", True) is False:
            raise DataError(
                f"{name} does not resize images, so the model's input size is unknown. Pass "
                "preprocessing=Preprocessing(input_size=(C, H, W), mean=..., std=...)."
            )
        size = _as_dict(processor.size)
        crop = _as_dict(processor.crop_size) if getattr(processor, "do_center_crop", False) else None
        resample = getattr(processor, "resample", None)
        interpolation = (
            _PIL_RESAMPLE_NAMES.get(int(resample), "bilinear") if resample is not None else "bilinear"
        )

        if "ConvNext" in name and size.get("shortest_edge"):
            # ConvNext's own resize: below 384, short edge to edge/crop_pct then a square centre crop;
            # at 384 and above, warp to a square with no crop.
            edge = int(size["shortest_edge"])
            crop_pct = float(getattr(processor, "crop_pct", None) or 224 / 256)
            hw, crop_pct, crop_mode = (
                ((edge, edge), crop_pct, "center") if edge < 384 else ((edge, edge), 1.0, "squash")
            )
        elif size.get("height") and size.get("width"):
            resized = (int(size["height"]), int(size["width"]))
            hw, crop_pct = resized, 1.0
            if crop:
                hw = (int(crop["height"]), int(crop["width"]))
                crop_pct = hw[0] / resized[0]
                if tuple(_floor(v / crop_pct) for v in hw) != resized:
                    raise DataError(
                        f"{name} resizes to {resized} and crops {hw}: the crop is not the same share of both "
                        "edges, which hubdefend cannot express. Pass preprocessing=Preprocessing(...)."
                    )
            crop_mode = "squash"
        elif size.get("shortest_edge") and not size.get("longest_edge") and crop:
            edge = int(size["shortest_edge"])
            hw = (int(crop["height"]), int(crop["width"]))
            crop_pct, crop_mode = min(hw) / edge, "center"
        else:
            raise DataError(
                f"{name} resizes with size={size} and crop_size={crop}, which gives images of varying size. "
                "Pass preprocessing=Preprocessing(input_size=(C, H, W), ...) with the size the model expects."
            )
        if getattr(processor, "crop_pct", None) is not None and "ConvNext" not in name:
            warnings.warn(
                f"{name} has crop_pct={processor.crop_pct}, which hubdefend reads only for ConvNext processors; "
                "check the preprocessing or pass preprocessing=Preprocessing(...).",
                stacklevel=2,
            )

        if getattr(processor, "do_normalize", True):
            mean = _per_channel(processor.image_mean, num_channels, "image_mean")
            std = _per_channel(processor.image_std, num_channels, "image_std")
        else:
            mean, std = (0.0,) * num_channels, (1.0,) * num_channels
        # Pixels here are in [0, 1]; the processor multiplies 0..255 values by rescale_factor (or
        # not at all). Fold any other scale into mean/std so the model sees the same numbers.
        scale = 255.0 * (float(processor.rescale_factor) if getattr(processor, "do_rescale", True) else 1.0)
        if abs(scale - 1.0) > 1e-9:
            mean, std = tuple(m / scale for m in mean), tuple(s / scale for s in std)

        backend = getattr(processor, "backend", None)
        if backend is None:  # transformers 4.x: "Fast" processors are the torchvision ones
            backend = "torchvision" if name.endswith("Fast") else "pil"
        return cls(
            input_size=(num_channels, *hw),
            mean=mean,
            std=std,
            interpolation=interpolation,
            crop_pct=crop_pct,
            crop_mode=crop_mode,
            style="transformers-pil" if backend == "pil" else "transformers",
        )

    @classmethod
    def from_model(
        cls, model: Any, image_processor: Any = None, *, fallback: Preprocessing | None = None
    ) -> Preprocessing:
        """The preprocessing a model was trained with.

        Args:
            model: a timm model, a transformers image classifier, or any torch module.
            image_processor: the transformers model's image processor, when there is one.
            fallback: what to use for a model that does not say (a plain torch module).

        Raises:
            DataError: the model does not say and no fallback was given.
        """
        config = getattr(model, "config", None)
        if image_processor is not None:
            channels = int(getattr(config, "num_channels", 3) or 3)
            return cls.from_image_processor(image_processor, num_channels=channels)
        if getattr(model, "pretrained_cfg", None):
            return cls.from_timm(model)
        if fallback is not None:
            return fallback
        if config is not None and getattr(config, "image_size", None):
            size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
            channels = int(getattr(config, "num_channels", 3) or 3)
            warnings.warn(
                f"{type(model).__name__} came without an image processor: resizing to {size}x{size} with the "
                "ImageNet mean/std, which may not be what it was trained with. Pass image_processor=... "
                "(AutoImageProcessor.from_pretrained) or preprocessing=Preprocessing(...).",
                stacklevel=2,
            )
            return cls(input_size=(channels, size, size), style="transformers")
        raise DataError(
            f"Cannot tell how {type(model).__name__} preprocesses images (it is neither a timm nor a "
            "transformers model). Pass preprocessing=Preprocessing(input_size=(C, H, W), mean=..., std=...)."
        )

    # -- serialisation ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        payload = asdict(self)
        for key in ("input_size", "mean", "std"):
            payload[key] = list(payload[key])
        return payload

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> Preprocessing:
        """Inverse of `to_dict`; missing keys take their defaults (older reports have no ``style``)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(payload) - known)
        if unknown:
            raise DataError(f"Unknown preprocessing keys {unknown}; known keys: {sorted(known)}.")
        values = dict(payload)
        for key in ("input_size", "mean", "std"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    # -- the pipeline -------------------------------------------------------------------------------

    def pixel_transform(self) -> PixelTransform:
        """PIL image (or uint8/float array or tensor) -> float tensor in [0, 1] at the model's input size."""
        return PixelTransform(self)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` per channel, for ``C x H x W`` or ``N x C x H x W`` pixels on any device."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return (x - mean) / std


class PixelTransform:
    """A picklable callable (DataLoader workers) that turns one image into model-size pixels in [0, 1].

    Grey images for an RGB model are converted, with one warning per transform.
    """

    def __init__(self, preprocessing: Preprocessing) -> None:
        self.preprocessing = preprocessing
        self._warned_grey = False
        self._timm = _timm_resize(preprocessing) if preprocessing.style == "timm" else None

    def __call__(self, image: Any) -> torch.Tensor:
        channels, height, width = self.preprocessing.input_size
        if isinstance(image, torch.Tensor) and image.is_floating_point():
            ready = self._float_tensor(image)
            if ready is not None:
                return ready
            image = Image.fromarray(_float_to_uint8(image))
        elif isinstance(image, (torch.Tensor, np.ndarray)):
            image = Image.fromarray(_array_to_hwc_uint8(image))
        if not isinstance(image, Image.Image):
            raise DataError(
                f"Cannot read an image from {type(image).__name__}: give PIL images, uint8 arrays, or float "
                "tensors in [0, 1]."
            )
        image = self._to_channels(image)
        if self._timm is not None:
            return self._timm(image)
        return _transformers_resize(image, self.preprocessing)

    def _to_channels(self, image: Image.Image) -> Image.Image:
        mode = "L" if self.preprocessing.input_size[0] == 1 else "RGB"
        if image.mode == mode:
            return image
        if mode == "RGB" and image.mode in ("L", "LA", "1", "I", "I;16", "F") and not self._warned_grey:
            self._warned_grey = True
            warnings.warn(
                "Grey images are converted to RGB (the grey value in all three channels) for this "
                "3-channel model.",
                stacklevel=3,
            )
        if image.mode in ("I", "I;16", "F"):
            # 16-bit and float grey: PIL's convert would clip, so rescale to 8 bits first.
            array = np.asarray(image, dtype=np.float64)
            top = 65535.0 if image.mode.startswith("I") and array.max() > 255 else 255.0
            image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        return image.convert(mode)

    def _float_tensor(self, image: torch.Tensor) -> torch.Tensor | None:
        """A float tensor already at model size passes through; others are resized like images."""
        channels, height, width = self.preprocessing.input_size
        if image.dim() == 2:
            image = image.unsqueeze(0)
        if image.dim() != 3:
            raise DataError(f"An image tensor must be C x H x W; got shape {tuple(image.shape)}.")
        low, high = float(image.min()), float(image.max())
        if low < -1e-6 or high > 1 + 1e-6:
            raise DataError(
                f"Float image tensors must hold pixels in [0, 1] (got values in [{low:.3g}, {high:.3g}]); "
                "give unnormalised images: hubdefend normalises with the model's mean/std itself."
            )
        if tuple(image.shape[1:]) != (height, width):
            return None
        if image.shape[0] == channels:
            return image.float()
        if image.shape[0] == 1 and channels == 3:
            if not self._warned_grey:
                self._warned_grey = True
                warnings.warn("Grey images are converted to RGB for this 3-channel model.", stacklevel=3)
            return image.float().expand(3, -1, -1).contiguous()
        if image.shape[0] == 3 and channels == 1:
            return _luma(image.float())
        raise DataError(
            f"An image tensor with {image.shape[0]} channels does not fit a {channels}-channel model."
        )


def _timm_resize(preprocessing: Preprocessing):
    """timm's own eval transform with its final Normalize removed (pixels stay in [0, 1])."""
    from timm.data.transforms_factory import transforms_imagenet_eval
    from torchvision import transforms

    _, height, width = preprocessing.input_size
    full = transforms_imagenet_eval(
        img_size=(height, width),
        crop_pct=preprocessing.crop_pct,
        crop_mode=preprocessing.crop_mode,
        interpolation=preprocessing.interpolation,
        mean=preprocessing.mean,  # the border mode pads with the mean colour
        std=preprocessing.std,
    )
    steps = list(full.transforms)
    if not isinstance(steps[-1], transforms.Normalize):
        raise DataError(f"timm's eval transform changed shape ({steps}); hubdefend needs an update.")
    return transforms.Compose(steps[:-1])


def _transformers_resize(image: Image.Image, preprocessing: Preprocessing) -> torch.Tensor:
    _, height, width = preprocessing.input_size
    if preprocessing.crop_mode == "squash":
        size = (_floor(height / preprocessing.crop_pct), _floor(width / preprocessing.crop_pct))
    else:
        short = _floor(min(height, width) / preprocessing.crop_pct)
        w, h = image.size
        # transformers' get_resize_output_image_size(default_to_square=False)
        size = (int(short * h / w), short) if w <= h else (short, int(short * w / h))
    if preprocessing.style == "transformers-pil":
        resized = image.resize((size[1], size[0]), resample=_PIL_RESAMPLE_CODES[preprocessing.interpolation])
        pixels = _pil_to_uint8_chw(resized)
    else:
        from torchvision.transforms.v2 import functional as tvf

        pixels = tvf.resize(
            _pil_to_uint8_chw(image),
            list(size),
            interpolation=_tensor_interpolation(preprocessing.interpolation),
            antialias=True,
        )
    return _floor_center_crop(pixels, height, width).float().div(255.0)


def _floor_center_crop(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """transformers' centre crop: zero padding where the image is smaller, floored offsets."""
    h, w = pixels.shape[-2:]
    if height > h or width > w:
        pad_h, pad_w = max(0, height - h), max(0, width - w)
        pixels = torch.nn.functional.pad(pixels, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
        h, w = pixels.shape[-2:]
    top, left = (h - height) // 2, (w - width) // 2
    return pixels[..., top : top + height, left : left + width]


def _tensor_interpolation(name: str):
    from torchvision.transforms import InterpolationMode

    # transformers maps PIL NEAREST to NEAREST_EXACT (PIL's pixel-centre rule).
    return {
        "nearest": InterpolationMode.NEAREST_EXACT,
        "bilinear": InterpolationMode.BILINEAR,
        "bicubic": InterpolationMode.BICUBIC,
        "lanczos": InterpolationMode.LANCZOS,
        "box": InterpolationMode.BOX,
        "hamming": InterpolationMode.HAMMING,
    }[name]


def _pil_to_uint8_chw(image: Image.Image) -> torch.Tensor:
    array = np.array(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _array_to_hwc_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating):
            return _float_to_uint8(torch.from_numpy(np.ascontiguousarray(array)))
        raise DataError(f"Image arrays must be uint8 (0..255) or float in [0, 1]; got {array.dtype}.")
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)  # C x H x W, as torch stores images
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[:, :, 0]
    return np.ascontiguousarray(array)


def _float_to_uint8(image: torch.Tensor) -> np.ndarray:
    array = image.detach().cpu().float().clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    if array.ndim == 3 and array.shape[0] in (1, 3):
        array = array.transpose(1, 2, 0)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[:, :, 0]
    return np.ascontiguousarray(array)


def _luma(rgb: torch.Tensor) -> torch.Tensor:
    # ITU-R 601-2, the weights PIL's convert("L") uses.
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=rgb.dtype).view(3, 1, 1)
    return (rgb * weights).sum(0, keepdim=True)


def _per_channel(values: Any, channels: int, name: str) -> tuple[float, ...]:
    if isinstance(values, (int, float)):
        values = [values]
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        values = values * channels
    if channels == 1 and len(values) == 3:
        # A grey model with RGB statistics: PIL's grey weights give the equivalent single value.
        values = (0.299 * values[0] + 0.587 * values[1] + 0.114 * values[2],)
    if len(values) != channels:
        raise DataError(f"{name}={values} has {len(values)} values but the model has {channels} channels.")
    return values


def _as_dict(size: Any) -> dict[str, Any]:
    if size is None:
        return {}
    if isinstance(size, int):
        return {"height": size, "width": size}
    if isinstance(size, dict):
        return {k: v for k, v in size.items() if v is not None}
    return {k: v for k, v in vars(size).items() if v is not None and not k.startswith("_")}


def _floor(value: float) -> int:
    return math.floor(value + _FLOOR_SLACK)


def _timm_default_crop_pct() -> float:
    from timm.data import DEFAULT_CROP_PCT

    return float(DEFAULT_CROP_PCT)
