"""The hubdefend command: --version, inspect (tables and --json), one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import timm

import hubdefend


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hubdefend", *args], capture_output=True, text=True, timeout=300
    )


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"hubdefend {hubdefend.__version__}"


def test_inspect_saved_timm_folder_as_json(tmp_path: Path) -> None:
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=7)
    folder = hubdefend.save(model, tmp_path / "m")
    result = run_cli("inspect", str(folder), "--json")
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    groups = hubdefend.discover(model)
    assert facts["family"] == "timm" and facts["architecture"] == "test_efficientnet"
    assert facts["parameters"] == sum(p.numel() for p in model.parameters())
    assert [layer["name"] for layer in facts["layers"]] == [g.name for g in groups]
    assert facts["neurons"] == sum(g.num_neurons for g in groups)
    assert any(layer["type"] == "BatchNormAct2d" and layer["fused_activation"] for layer in facts["layers"])


def test_inspect_table_for_a_built_architecture() -> None:
    result = run_cli("inspect", "timm:test_convnext")
    assert result.returncode == 0, result.stderr
    assert "test_convnext (timm)" in result.stdout
    assert "LayerNorm2d" in result.stdout and "neurons" in result.stdout


def test_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    for args, expected in [
        (("inspect", str(tmp_path)), "no config.json"),
        (("inspect", "timm:nfnet_l0"), "no normalization layer"),
        (("inspect", "timm:resnet_nope"), "no architecture named"),
    ]:
        result = run_cli(*args)
        assert result.returncode == 1
        assert expected in result.stderr
        assert "Traceback" not in result.stderr
        assert result.stderr.strip().startswith("Error:")
