"""Backdoor triggers: each changes what it should, specs round-trip, bad specs say what is accepted."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from hubdefend.errors import DataError, HubDefendError, TriggerSpecError
from hubdefend.triggers import (
    SIG,
    TRIGGERS,
    BadNets,
    Blended,
    ImageTrigger,
    Trigger,
    WaNet,
    parse_trigger,
    register_trigger,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def batch(n: int = 4, c: int = 3, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    # Mid-range pixels so that white/black patches always differ from what was there.
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.1


def read_png(path, mode: str, size: tuple[int, int] | None = None) -> torch.Tensor:
    """A PNG as C x H x W floats in [0, 1], converted to ``mode`` and resized bilinearly (PIL, as triggers do)."""
    image = Image.open(path).convert(mode)
    if size is not None:
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.asarray(image).copy()).float().div(255)
    return pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1)


def write_png(path, array: torch.Tensor) -> str:
    """Save a C x H x W tensor in [0, 1] (C = 1 or 3) as a PNG; returns the path as text."""
    pixels = (array * 255).round().to(torch.uint8)
    if pixels.shape[0] == 1:
        Image.fromarray(pixels[0].numpy(), mode="L").save(path)
    else:
        Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy(), mode="RGB").save(path)
    return str(path)


@pytest.fixture
def files(tmp_path) -> dict[str, str]:
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(3, 32, 32, generator=gen)
    mask = torch.zeros(1, 32, 32)
    mask[:, 20:28, 4:12] = 1.0
    mask[:, 0:4, 0:4] = 0.6  # a soft part too
    return {
        "image": write_png(tmp_path / "image.png", image),
        "mask": write_png(tmp_path / "mask.png", mask),
        "patch": write_png(tmp_path / "patch.png", torch.rand(3, 5, 5, generator=gen)),
    }


def examples(files: dict[str, str]) -> list[Trigger]:
    """One or more instances of every built-in trigger, with non-default options too."""
    return [
        BadNets(),
        BadNets(size=4, corner="tl", margin=1, color="#ff8000", target=3),
        BadNets(pattern=files["patch"], corner="bl"),
        Blended(pattern="noise", seed=7, alpha=0.1),
        Blended(image=files["image"]),
        WaNet(),
        WaNet(s=1.0, k=8, seed=3, grid_rescale=0.98),
        SIG(),
        SIG(delta=20, freq=3.5, target=2),
        ImageTrigger(path=files["image"], mask=files["mask"], target=1),
    ]


# ------------------------------------------------------------------------------------------------
# BadNets


def test_badnets_changes_only_the_white_patch_bottom_right():
    x = batch()
    out = BadNets().apply(x)
    changed = (out != x).any(dim=(0, 1))
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[29:, 29:] = True
    assert torch.equal(changed, expected)
    assert torch.all(out[:, :, 29:, 29:] == 1.0)


def test_badnets_patch_scales_with_resolution():
    x = batch(h=64, w=64)
    out = BadNets().apply(x)
    rows, cols = torch.nonzero((out != x).any(dim=(0, 1)), as_tuple=True)
    assert (rows.min().item(), rows.max().item(), cols.min().item(), cols.max().item()) == (58, 63, 58, 63)
    assert len(rows) == 36  # 6 x 6
    # Tiny images still get at least one pixel.
    assert BadNets(size=1).box(8, 8) == (slice(7, 8), slice(7, 8))


@pytest.mark.parametrize(
    ("corner", "rows", "cols"),
    [("br", (29, 32), (29, 32)), ("bl", (29, 32), (0, 3)), ("tr", (0, 3), (29, 32)), ("tl", (0, 3), (0, 3))],
)
def test_badnets_corners(corner, rows, cols):
    x = batch(n=1)
    out = parse_trigger(f"badnets:corner={corner}").apply(x)
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[rows[0] : rows[1], cols[0] : cols[1]] = True
    assert torch.equal((out != x).any(dim=(0, 1)), expected)


def test_badnets_margin_and_colour():
    x = batch(n=2)
    out = parse_trigger("badnets:size=2,corner=tr,margin=1,color=red").apply(x)
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[1:3, 29:31] = True
    assert torch.equal((out != x).any(dim=(0, 1)), expected)
    assert torch.equal(
        out[:, :, 1:3, 29:31], torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    )
    hexed = parse_trigger("badnets:color=#FF8000").apply(x)
    assert torch.allclose(hexed[0, :, 31, 31], torch.tensor([1.0, 128 / 255, 0.0]))
    assert parse_trigger("badnets:color=#FF8000").color == "#ff8000"


def test_badnets_grey_input_gets_the_luma_of_the_colour():
    x = batch(c=1)
    assert torch.all(BadNets().apply(x)[:, :, 29:, 29:] == 1.0)
    red = parse_trigger("badnets:color=red").apply(x)
    assert torch.allclose(red[:, :, 29:, 29:], torch.full((4, 1, 3, 3), 0.299))


def test_badnets_pattern_image_is_pasted_resized(files):
    x = batch(n=2)
    out = BadNets(pattern=files["patch"]).apply(x)
    changed = (out != x).any(dim=(0, 1))
    assert not changed[:29].any() and not changed[:, :29].any()
    expected = read_png(files["patch"], "RGB", (3, 3))
    assert torch.allclose(out[0, :, 29:, 29:], expected)
    assert torch.allclose(out[1, :, 29:, 29:], expected)


def test_badnets_patch_that_does_not_fit_is_a_data_error():
    with pytest.raises(DataError, match="does not fit"):
        BadNets(size=40).apply(batch())


# ------------------------------------------------------------------------------------------------
# Blended


def test_blended_noise_equals_the_formula_and_is_seeded():
    x = batch()
    trigger = parse_trigger("blended:alpha=0.2,pattern=noise,seed=5,target=0")
    pattern = trigger.blend_pattern(3, 32, 32)
    assert pattern.shape == (3, 32, 32) and pattern.min() >= 0 and pattern.max() <= 1
    assert torch.equal(trigger.apply(x), ((1 - 0.2) * x + 0.2 * pattern).clamp(0, 1))
    assert torch.equal(pattern, parse_trigger("blended:pattern=noise,seed=5").blend_pattern(3, 32, 32))
    other = parse_trigger("blended:pattern=noise,seed=6").blend_pattern(3, 32, 32)
    assert (pattern - other).abs().mean() > 0.1
    # Other sizes: deterministic too, and still in [0, 1].
    big = trigger.blend_pattern(3, 64, 48)
    assert big.shape == (3, 64, 48) and torch.equal(big, trigger.blend_pattern(3, 64, 48))
    assert big.min() >= 0 and big.max() <= 1
    assert Blended(pattern="noise") == Blended(pattern="noise", seed=0)


def test_blended_image_equals_the_formula(files):
    x = batch(n=2, h=16, w=16)
    trigger = parse_trigger(f"blended:alpha=0.3,image={files['image']}")
    pattern = read_png(files["image"], "RGB", (16, 16))
    assert torch.allclose(trigger.apply(x), (0.7 * x + 0.3 * pattern).clamp(0, 1), atol=1e-6)
    grey = trigger.apply(batch(n=2, c=1, h=16, w=16))
    assert grey.shape == (2, 1, 16, 16)


# ------------------------------------------------------------------------------------------------
# WaNet


def test_wanet_warps_deterministically_and_keeps_shape_and_range():
    x = batch()
    trigger = WaNet()
    out = trigger.apply(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert (out - x).abs().mean() > 1e-3
    assert torch.equal(out, WaNet().apply(x))
    assert not torch.equal(out, WaNet(seed=1).apply(x))
    # s=0 is (up to rounding) the identity warp.
    assert torch.allclose(WaNet(s=0.0).apply(x), x, atol=1e-5)


def test_wanet_grid_follows_the_recipe():
    grid = WaNet(s=0.5, k=4, seed=0).grid(32, 32)
    generator = torch.Generator().manual_seed(0)
    control = torch.rand(1, 2, 4, 4, generator=generator) * 2 - 1
    control = control / control.abs().mean()
    flow = torch.nn.functional.interpolate(control, size=(32, 32), mode="bicubic", align_corners=True)
    line = torch.linspace(-1, 1, 32)
    expected_x = (line.view(1, 32) + 0.5 * flow[0, 0] / 32).clamp(-1, 1)
    expected_y = (line.view(32, 1) + 0.5 * flow[0, 1] / 32).clamp(-1, 1)
    assert grid.shape == (1, 32, 32, 2)
    assert torch.allclose(grid[0, ..., 0], expected_x) and torch.allclose(grid[0, ..., 1], expected_y)


def test_wanet_noise_mode_differs_and_follows_its_generator():
    x = batch()
    trigger = WaNet()
    noisy = trigger.apply_noise(x, generator=torch.Generator().manual_seed(0))
    assert noisy.shape == x.shape and noisy.min() >= 0 and noisy.max() <= 1
    assert (noisy - trigger.apply(x)).abs().mean() > 1e-4
    again = trigger.apply_noise(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noisy, again)
    assert trigger.apply_noise(x[0], generator=torch.Generator().manual_seed(0)).shape == x[0].shape
    assert trigger.cross_ratio == 2.0


# ------------------------------------------------------------------------------------------------
# SIG and the image trigger


def test_sig_equals_the_formula_and_is_clean_label():
    x = batch(h=16, w=20)
    out = parse_trigger("sig:delta=40,freq=6,target=0").apply(x)
    j = torch.arange(20, dtype=torch.float64)
    signal = (40 / 255 * torch.sin(2 * math.pi * j * 6 / 20)).float()
    assert torch.allclose(out, (x + signal).clamp(0, 1), atol=1e-6)
    assert SIG().clean_label is True
    assert not any(cls().clean_label for cls in (BadNets, WaNet))
    assert not Blended(pattern="noise").clean_label


def test_image_trigger_equals_the_formula(files):
    x = batch(n=3)
    out = ImageTrigger(path=files["image"], mask=files["mask"]).apply(x)
    image = read_png(files["image"], "RGB")
    mask = read_png(files["mask"], "L")
    assert mask.shape == (1, 32, 32) and 0.55 < mask[0, 0, 0] < 0.65  # the soft part survived the PNG
    assert torch.allclose(out, (1 - mask) * x + mask * image, atol=1e-6)
    assert torch.equal(out[:, :, 10:18, 14:30], x[:, :, 10:18, 14:30])  # mask 0: untouched
    assert torch.allclose(out[:, :, 20:28, 4:12], image[:, 20:28, 4:12].expand(3, -1, -1, -1))


def test_image_trigger_resizes_and_handles_grey(files):
    out = ImageTrigger(path=files["image"], mask=files["mask"]).apply(batch(n=2, c=1, h=64, w=64))
    assert out.shape == (2, 1, 64, 64)


def test_missing_trigger_file_is_reported_when_applied(tmp_path):
    trigger = parse_trigger(f"image:path={tmp_path / 'nope.png'},mask={tmp_path / 'nope.png'}")
    assert trigger.path == str(tmp_path / "nope.png")  # stored as given, loaded lazily
    with pytest.raises(TriggerSpecError, match="does not exist"):
        trigger.apply(batch())
    (tmp_path / "junk.png").write_text("not an image")
    with pytest.raises(TriggerSpecError, match="Cannot read"):
        parse_trigger(f"blended:image={tmp_path / 'junk.png'}").apply(batch())


# ------------------------------------------------------------------------------------------------
# Properties every trigger has


@pytest.mark.parametrize("index", range(10))
def test_every_example_round_trips_and_commutes(files, index):
    trigger = examples(files)[index]
    assert parse_trigger(trigger.to_spec()) == trigger
    assert parse_trigger(json.loads(json.dumps(trigger.to_dict()))) == trigger
    assert parse_trigger(trigger) is trigger
    x = batch(n=3)
    out = trigger.apply(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, trigger.apply(x))  # deterministic
    assert torch.allclose(out, torch.stack([trigger.apply(image) for image in x]), atol=1e-6)
    wide = trigger.apply(x.double())
    assert wide.dtype == torch.float64 and torch.allclose(wide.float(), out, atol=1e-5)
    half = trigger.apply(x.half())
    assert half.dtype == torch.float16 and torch.allclose(half.float(), out, atol=2e-3)
    extreme = trigger.apply(torch.stack([torch.zeros(3, 32, 32), torch.ones(3, 32, 32)]))
    assert extreme.min() >= 0 and extreme.max() <= 1


def test_examples_cover_every_registered_trigger(files):
    assert (
        {t.name for t in examples(files)} == set(TRIGGERS) == {"badnets", "blended", "wanet", "sig", "image"}
    )


@pytest.mark.parametrize("name", sorted(TRIGGERS))
def test_registry_round_trip_of_minimal_specs(name):
    minimal = {
        "badnets": "badnets:size=3,corner=br,target=0",
        "blended": "blended:alpha=0.2,pattern=noise,seed=0,target=0",
        "wanet": "wanet:target=0",
        "sig": "sig:delta=40,freq=6,target=0",
        "image": "image:path=trigger.png,mask=mask.png,target=0",
    }
    trigger = parse_trigger(minimal[name])
    assert isinstance(trigger, TRIGGERS[name]) and trigger.name == name and trigger.target == 0
    assert parse_trigger(trigger.to_spec()) == trigger and parse_trigger(trigger.to_dict()) == trigger
    assert trigger.to_spec().startswith(f"{name}:") and trigger.to_spec().endswith("target=0")
    assert json.loads(json.dumps(trigger.to_dict()))["name"] == name


def test_defaults_follow_backdoorbench():
    assert (BadNets().size, BadNets().corner, BadNets().color, BadNets().margin) == (3, "br", "white", 0)
    assert Blended(pattern="noise").alpha == 0.2
    assert (WaNet().s, WaNet().k, WaNet().grid_rescale, WaNet().cross_ratio) == (0.5, 4, 1.0, 2.0)
    assert (SIG().delta, SIG().freq) == (40.0, 6.0)
    assert all(cls.__dataclass_fields__["target"].default == 0 for cls in TRIGGERS.values())


def test_spec_parsing_is_lenient_about_spacing_and_value_types():
    assert parse_trigger(" badnets : size = 4 , corner = TL ") == BadNets(size=4, corner="tl")
    assert parse_trigger("BadNets") == BadNets()
    assert parse_trigger({"name": "badnets", "size": "4"}) == BadNets(size=4)
    assert parse_trigger({"name": "sig", "delta": 20}) == SIG(delta=20.0)
    assert parse_trigger("wanet:s=1").to_dict()["s"] == 1.0


def test_triggers_are_frozen_and_hashable():
    trigger = BadNets()
    with pytest.raises(dataclasses.FrozenInstanceError):
        trigger.size = 5  # type: ignore[misc]
    assert len({BadNets(), BadNets(), SIG()}) == 2


def test_single_image_and_bad_inputs():
    x = batch(n=1)[0]
    assert BadNets().apply(x).shape == x.shape
    with pytest.raises(DataError, match="N x C x H x W"):
        BadNets().apply(torch.zeros(32, 32))
    with pytest.raises(DataError, match="float"):
        BadNets().apply(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(DataError, match="1-channel"):
        Blended(pattern="noise").apply(torch.zeros(1, 4, 32, 32))


@cuda
def test_triggers_on_cuda_match_cpu(files):
    for trigger in examples(files):
        x = batch(n=2)
        on_gpu = trigger.apply(x.cuda())
        assert on_gpu.device.type == "cuda"
        assert torch.allclose(on_gpu.cpu(), trigger.apply(x), atol=1e-5), trigger.to_spec()
    generator = torch.Generator(device="cuda").manual_seed(0)
    assert WaNet().apply_noise(batch().cuda(), generator=generator).device.type == "cuda"


# ------------------------------------------------------------------------------------------------
# Bad specs


@pytest.mark.parametrize(
    ("spec", "fragments"),
    [
        ("trojan:size=3", ["Unknown trigger 'trojan'", "badnets, blended, image, sig, wanet"]),
        ("badnets:size=abc", ["size='abc' is not an integer", "Valid options for badnets"]),
        ("badnets:size=2.5", ["size='2.5' is not an integer"]),
        ("badnets:foo=1", ["unknown option 'foo'", "size (an integer)", "corner", "target"]),
        ("badnets:size=-1", ["size must be an integer >= 1"]),
        ("badnets:size=0", ["size must be an integer >= 1"]),
        ("badnets:margin=-2", ["margin must be an integer >= 0"]),
        ("badnets:corner=middle", ["corner must be one of br, bl, tr, tl", "'middle'"]),
        ("badnets:color=pink", ["color must be one of white, black, red", "#rrggbb"]),
        ("badnets:color=#12345", ["#rrggbb"]),
        ("badnets:color=red,pattern=p.png", ["either color= or pattern="]),
        ("badnets:target=-1", ["target must be a class index >= 0"]),
        ("badnets:size", ["'size' is not key=value"]),
        ("badnets:size=3,size=4", ["option 'size' twice"]),
        (":size=3", ["names no trigger", "badnets"]),
        ("blended:alpha=1.5,pattern=noise", ["alpha must be in [0, 1]"]),
        ("blended:alpha=-0.1,pattern=noise", ["alpha must be in [0, 1]"]),
        ("blended:alpha=nan,pattern=noise", ["finite"]),
        ("blended:alpha=0.2", ["image=PATH or pattern=noise"]),
        ("blended:pattern=stripes", ["pattern must be one of noise"]),
        ("blended:image=a.png,pattern=noise", ["exactly one of image=PATH or pattern=noise"]),
        ("blended:image=a.png,seed=3", ["seed only applies to pattern=noise"]),
        ("wanet:k=1", ["k (control grid size) must be an integer >= 2"]),
        ("wanet:s=-0.5", ["s (warp strength) must be >= 0"]),
        ("wanet:cross_ratio=-1", ["cross_ratio must be >= 0"]),
        ("wanet:grid_rescale=0", ["grid_rescale must be > 0"]),
        ("sig:delta=300", ["delta must be in [0, 255]"]),
        ("sig:freq=-1", ["freq must be >= 0"]),
        ("image:path=trigger.png", ["give both path=IMAGE and mask=MASK"]),
        ("image:mask=mask.png", ["give both path=IMAGE and mask=MASK"]),
    ],
)
def test_bad_specs_say_what_is_wrong_and_what_is_accepted(spec, fragments):
    with pytest.raises(TriggerSpecError) as info:
        parse_trigger(spec)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert isinstance(info.value, HubDefendError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"size": 3}, "needs a 'name' key"),
        ({"name": "badnets", "size": True}, "size must be an integer"),
        ({"name": "badnets", "size": 2.5}, "size must be an integer"),
        ({"name": "badnets", "corner": 3}, "corner must be text"),
        ({"name": "badnets", "bogus": 3}, "unknown option 'bogus'"),
        (42, "must be a string like"),
    ],
)
def test_bad_dict_specs(spec, fragment):
    with pytest.raises(TriggerSpecError, match=fragment):
        parse_trigger(spec)


def test_path_with_a_comma_cannot_go_into_a_spec_string_but_round_trips_as_a_dict():
    trigger = ImageTrigger(path="a,b.png", mask="m.png")
    with pytest.raises(TriggerSpecError, match="to_dict"):
        trigger.to_spec()
    assert parse_trigger(trigger.to_dict()) == trigger


# ------------------------------------------------------------------------------------------------
# Third-party triggers


def test_register_trigger_adds_a_parseable_trigger():
    @register_trigger
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Invert(Trigger):
        name: ClassVar[str] = "invert-test"
        strength: float = 1.0
        flip: bool = False

        def validate(self) -> None:
            if not 0 <= self.strength <= 1:
                self._fail("strength must be in [0, 1].")

        def apply_batch(self, x: torch.Tensor) -> torch.Tensor:
            out = (1 - self.strength) * x + self.strength * (1 - x)
            return out.flip(-1) if self.flip else out

    try:
        trigger = parse_trigger("invert-test:strength=0.5,flip=true,target=2")
        assert trigger == Invert(strength=0.5, flip=True, target=2)
        assert parse_trigger(trigger.to_spec()) == trigger and parse_trigger(trigger.to_dict()) == trigger
        assert torch.allclose(trigger.apply(torch.zeros(1, 1, 2, 2)), torch.full((1, 1, 2, 2), 0.5))
        with pytest.raises(TriggerSpecError, match="strength must be in"):
            parse_trigger("invert-test:strength=3")
        with pytest.raises(TriggerSpecError, match="flip='maybe' is not true/false"):
            parse_trigger("invert-test:flip=maybe")
    finally:
        TRIGGERS.pop("invert-test", None)


def test_register_trigger_rejects_bad_classes():
    with pytest.raises(TriggerSpecError, match="taken by"):

        @register_trigger
        @dataclasses.dataclass(frozen=True, kw_only=True)
        class Impostor(Trigger):
            name: ClassVar[str] = "badnets"

    with pytest.raises(TriggerSpecError, match="lowercase word"):

        @register_trigger
        @dataclasses.dataclass(frozen=True, kw_only=True)
        class Nameless(Trigger):
            pass

    with pytest.raises(TriggerSpecError, match="int, float, bool or str"):

        @register_trigger
        @dataclasses.dataclass(frozen=True, kw_only=True)
        class Listy(Trigger):
            name: ClassVar[str] = "listy-test"
            sizes: list = dataclasses.field(default_factory=list)

    assert "listy-test" not in TRIGGERS and TRIGGERS["badnets"] is BadNets
