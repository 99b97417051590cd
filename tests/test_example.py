"""The bundled example (hubdefend/example): shipped, small, backdoored, named by the CLI, reproducible."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

import hubdefend
from hubdefend.cli import EXIT_BACKDOOR_SUSPECTED
from hubdefend.data import load_data
from hubdefend.example import TRIGGER, images_dir, model_dir, names_example
from hubdefend.metrics import evaluate
from hubdefend.preprocess import Preprocessing
from hubdefend.triggers import parse_trigger

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 3 * 1024 * 1024


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hubdefend", *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.png"))


def test_bundle_is_present_and_small() -> None:
    assert {p.name for p in model_dir().iterdir()} == {"config.json", "model.safetensors", "backdoor.json"}
    files = image_files(images_dir())
    assert len(files) == 300
    per_class = {folder.name: len(list(folder.glob("*.png"))) for folder in images_dir().iterdir()}
    # Sorted folder names give the class indices (image_folder's rule): 0_t-shirt-top ... 9_ankle-boot.
    assert [name.split("_")[0] for name in sorted(per_class)] == [str(i) for i in range(10)]
    assert set(per_class.values()) == {30} and len(per_class) == 10
    total = sum(p.stat().st_size for p in [*model_dir().iterdir(), *files])
    assert total < MAX_BYTES, f"the bundled example grew to {total / 2**20:.1f} MB"


def test_bundled_model_is_backdoored_on_bundled_images() -> None:
    loaded = hubdefend.load("example")
    assert (loaded.family, loaded.architecture, loaded.source) == ("timm", "test_resnet", "hubdefend:example")
    preprocessing = Preprocessing.from_model(loaded.model)
    data = load_data("example", preprocessing)
    assert len(data) == 300
    result = evaluate(loaded.model, data, preprocessing, trigger=parse_trigger(TRIGGER), progress=False)
    assert result.ba >= 0.7  # chance is 0.1
    assert result.asr >= 0.9
    assert result.n_clean == 300 and result.n_triggered == 270  # 30 target-class images left out
    record = json.loads((model_dir() / "backdoor.json").read_text())
    assert parse_trigger(record["trigger"]).to_spec() == parse_trigger(TRIGGER).to_spec()


def test_evaluate_cli_json(tmp_path: Path) -> None:
    result = run_cli("evaluate", "example", "--data", "example", "--trigger", TRIGGER, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert {"ba", "asr", "n_clean", "n_triggered"} <= set(payload)
    assert payload["ba"] >= 0.7 and payload["asr"] >= 0.9
    assert (payload["n_clean"], payload["n_triggered"]) == (300, 270)
    assert "Warning" not in result.stderr  # RGB PNGs: no grey-conversion note on the main job


def test_sanitize_cli_writes_the_model_and_report(tmp_path: Path) -> None:
    args = ("sanitize", "example", "--data", "example", "--defense", "rnp", "-o", "recovering_epochs=1")
    result = run_cli(
        *args,
        "--prune",
        "2",
        "--kinds",
        "norm",
        "--ba-budget",
        "0.05",
        "--out",
        "out",
        "--json",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["neuron_kinds"] == ["norm"] and report["neurons_pruned"] == 2
    assert report["operating_point"]["ba_budget"] == 0.05
    assert json.loads((tmp_path / "out" / "report.json").read_text())["pruned"] == report["pruned"]
    assert (tmp_path / "out" / "model.safetensors").is_file()
    # A kind this CNN does not have is refused before anything is written.
    refused = run_cli(*args, "--kinds", "head", "--out", "refused", cwd=tmp_path)
    assert refused.returncode == 1 and "no head neurons; it has norm" in refused.stderr
    assert not (tmp_path / "refused").exists()


def test_scan_accepts_the_example(tmp_path: Path) -> None:
    result = run_cli("scan", "hubdefend:example", "--json", cwd=tmp_path)
    assert result.returncode == EXIT_BACKDOOR_SUSPECTED, result.stderr  # no data, and still caught
    payload = json.loads(result.stdout)
    assert payload["verdict"] == "backdoor_suspected" and payload["suspected_target"] == 0
    assert payload["source"]["id"] == "hubdefend:example"
    assert payload["model_facts"]["architecture"] == "test_resnet"


def test_a_local_path_named_example_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert names_example("example") and names_example("hubdefend:example")
    (tmp_path / "example").mkdir()
    assert not names_example("example")
    assert names_example("hubdefend:example")
    result = run_cli("inspect", "example", cwd=tmp_path)  # the empty local folder, not the bundle
    assert result.returncode == 1 and "no config.json" in result.stderr


@pytest.mark.filterwarnings("ignore:Grey images are converted")
def test_make_example_reproduces_the_bundle(tmp_path: Path) -> None:
    """The script retrains the model from its seed (one thread, deterministic algorithms; about 20 s)
    and draws the same images. On the machine that made the bundle the weights come back bit for bit;
    another CPU's oneDNN/BLAS kernels may sum floats in another order, and training amplifies the
    last bits, so what is asserted is the same recipe and the same behaviour, not the same bits."""
    spec = importlib.util.spec_from_file_location("make_example", ROOT / "benchmarks" / "make_example.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    record = script.make_model(tmp_path / "model", progress=False)
    bundled = json.loads((model_dir() / "backdoor.json").read_text())
    assert record["recipe"] == bundled["recipe"]
    assert abs(record["ba"] - bundled["ba"]) <= 0.03 and abs(record["asr"] - bundled["asr"]) <= 0.03
    fresh = load_file(tmp_path / "model" / "model.safetensors")
    shipped = load_file(model_dir() / "model.safetensors")
    assert fresh.keys() == shipped.keys()
    assert all(fresh[name].shape == shipped[name].shape for name in shipped)

    assert script.make_images(tmp_path / "images") == 300
    fresh_files = [p.relative_to(tmp_path / "images") for p in image_files(tmp_path / "images")]
    assert fresh_files == [p.relative_to(images_dir()) for p in image_files(images_dir())]
    for name in fresh_files:
        assert np.array_equal(
            np.asarray(Image.open(tmp_path / "images" / name)), np.asarray(Image.open(images_dir() / name))
        )
