"""Backdoor attack triggers as small, serialisable specs.

Conventions follow BackdoorBench (all-to-one attacks, target class 0 by default):

* ``badnets``: a white 3x3 patch in the bottom-right corner at 32x32, scaled with the resolution.
* ``blended``: ``(1 - alpha) * x + alpha * P`` with alpha 0.2 and P an image or seeded noise.
* ``wanet``: a fixed smooth warp with s=0.5, k=4 (plus its training-time "noise mode").
* ``sig``: a horizontal sinusoid with delta 40/255 and f=6; clean-label.
* ``image``: a user trigger given as an image plus a mask.

Triggers act on pixels in [0, 1] (``N x C x H x W`` or ``C x H x W``), before the model's normalization,
and keep shape, device and dtype. A trigger round-trips through its spec string ``name:key=value,...``
(:meth:`Trigger.to_spec`) and its JSON dict (:meth:`Trigger.to_dict`) via :func:`parse_trigger`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from hubdefend.errors import DataError, TriggerSpecError

__all__ = [
    "TRIGGERS",
    "SIG",
    "BadNets",
    "Blended",
    "ImageTrigger",
    "Trigger",
    "WaNet",
    "parse_trigger",
    "register_trigger",
]

TRIGGERS: dict[str, type[Trigger]] = {}
"""Registered trigger classes by spec name; add one with :func:`register_trigger`."""

#: Resolution at which BadNets sizes and margins are given and Blended noise is generated.
BASE_RESOLUTION = 32

_COLORS: dict[str, tuple[float, float, float]] = {
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
    "grey": (0.5, 0.5, 0.5),
    "gray": (0.5, 0.5, 0.5),
}
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L")
_SCALARS = (bool, int, float, str)


# --------------------------------------------------------------------------------------------------
# Base class and registry


@dataclass(frozen=True, kw_only=True)
class Trigger:
    """Base class of every trigger: a frozen dataclass whose fields are its spec options.

    Subclasses set the class attribute ``name`` (the spec name), declare options as dataclass fields
    of type ``int``, ``float``, ``bool`` or ``str`` (optionally ``| None``), check them in
    :meth:`validate` and implement :meth:`apply_batch`.
    """

    name: ClassVar[str] = ""
    clean_label: ClassVar[bool] = False
    target: int = 0

    def __post_init__(self) -> None:
        kinds = _field_kinds(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            object.__setattr__(self, field.name, _check_type(self, field.name, value, kinds[field.name]))
        if self.target < 0:
            self._fail(f"target must be a class index >= 0, not {self.target}.")
        self.validate()

    # -- to override -------------------------------------------------------------------------------

    def validate(self) -> None:
        """Check (and normalise with :meth:`_set`) the options; raise via :meth:`_fail` when invalid."""

    def apply_batch(self, x: torch.Tensor) -> torch.Tensor:
        """Apply to a float32/float64 batch ``N x C x H x W``; the result is clamped by :meth:`apply`."""
        raise NotImplementedError

    # -- public API --------------------------------------------------------------------------------

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Stamp the trigger on images.

        Args:
            x: pixels in [0, 1], ``N x C x H x W`` or a single ``C x H x W`` image, any float dtype and
                device.

        Returns:
            The triggered pixels, clamped to [0, 1], with the shape, dtype and device of ``x``.

        Raises:
            DataError: ``x`` is not a floating-point 3-D or 4-D tensor.
            TriggerSpecError: a file the trigger needs cannot be read.
        """
        return _batched(x, self.apply_batch)

    @property
    def options(self) -> dict[str, Any]:
        """The option values by name (``target`` last), ``None`` values left out."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "target"}
        values["target"] = self.target
        return {key: value for key, value in values.items() if value is not None}

    def to_dict(self) -> dict[str, Any]:
        """The trigger as a JSON-serialisable dict: ``{"name": ..., option: value, ...}``."""
        return {"name": self.name, **self.options}

    def to_spec(self) -> str:
        """The trigger as a spec string ``name:key=value,...`` that :func:`parse_trigger` reads back.

        Raises:
            TriggerSpecError: a text option (a path) holds a comma or surrounding spaces, which the
                string form cannot carry; use :meth:`to_dict` instead.
        """
        parts = []
        for key, value in self.options.items():
            if isinstance(value, str) and ("," in value or value != value.strip()):
                self._fail(
                    f"{key}={value!r} holds a comma or surrounding spaces, which a spec string cannot "
                    "carry; use to_dict() (JSON) instead."
                )
            parts.append(f"{key}={_format(value)}")
        return f"{self.name}:{','.join(parts)}"

    def __str__(self) -> str:
        return self.to_spec()

    # -- helpers for subclasses --------------------------------------------------------------------

    def _set(self, key: str, value: Any) -> None:
        """Normalise an option from :meth:`validate` (the dataclass is frozen)."""
        object.__setattr__(self, key, value)

    def _fail(self, message: str) -> typing.NoReturn:
        """Raise a :class:`TriggerSpecError` that names the trigger and lists its options."""
        raise TriggerSpecError(f"{self.name}: {message} {_options_text(type(self))}")


def register_trigger(cls: type[Trigger]) -> type[Trigger]:
    """Class decorator that makes a trigger available to :func:`parse_trigger` under ``cls.name``.

    Args:
        cls: a frozen dataclass subclassing :class:`Trigger`, with a unique lowercase ``name``.

    Returns:
        ``cls`` unchanged.

    Raises:
        TriggerSpecError: ``cls`` is not a frozen ``Trigger`` dataclass, its name is empty, malformed or
            taken by another class, or an option has a type a spec cannot carry.
    """
    if not (isinstance(cls, type) and issubclass(cls, Trigger) and dataclasses.is_dataclass(cls)):
        raise TriggerSpecError(f"register_trigger needs a Trigger dataclass, not {cls!r}.")
    if not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise TriggerSpecError(f"register_trigger: {cls.__name__} must be a frozen dataclass.")
    name = cls.name
    if not name or name != name.strip().lower() or any(c in name for c in ":,= "):
        raise TriggerSpecError(
            f"register_trigger: {cls.__name__}.name must be a non-empty lowercase word without ':', ',', "
            f"'=' or spaces, not {name!r}."
        )
    previous = TRIGGERS.get(name)
    if previous is not None and (previous.__module__, previous.__qualname__) != (
        cls.__module__,
        cls.__qualname__,
    ):
        raise TriggerSpecError(
            f"register_trigger: the name {name!r} is taken by {previous.__module__}.{previous.__qualname__}."
        )
    kinds = _field_kinds(cls)
    if "name" in kinds:
        raise TriggerSpecError(f"register_trigger: {cls.__name__} may not have an option called 'name'.")
    TRIGGERS[name] = cls
    return cls


def parse_trigger(spec: str | dict[str, Any] | Trigger) -> Trigger:
    """Build a trigger from a spec string, its JSON dict, or return a trigger as is.

    Args:
        spec: ``"name:key=value,key=value"`` (e.g. ``"badnets:size=3,corner=br,target=0"``), a dict
            ``{"name": "badnets", "size": 3, ...}`` (values typed or as strings), or a :class:`Trigger`.

    Returns:
        The trigger; ``parse_trigger(t.to_spec()) == t`` and ``parse_trigger(t.to_dict()) == t``.

    Raises:
        TriggerSpecError: unknown trigger name, unknown, repeated or malformed option, or an invalid
            value; the message lists what is accepted.
    """
    if isinstance(spec, Trigger):
        return spec
    if isinstance(spec, dict):
        options = dict(spec)
        name = options.pop("name", None)
        if not isinstance(name, str):
            raise TriggerSpecError(
                f"A trigger dict needs a 'name' key naming one of: {', '.join(sorted(TRIGGERS))}; got {spec!r}."
            )
        if any(not isinstance(key, str) for key in options):
            raise TriggerSpecError(f"Trigger dict keys must be strings, got {spec!r}.")
    elif isinstance(spec, str):
        name, options = _split_spec(spec)
    else:
        raise TriggerSpecError(
            f"A trigger spec must be a string like 'badnets:size=3,target=0' or a dict, not {type(spec).__name__}."
        )
    name = name.strip().lower()
    cls = TRIGGERS.get(name)
    if cls is None:
        raise TriggerSpecError(
            f"Unknown trigger {name!r}. Valid triggers: {', '.join(sorted(TRIGGERS))} "
            "(spec form: name:key=value,key=value)."
        )
    kinds = _field_kinds(cls)
    values = {}
    for key, value in options.items():
        if key not in kinds:
            raise TriggerSpecError(f"{name}: unknown option {key!r}. {_options_text(cls)}")
        values[key] = _from_text(cls, key, value, kinds[key]) if isinstance(value, str) else value
    return cls(**values)


def _split_spec(spec: str) -> tuple[str, dict[str, str]]:
    name, _, rest = spec.strip().partition(":")
    if not name.strip():
        raise TriggerSpecError(
            f"Trigger spec {spec!r} names no trigger; write name:key=value,... with a name from: "
            f"{', '.join(sorted(TRIGGERS))}."
        )
    options: dict[str, str] = {}
    for part in rest.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key:
            raise TriggerSpecError(
                f"Trigger spec {spec!r}: {part.strip()!r} is not key=value; write options as key=value "
                "separated by commas, e.g. badnets:size=3,corner=br,target=0."
            )
        if key in options:
            raise TriggerSpecError(f"Trigger spec {spec!r} gives the option {key!r} twice.")
        options[key] = value.strip()
    return name, options


# --------------------------------------------------------------------------------------------------
# Option types


@cache
def _field_kinds(cls: type[Trigger]) -> dict[str, tuple[type, bool]]:
    """Option name -> (scalar type, accepts None), from the dataclass's resolved annotations."""
    hints = typing.get_type_hints(cls)
    kinds = {}
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        optional = False
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            optional = len(args) < len(typing.get_args(hint))
            hint = args[0] if len(args) == 1 else None
        if hint not in _SCALARS:
            raise TriggerSpecError(
                f"{cls.__name__}.{field.name}: trigger options must be int, float, bool or str "
                f"(optionally | None), not {hints[field.name]!r}."
            )
        kinds[field.name] = (hint, optional)
    return kinds


def _type_word(kind: tuple[type, bool]) -> str:
    words = {bool: "true/false", int: "an integer", float: "a number", str: "text"}
    return words[kind[0]]


def _options_text(cls: type[Trigger]) -> str:
    kinds = _field_kinds(cls)
    order = [key for key in kinds if key != "target"] + ["target"]
    described = ", ".join(f"{key} ({_type_word(kinds[key])})" for key in order)
    return f"Valid options for {cls.name}: {described}."


def _from_text(cls: type[Trigger], key: str, text: str, kind: tuple[type, bool]) -> Any:
    scalar, _ = kind
    try:
        if scalar is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes"):
                return True
            if lowered in ("false", "0", "no"):
                return False
            raise ValueError(text)
        if scalar is int:
            return int(text)
        if scalar is float:
            return float(text)
    except ValueError:
        raise TriggerSpecError(
            f"{cls.name}: {key}={text!r} is not {_type_word(kind)}. {_options_text(cls)}"
        ) from None
    return text


def _check_type(trigger: Trigger, key: str, value: Any, kind: tuple[type, bool]) -> Any:
    scalar, optional = kind
    if value is None and optional:
        return None
    ok = isinstance(value, scalar) and not (scalar is not bool and isinstance(value, bool))
    if scalar is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if scalar is int and isinstance(value, float) and value.is_integer():
        value, ok = int(value), True  # JSON may carry 3.0 for 3
    if not ok:
        trigger._fail(f"{key} must be {_type_word(kind)}, not {value!r}.")
    if scalar is float and not math.isfinite(value):
        trigger._fail(f"{key} must be a finite number, not {value!r}.")
    return value


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    return str(value)


# --------------------------------------------------------------------------------------------------
# Tensors and images


def _batched(x: torch.Tensor, fn: typing.Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Run ``fn`` on ``x`` as a float32/float64 batch; give back ``x``'s shape and dtype, clamped."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim not in (3, 4):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        dtype = x.dtype if isinstance(x, torch.Tensor) else None
        raise DataError(
            f"Triggers apply to float pixels in [0, 1] shaped N x C x H x W or C x H x W; got {shape} ({dtype})."
        )
    single = x.ndim == 3
    batch = x[None] if single else x
    work = batch if batch.dtype in (torch.float32, torch.float64) else batch.float()
    out = fn(work).clamp(0.0, 1.0).to(x.dtype)
    return out[0] if single else out


def _check_channels(channels: int, what: str) -> None:
    if channels not in (1, 3):
        raise DataError(f"{what} needs grey (1-channel) or RGB (3-channel) images, got {channels} channels.")


def _load_image(path: str, size: tuple[int, int], channels: int) -> torch.Tensor:
    """An image file as a ``channels x H x W`` float32 tensor in [0, 1], resized bilinearly (cached)."""
    _check_channels(channels, f"The trigger image {path!r}")
    return _load_image_cached(path, size, channels).clone()


@lru_cache(maxsize=64)
def _load_image_cached(path: str, size: tuple[int, int], channels: int) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            raw = bytearray(image.tobytes())
    except FileNotFoundError:
        raise TriggerSpecError(
            f"Trigger image {path!r} does not exist; give the path of an image file."
        ) from None
    except OSError as exc:
        raise TriggerSpecError(
            f"Cannot read trigger image {path!r} ({exc}); give a PNG/JPEG/... file."
        ) from None
    pixels = torch.frombuffer(raw, dtype=torch.uint8).to(torch.float32).div_(255)
    return pixels.view(size[0], size[1], channels).permute(2, 0, 1).contiguous()


def _to_grey(rgb: torch.Tensor) -> torch.Tensor:
    """``3 x H x W`` -> ``1 x H x W`` with PIL's luma weights."""
    weights = torch.tensor(_LUMA, dtype=rgb.dtype).view(3, 1, 1)
    return (rgb * weights).sum(0, keepdim=True).clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------------
# The triggers


@register_trigger
@dataclass(frozen=True, kw_only=True)
class BadNets(Trigger):
    """BadNets: a square patch in a corner; only the patch pixels change.

    ``size`` and ``margin`` are in pixels at 32x32 and scale with the image height
    (``round(size * H / 32)``, at least 1 pixel). The patch is a solid ``color`` (a name or ``#rrggbb``,
    white by default) or the image file ``pattern`` resized to the patch.
    """

    name: ClassVar[str] = "badnets"
    size: int = 3
    corner: str = "br"
    margin: int = 0
    color: str | None = None
    pattern: str | None = None

    CORNERS: ClassVar[tuple[str, ...]] = ("br", "bl", "tr", "tl")

    def validate(self) -> None:
        """Check size, margin, corner and colour."""
        if self.size < 1:
            self._fail(f"size must be an integer >= 1 (pixels at 32x32), not {self.size}.")
        if self.margin < 0:
            self._fail(f"margin must be an integer >= 0 (pixels at 32x32), not {self.margin}.")
        corner = self.corner.strip().lower()
        if corner not in self.CORNERS:
            self._fail(f"corner must be one of {', '.join(self.CORNERS)}, not {self.corner!r}.")
        self._set("corner", corner)
        if self.pattern is not None:
            if self.color is not None:
                self._fail("give either color= or pattern=, not both.")
            if not self.pattern:
                self._fail("pattern must be the path of an image file.")
            return
        color = (self.color or "white").strip().lower()
        if color not in _COLORS and not _is_hex(color):
            self._fail(f"color must be one of {', '.join(_COLORS)} or #rrggbb, not {self.color!r}.")
        self._set("color", color)

    def box(self, height: int, width: int) -> tuple[slice, slice]:
        """The patch's (rows, columns) in an image of ``height x width`` pixels.

        Raises:
            DataError: the patch plus margin does not fit in the image.
        """
        side = max(1, round(self.size * height / BASE_RESOLUTION))
        margin = round(self.margin * height / BASE_RESOLUTION)
        if side + margin > min(height, width):
            raise DataError(
                f"badnets: a {side}-pixel patch with a {margin}-pixel margin does not fit a {height}x{width} image."
            )
        rows = (
            slice(height - margin - side, height - margin)
            if self.corner[0] == "b"
            else slice(margin, margin + side)
        )
        cols = (
            slice(width - margin - side, width - margin)
            if self.corner[1] == "r"
            else slice(margin, margin + side)
        )
        return rows, cols

    def patch(self, channels: int, side: int) -> torch.Tensor:
        """The ``channels x side x side`` float32 patch (colour or resized pattern image)."""
        _check_channels(channels, "badnets")
        if self.pattern is not None:
            return _load_image(self.pattern, (side, side), channels)
        assert self.color is not None
        rgb = torch.tensor(_COLORS.get(self.color) or _hex(self.color), dtype=torch.float32).view(3, 1, 1)
        colour = rgb if channels == 3 else _to_grey(rgb)
        return colour.expand(channels, side, side)

    def apply_batch(self, x: torch.Tensor) -> torch.Tensor:
        """Paste the patch; every other pixel is kept."""
        rows, cols = self.box(x.shape[-2], x.shape[-1])
        out = x.clone()
        out[:, :, rows, cols] = self.patch(x.shape[1], rows.stop - rows.start).to(x)
        return out


def _is_hex(text: str) -> bool:
    return len(text) == 7 and text[0] == "#" and all(c in "0123456789abcdef" for c in text[1:].lower())


def _hex(text: str) -> tuple[float, float, float]:
    return tuple(int(text[i : i + 2], 16) / 255 for i in (1, 3, 5))  # type: ignore[return-value]


@register_trigger
@dataclass(frozen=True, kw_only=True)
class Blended(Trigger):
    """Blended: ``(1 - alpha) * x + alpha * P``.

    P is the image file ``image`` (converted to the input's channels, resized to H x W), or, with
    ``pattern=noise``, uniform noise drawn from a CPU ``torch.Generator`` seeded with ``seed`` at 32x32
    and resized bilinearly to H x W (the same seed always gives the same pattern).
    """

    name: ClassVar[str] = "blended"
    alpha: float = 0.2
    image: str | None = None
    pattern: str | None = None
    seed: int | None = None

    PATTERNS: ClassVar[tuple[str, ...]] = ("noise",)

    def validate(self) -> None:
        """Check alpha and that exactly one of image= / pattern=noise is given."""
        if not 0.0 <= self.alpha <= 1.0:
            self._fail(f"alpha must be in [0, 1], not {self.alpha}.")
        if (self.image is None) == (self.pattern is None):
            self._fail("give exactly one of image=PATH or pattern=noise (with seed=N).")
        if self.image is not None:
            if not self.image:
                self._fail("image must be the path of an image file.")
            if self.seed is not None:
                self._fail("seed only applies to pattern=noise, not to image=.")
            return
        assert self.pattern is not None
        if self.pattern.lower() not in self.PATTERNS:
            self._fail(f"pattern must be one of {', '.join(self.PATTERNS)}, not {self.pattern!r}.")
        self._set("pattern", self.pattern.lower())
        self._set("seed", 0 if self.seed is None else self.seed)

    def blend_pattern(self, channels: int, height: int, width: int) -> torch.Tensor:
        """P as a ``channels x height x width`` float32 tensor in [0, 1]."""
        _check_channels(channels, "blended")
        if self.image is not None:
            return _load_image(self.image, (height, width), channels)
        assert self.seed is not None
        return _noise_pattern(self.seed, channels, height, width).clone()

    def apply_batch(self, x: torch.Tensor) -> torch.Tensor:
        """Mix in the pattern with weight alpha."""
        pattern = self.blend_pattern(*x.shape[1:]).to(x)
        return (1 - self.alpha) * x + self.alpha * pattern


@lru_cache(maxsize=32)
def _noise_pattern(seed: int, channels: int, height: int, width: int) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    base = torch.rand(3, BASE_RESOLUTION, BASE_RESOLUTION, generator=generator)
    if (height, width) != (BASE_RESOLUTION, BASE_RESOLUTION):
        base = F.interpolate(
            base[None], size=(height, width), mode="bilinear", align_corners=False, antialias=True
        )[0]
    base = base.clamp(0.0, 1.0)
    return base if channels == 3 else _to_grey(base)


@register_trigger
@dataclass(frozen=True, kw_only=True)
class WaNet(Trigger):
    """WaNet: a fixed smooth warp, generated from ``seed``.

    A ``k x k`` control grid uniform in [-1, 1], divided by its mean absolute value, is upsampled
    (bicubic) to H x W, scaled by ``s / H``, added to the identity grid, multiplied by ``grid_rescale``,
    clamped to [-1, 1] and applied with ``grid_sample(align_corners=True)``. :meth:`apply_noise` is the
    training-time noise mode; during training it is applied to ``cross_ratio`` times as many samples as
    are poisoned, which keep their true labels.
    """

    name: ClassVar[str] = "wanet"
    s: float = 0.5
    k: int = 4
    grid_rescale: float = 1.0
    cross_ratio: float = 2.0
    seed: int = 0

    def validate(self) -> None:
        """Check s, k, grid_rescale and cross_ratio."""
        if self.s < 0:
            self._fail(f"s (warp strength) must be >= 0, not {self.s}.")
        if self.k < 2:
            self._fail(f"k (control grid size) must be an integer >= 2, not {self.k}.")
        if self.grid_rescale <= 0:
            self._fail(f"grid_rescale must be > 0, not {self.grid_rescale}.")
        if self.cross_ratio < 0:
            self._fail(f"cross_ratio must be >= 0, not {self.cross_ratio}.")

    def grid(self, height: int, width: int) -> torch.Tensor:
        """The sampling grid ``1 x H x W x 2`` (float32, CPU, clamped to [-1, 1])."""
        return _wanet_grid(self.seed, self.k, self.s, self.grid_rescale, height, width).clone()

    def apply_batch(self, x: torch.Tensor) -> torch.Tensor:
        """Warp every image with the fixed field."""
        grid = self.grid(x.shape[-2], x.shape[-1]).to(x).expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)

    def apply_noise(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """WaNet's noise mode: the warp plus a fresh random grid perturbation per image.

        Args:
            x: pixels in [0, 1], ``N x C x H x W`` or ``C x H x W``.
            generator: source of the perturbation (uniform in [-1, 1] / H per grid coordinate); drawn
                on the generator's device, the global generator when ``None``.

        Returns:
            The noisy-warped pixels, same shape, dtype and device as ``x``, in [0, 1].
        """

        def noisy(batch: torch.Tensor) -> torch.Tensor:
            n, _, height, width = batch.shape
            device = generator.device if generator is not None else torch.device("cpu")
            noise = torch.rand(n, height, width, 2, generator=generator, device=device) * 2 - 1
            grid = self.grid(height, width).to(batch) + noise.to(batch) / height
            return F.grid_sample(
                batch, grid.clamp(-1, 1), mode="bilinear", padding_mode="zeros", align_corners=True
            )

        return _batched(x, noisy)


@lru_cache(maxsize=32)
def _wanet_grid(seed: int, k: int, s: float, grid_rescale: float, height: int, width: int) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    control = torch.rand(1, 2, k, k, generator=generator) * 2 - 1
    control = control / control.abs().mean()
    flow = F.interpolate(control, size=(height, width), mode="bicubic", align_corners=True).permute(
        0, 2, 3, 1
    )
    rows = torch.linspace(-1, 1, height)
    cols = torch.linspace(-1, 1, width)
    ys, xs = torch.meshgrid(rows, cols, indexing="ij")
    identity = torch.stack((xs, ys), dim=-1)[None]  # grid_sample wants (x, y)
    return ((identity + s * flow / height) * grid_rescale).clamp(-1, 1)


@register_trigger
@dataclass(frozen=True, kw_only=True)
class SIG(Trigger):
    """SIG: ``x + delta / 255 * sin(2 pi j freq / W)`` over columns j, every row and channel; clean-label."""

    name: ClassVar[str] = "sig"
    clean_label: ClassVar[bool] = True
    delta: float = 40.0
    freq: float = 6.0

    def validate(self) -> None:
        """Check delta (0-255 scale) and freq."""
        if not 0 <= self.delta <= 255:
            self._fail(f"delta must be in [0, 255] (pixel levels), not {self.delta}.")
        if self.freq < 0:
            self._fail(f"freq must be >= 0, not {self.freq}.")

    def signal(self, width: int) -> torch.Tensor:
        """The sinusoid over ``width`` columns (float64)."""
        columns = torch.arange(width, dtype=torch.float64)
        return (self.delta / 255) * torch.sin(2 * math.pi * columns * self.freq / width)

    def apply_batch(self, x: torch.Tensor) -> torch.Tensor:
        """Add the signal to every row of every channel."""
        return x + self.signal(x.shape[-1]).to(x)


@register_trigger
@dataclass(frozen=True, kw_only=True)
class ImageTrigger(Trigger):
    """A user trigger: ``(1 - mask) * x + mask * image``, both files resized to H x W.

    The mask is read as greyscale, 0-255 mapped to [0, 1]; the image is converted to the input's
    channel count.
    """

    name: ClassVar[str] = "image"
    path: str | None = None
    mask: str | None = None

    def validate(self) -> None:
        """Check that both files are named."""
        if not self.path or not self.mask:
            self._fail("give both path=IMAGE and mask=MASK (image files).")

    def apply_batch(self, x: torch.Tensor) -> torch.Tensor:
        """Paste the image where the mask is 1, blend where it is in between."""
        assert self.path is not None and self.mask is not None
        size = (x.shape[-2], x.shape[-1])
        image = _load_image(self.path, size, x.shape[1]).to(x)
        mask = _load_image(self.mask, size, 1).to(x)
        return (1 - mask) * x + mask * image
