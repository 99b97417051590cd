"""Family save/load: a pruned model loads with stock timm / transformers and gives the same outputs;
bad input gets a clear HubDefendError and writes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import hubdefend
from hubdefend.errors import (
    HubDefendError,
    MaskError,
    NoNormLayersError,
    NotAModelError,
    UnknownArchitectureError,
    WeightsMismatchError,
)
from tests import zoo

STOCK_LOADER = textwrap.dedent(
    """
    import sys, torch
    family, folder, inputs, out = sys.argv[1:]
    assert "hubdefend" not in sys.modules
    if family == "timm":
        import timm
        model = timm.create_model("local-dir:" + folder, pretrained=True).eval()
        logits = model(torch.load(inputs))
    else:
        from transformers import AutoModelForImageClassification
        model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=False).eval()
        logits = model(torch.load(inputs)).logits
    assert "hubdefend" not in sys.modules
    torch.save(logits.detach(), out)
    """
)


def _prune_first_neurons(model: torch.nn.Module) -> torch.nn.Module:
    groups = hubdefend.discover(model)
    plan = {g.name: [0, 1] for g in groups[::3] if g.bakeable}
    return hubdefend.bake(model, plan)


def _stock_logits(family: str, folder: Path, x: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    torch.save(x, tmp_path / "x.pt")
    subprocess.run(
        [
            sys.executable,
            "-c",
            STOCK_LOADER,
            family,
            str(folder),
            str(tmp_path / "x.pt"),
            str(tmp_path / "y.pt"),
        ],
        check=True,
        cwd=tmp_path,
    )
    return torch.load(tmp_path / "y.pt")


@pytest.mark.parametrize("name", ["resnet18", "test_vit"])
def test_timm_round_trip_with_stock_loader(name: str, tmp_path: Path) -> None:
    model = timm.create_model(
        name, pretrained=False, num_classes=10, **({"img_size": 32} if "vit" in name else {})
    )
    pruned = _prune_first_neurons(model.eval())
    folder = hubdefend.save(pruned, tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == name and config["num_classes"] == 10
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = pruned(x)
        torch.testing.assert_close(hubdefend.load(folder).model(x), expected)
    torch.testing.assert_close(_stock_logits("timm", folder, x, tmp_path), expected)


@pytest.mark.parametrize("model_type", ["vit", "convnext"])
def test_transformers_round_trip_with_stock_loader(model_type: str, tmp_path: Path) -> None:
    from transformers import ConvNextImageProcessor, ViTImageProcessor

    model, x = zoo.build_transformers(model_type)
    pruned = _prune_first_neurons(model)
    processor = (ViTImageProcessor if model_type == "vit" else ConvNextImageProcessor)(
        size={"height": 32, "width": 32}
    )
    folder = hubdefend.save(pruned, tmp_path / "model", image_processor=processor)
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {
        p.name for p in folder.iterdir()
    }
    loaded = hubdefend.load(folder)
    assert loaded.family == "transformers" and loaded.image_processor is not None
    with torch.no_grad():
        expected = pruned(x).logits
        torch.testing.assert_close(loaded.model(x).logits, expected)
    torch.testing.assert_close(_stock_logits("transformers", folder, x, tmp_path), expected)


def test_folder_that_is_no_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(NotAModelError, match="no config.json"):
        hubdefend.load(tmp_path)
    with pytest.raises(NotAModelError, match="neither a local model folder"):
        hubdefend.load(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(NotAModelError, match="not valid JSON"):
        hubdefend.load(tmp_path)
    (tmp_path / "config.json").write_text('{"hello": 1}')
    with pytest.raises(NotAModelError, match="cannot tell which library"):
        hubdefend.load(tmp_path)


def test_unknown_architecture(tmp_path: Path) -> None:
    folder = hubdefend.save(timm.create_model("test_resnet", pretrained=False), tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architecture": "resnet_does_not_exist"}))
    with pytest.raises(UnknownArchitectureError, match="resnet_does_not_exist"):
        hubdefend.load(folder)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "config.json").write_text('{"model_type": "no_such_model_type"}')
    save_file({"w": torch.zeros(1)}, tmp_path / "t" / "model.safetensors")
    with pytest.raises(UnknownArchitectureError, match="no_such_model_type"):
        hubdefend.load(tmp_path / "t")


def test_weights_that_do_not_fit(tmp_path: Path) -> None:
    folder = hubdefend.save(
        timm.create_model("test_resnet", pretrained=False, num_classes=10), tmp_path / "m"
    )
    weights = load_file(folder / "model.safetensors")
    key = next(k for k in weights if k.endswith("fc.weight"))
    weights[key] = torch.zeros(7, weights[key].shape[1])
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(WeightsMismatchError, match="do not fit"):
        hubdefend.load(folder)


def test_pickle_only_weights_are_not_loaded(tmp_path: Path) -> None:
    folder = hubdefend.save(timm.create_model("test_resnet", pretrained=False), tmp_path / "m")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(NotAModelError, match="safetensors"):
        hubdefend.load(folder)


def test_model_without_norm_layers() -> None:
    model = timm.create_model("resmlp_12_224", pretrained=False, num_classes=2)
    with pytest.raises(NoNormLayersError, match="no normalization layer"):
        hubdefend.discover(model)


def test_save_refuses_what_it_cannot_do_and_writes_nothing(tmp_path: Path) -> None:
    model = timm.create_model("test_resnet", pretrained=False)
    with hubdefend.masked(model, hubdefend.discover(model)), pytest.raises(MaskError, match="hooks"):
        hubdefend.save(model, tmp_path / "hooked")
    assert not (tmp_path / "hooked").exists()
    with pytest.raises(HubDefendError, match="plain torch module"):
        hubdefend.save(torch.nn.Sequential(torch.nn.BatchNorm2d(3)), tmp_path / "plain")
    assert list(tmp_path.iterdir()) == []  # no staging folder left behind
    hubdefend.save(model, tmp_path / "m")
    with pytest.raises(HubDefendError, match="not empty"):
        hubdefend.save(model, tmp_path / "m")


def test_bake_rejects_bad_plans_and_changes_nothing() -> None:
    model = timm.create_model("test_resnet", pretrained=False).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = hubdefend.discover(model)[0]
    with pytest.raises(hubdefend.HubDefendError, match="not a neuron group"):
        hubdefend.bake(model, {"nope": [0]}, inplace=True)
    with pytest.raises(hubdefend.HubDefendError, match="only"):
        hubdefend.bake(model, {first.name: [0, first.num_neurons]}, inplace=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    baked = hubdefend.bake(model, {first.name: [3]}, zero_beta=True)
    layer = baked.get_submodule(first.name)
    assert layer.weight[3] == 0 and layer.bias[3] == 0
    assert list(baked.state_dict()) == list(before)
    assert torch.equal(model.state_dict()[f"{first.name}.weight"], before[f"{first.name}.weight"])
