"""`hubdefend scan` against the in-memory Hub (tests/hub_server.py) through the REAL clients (issue 5).

Round trips: a tiny timm and a tiny transformers model are pushed with huggingface_hub, scanned and
cleaned by the CLI in a subprocess (`--push org/...-clean`), and the cleaned repo is loaded back by
stock timm / transformers in a process that never imports hubdefend. Then the pull-request path,
revision pinning, offline mode with a warm cache, and bad input (one-line message, exit code 1,
nothing pushed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hubdefend
from hubdefend.cli import EXIT_BACKDOOR_SUSPECTED, EXIT_ERROR, EXIT_OK
from hubdefend.schemas import validate as validate_schema
from tests.zoo import _VIT_LIKE

NUM_CLASSES = 4  # detection fits one trigger per class: few classes keep the CLI runs short
IMAGES_PER_CLASS = 6
TRIGGER = "badnets:size=3,corner=br,target=0"
FAST = ["-o", "iterations=5", "-o", "batch_size=16"]  # a few ANP steps: the tests check plumbing


def new_repo_id(stem: str) -> str:
    return f"org/{stem}-{uuid.uuid4().hex[:8]}"


def cli_env(**overrides: str | None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_scan(
    *args: str, env: dict[str, str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hubdefend", "scan", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or cli_env(),
    )


def scan_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode in (EXIT_OK, EXIT_BACKDOOR_SUSPECTED), proc.stderr[-3000:]
    payload = json.loads(proc.stdout)  # --json: stdout is ONE JSON object and nothing else
    expected_code = EXIT_BACKDOOR_SUSPECTED if payload["verdict"] == "backdoor_suspected" else EXIT_OK
    assert proc.returncode == expected_code
    return payload


def stock_logits(family: str, repo_id: str, x: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    """Load ``repo_id`` from the Hub with stock timm / transformers in a process without hubdefend."""
    torch.save(x, tmp_path / "x.pt")
    if family == "timm":
        build = f'import timm\nmodel = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()\n'
        call = "model(x)"
    else:
        build = (
            "from transformers import AutoImageProcessor, AutoModelForImageClassification\n"
            f'AutoImageProcessor.from_pretrained("{repo_id}")\n'
            f'model = AutoModelForImageClassification.from_pretrained("{repo_id}", trust_remote_code=False).eval()\n'
        )
        call = "model(pixel_values=x).logits"
    script = (
        "import sys, torch\n"
        + build
        + (
            "x = torch.load(sys.argv[1])\n"
            "with torch.no_grad():\n"
            f"    torch.save({call}, sys.argv[2])\n"
            'assert not [m for m in sys.modules if m.startswith("hubdefend")], "hubdefend was imported"\n'
        )
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        capture_output=True,
        text=True,
        timeout=180,
        env=cli_env(),
        cwd=tmp_path,  # not the repo root: `import hubdefend` would not even resolve from there
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp_path / "y.pt")


def check_card(repo_id: str, *, source_id: str, source_sha: str, defense: str, with_asr: bool) -> None:
    from huggingface_hub import ModelCard

    card = ModelCard.load(repo_id)  # downloads README.md from the local Hub and parses its YAML
    data = card.data.to_dict()
    assert data["base_model"] == source_id
    assert data["base_model_relation"] == "finetune"
    assert data["license"] == "apache-2.0"  # carried over from the source card
    assert {"hubdefend", "backdoor-defense", defense} <= set(data["tags"])
    assert source_sha in card.text  # the card names the scanned revision
    results = data["model-index"][0]["results"]
    metric_types = [{m["type"] for m in r["metrics"]} for r in results]
    # BA and ASR never share a model-index entry (they would merge if their dataset config matched).
    assert all(len(types) == 1 for types in metric_types), metric_types
    flat = {t for types in metric_types for t in types}
    assert "accuracy" in flat
    assert ("attack_success_rate" in flat) == with_asr
    evals = card.data.eval_results
    assert {e.metric_type for e in evals} == flat
    ba = [e for e in evals if e.metric_type == "accuracy"]
    assert len(ba) == 2 and all(0.0 <= e.metric_value <= 1.0 for e in ba)  # before and after


# ---- fixtures: data, and source models on the Hub (one per module) -----------------------------
@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """NUM_CLASSES x IMAGES_PER_CLASS PNGs, 32x32 RGB, class-per-folder."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label in range(NUM_CLASSES):
        folder = root / f"class_{label}"
        folder.mkdir()
        for i in range(IMAGES_PER_CLASS):
            base = rng.integers(0, 256, size=(32, 32, 3)) // 4 + label * 40
            Image.fromarray(base.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def tiny_timm(seed: int = 0, num_classes: int = NUM_CLASSES):
    import timm

    torch.manual_seed(seed)
    overlay = {"input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bilinear"}
    return timm.create_model(
        "test_resnet", pretrained=False, num_classes=num_classes, pretrained_cfg_overlay=overlay
    ).eval()


def tiny_vit(seed: int = 0):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    config = ViTConfig(**_VIT_LIKE, num_labels=NUM_CLASSES)
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    return ViTForImageClassification(config).eval(), processor


def upload(
    hf_api, repo_id: str, folder: Path, license: str | None = "apache-2.0", create: bool = True
) -> str:
    """Upload ``folder`` (plus a card with a licence) in one commit; return the commit sha."""
    if license:
        (folder / "README.md").write_text(f"---\nlicense: {license}\n---\n# source model\n")
    if create:
        hf_api.create_repo(repo_id)
    return hf_api.upload_folder(repo_id=repo_id, folder_path=folder).oid


@pytest.fixture(scope="module")
def timm_source(hf_api_module, tmp_path_factory) -> tuple[str, str]:
    """A tiny timm model on the Hub: (repo id, commit sha)."""
    repo_id = new_repo_id("timm-src")
    folder = hubdefend.save(tiny_timm(), tmp_path_factory.mktemp("timm-src") / "m")
    return repo_id, upload(hf_api_module, repo_id, folder)


@pytest.fixture(scope="module")
def hf_api_module():
    from huggingface_hub import HfApi

    return HfApi()  # endpoint and token from the environment conftest set


@pytest.fixture(scope="module")
def timm_scan(timm_source, image_dir, tmp_path_factory) -> dict:
    """`hubdefend scan SRC --data --defense anp --trigger --eval-data --out --push SRC-clean --json`."""
    source, _ = timm_source
    target = source.replace("timm-src", "timm-clean")
    out = tmp_path_factory.mktemp("timm-scan") / "cleaned"
    proc = run_scan(
        source,
        "--data", str(image_dir),
        "--eval-data", str(image_dir),
        "--defense", "anp",
        "--trigger", TRIGGER,
        *FAST,
        "--out", str(out),
        "--push", target,
        "--json",
        "--quiet",
    )  # fmt: skip
    return {
        "payload": scan_json(proc),
        "out": out,
        "target": target,
        "stderr": proc.stderr,
        "image_dir": image_dir,
    }


# ---- round trips -------------------------------------------------------------------------------
def test_timm_scan_push_and_stock_load(timm_source, timm_scan, hub_server, tmp_path):
    source, sha = timm_source
    payload, out, target = timm_scan["payload"], timm_scan["out"], timm_scan["target"]
    validate_schema(payload, "scan")  # hubdefend/schemas/scan.schema.json, with the report fields
    assert payload["source"] == {"id": source, "revision": sha}
    assert payload["verdict"] in ("backdoor_suspected", "no_evidence")
    assert payload["suspected_target"] is None or 0 <= payload["suspected_target"] < NUM_CLASSES
    assert isinstance(payload["anomaly_index"], float)
    assert (payload["verdict"] == "backdoor_suspected") == (payload["suspected_target"] is not None)
    assert payload["defense"] == "anp" and payload["trigger"].startswith("badnets:size=3,corner=br")
    assert payload["ba_before"] is not None and payload["asr_before"] is not None
    assert payload["model_facts"]["family"] == "timm"
    assert "hf_test_token" not in timm_scan["stderr"] + json.dumps(payload)  # the token is never printed

    # ONE commit on a new repo, and it is the one the report names.
    pushed = payload["pushed"]
    commits = hub_server.commits(target)
    assert pushed["repo_id"] == target and pushed["pr_url"] is None
    assert len(commits) == 2 and pushed["commit_sha"] == commits[-1]  # creation commit + the push
    files = hub_server.repo_files(target)
    assert {"config.json", "model.safetensors", "README.md", "report.json"} <= set(files)
    assert any(name.endswith(".png") for name in files)
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    report = json.loads(files["report.json"])
    assert report["defense"] == "anp"
    # The data was loaded once for detection and defense; the report still names where it came from.
    assert report["data"]["spec"] == report["data"]["eval_spec"] == str(timm_scan["image_dir"])
    assert hub_server.commits(source)[-1] == sha  # the scanned repo is untouched

    # Stock timm in a process that never imports hubdefend == the cleaned model loaded locally.
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        local = hubdefend.load(out).model(x)
        original = hubdefend.load(f"{source}@{sha}").model(x)
    # Same weights; another process may pick other CPU kernels (thread count), so allow float noise.
    torch.testing.assert_close(stock_logits("timm", target, x, tmp_path), local, rtol=1e-5, atol=1e-5)
    if payload["neurons_pruned"]:
        assert not torch.allclose(local, original)  # the cleaned model is not the source model

    check_card(target, source_id=source, source_sha=sha, defense="anp", with_asr=True)


@pytest.fixture(scope="module")
def vit_source(hf_api_module, tmp_path_factory) -> tuple[str, str]:
    repo_id = new_repo_id("vit-src")
    model, processor = tiny_vit()
    folder = hubdefend.save(model, tmp_path_factory.mktemp("vit-src") / "m", image_processor=processor)
    return repo_id, upload(hf_api_module, repo_id, folder)


def test_transformers_scan_push_and_stock_load(vit_source, image_dir, hub_server, tmp_path):
    source, sha = vit_source
    target = source.replace("vit-src", "vit-clean")
    out = tmp_path / "cleaned"
    proc = run_scan(
        f"hf-hub:{source}",
        "--data", str(image_dir),
        "--eval-data", str(image_dir),
        *FAST,
        "--out", str(out),
        "--push", target,
        "--json",
    )  # fmt: skip
    payload = scan_json(proc)
    assert payload["source"] == {"id": source, "revision": sha}
    assert payload["model_facts"]["family"] == "transformers"
    assert payload["defense"] == "anp"  # the default when cleaning
    assert payload["trigger"] is None and payload["asr_before"] is None  # no trigger known: no ASR rows
    assert payload["pushed"]["commit_sha"] == hub_server.commits(target)[-1]
    assert len(hub_server.commits(target)) == 2
    files = hub_server.repo_files(target)
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(files)
    assert not any(name.endswith(".py") for name in files)

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        local = hubdefend.load(out).model(pixel_values=x).logits
    # Same weights; another process may pick other CPU kernels (thread count), so allow float noise.
    torch.testing.assert_close(stock_logits("transformers", target, x, tmp_path), local, rtol=1e-5, atol=1e-5)
    check_card(target, source_id=source, source_sha=sha, defense="anp", with_asr=False)


# ---- pull requests, pinning, offline ----------------------------------------------------------
def test_pr_on_the_scanned_repo(timm_source, timm_scan, image_dir, hub_server, hf_api):
    """`--pr` without `--push` opens a pull request on the source repo; main does not move."""
    source, sha = timm_source
    main_before = hub_server.commits(source)
    proc = run_scan(source, "--data", str(image_dir), *FAST, "--pr", "--json")
    payload = scan_json(proc)
    pushed = payload["pushed"]
    assert pushed["repo_id"] == source and pushed["pr_url"]
    num = int(pushed["pr_url"].rstrip("/").rsplit("/", 1)[1])
    assert pushed["pr_url"].endswith(f"/{source}/discussions/{num}")
    assert hub_server.commits(source) == main_before  # main untouched
    refs = hf_api.list_repo_refs(source, include_pull_requests=True)
    pr_ref = next(r for r in refs.pull_requests if r.ref == f"refs/pr/{num}")
    assert pr_ref.target_commit == pushed["commit_sha"]
    pr_files = hub_server.repo_files(source, f"refs/pr/{num}")
    assert pr_files["model.safetensors"] != hub_server.repo_files(source, sha)["model.safetensors"] or (
        payload["neurons_pruned"] == 0
    )
    assert "README.md" in pr_files and "hubdefend" in pr_files["README.md"].decode()
    assert hf_api.get_discussion_details(source, num).is_pull_request


def test_revision_pinning(hf_api, hub_server, repo_id, tmp_path):
    """A later commit on the source does not change what `org/model@<sha>` scans."""
    sha1 = upload(hf_api, repo_id, hubdefend.save(tiny_timm(seed=0), tmp_path / "v1"))
    v2 = tiny_timm(seed=1, num_classes=7)  # a different head: the parameter count tells them apart
    sha2 = upload(hf_api, repo_id, hubdefend.save(v2, tmp_path / "v2"), create=False)
    assert sha1 != sha2 and hub_server.commits(repo_id)[-1] == sha2
    payload = scan_json(run_scan(f"{repo_id}@{sha1}", "--json"))
    assert payload["source"] == {"id": repo_id, "revision": sha1}
    assert payload["model_facts"]["parameters"] == sum(p.numel() for p in tiny_timm().parameters())
    assert payload["verdict"] == "no_evidence" and payload["pushed"] is None
    loaded = hubdefend.load(f"{repo_id}@{sha1}")
    assert loaded.revision == sha1 and loaded.model.num_classes == NUM_CLASSES
    latest = hubdefend.load(repo_id)
    assert latest.revision == sha2 and latest.model.num_classes == 7


def test_offline_with_warm_cache(timm_source, timm_scan, monkeypatch):
    """After a scan downloaded the model, `HF_HUB_OFFLINE=1 hubdefend scan org/model` works with no server."""
    from huggingface_hub import constants

    source, sha = timm_source
    env = cli_env(HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens there
    payload = scan_json(run_scan(source, "--json", env=env))
    assert payload["source"] == {"id": source, "revision": sha}
    assert payload["model_facts"]["family"] == "timm"
    # The same resolution in-process (huggingface_hub reads HF_HUB_OFFLINE at import: patch it).
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hubdefend.load(f"{source}@{sha}").revision == sha
    with pytest.raises(hubdefend.HubDefendError, match="not in the Hugging Face cache"):
        hubdefend.load("org/never-downloaded")


# ---- bad input: one clear line, exit code 1, nothing pushed ------------------------------------
def cli_main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Run the console entry point in-process (no interpreter start-up): (exit code, stderr)."""
    from hubdefend.cli import main

    monkeypatch.setattr(sys, "argv", ["hubdefend", "scan", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err
    return exc.value.code, " ".join(err.split())


def expect_refused(monkeypatch, capsys, hub_server, target: str, *args: str, match: str) -> str:
    def hub_state() -> dict:  # every repo's branches (PR refs included) and where they point
        with hub_server.lock:
            return {rid: dict(repo.branches) for rid, repo in hub_server.repos.items()}

    before = hub_state()
    code, err = cli_main(monkeypatch, capsys, *args, "--push", target, "--quiet")
    assert code == EXIT_ERROR, err
    assert err.startswith("Error:") and match.lower() in err.lower(), err  # one clear line, no progress bars
    assert "Traceback" not in err and "hf_test_token" not in err
    assert hub_state() == before  # nothing created, committed or opened as a pull request
    return err


def bad_repo(hf_api, repo_id: str, tmp_path: Path, mutate) -> str:
    folder = hubdefend.save(tiny_timm(), tmp_path / "bad")
    mutate(folder)
    return upload(hf_api, repo_id, folder)


def _pickle_only(folder: Path) -> None:
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def _auto_map(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))


def _python_file(folder: Path) -> None:
    (folder / "modeling_evil.py").write_text("import os\n")


def _corrupt(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:8] + b"{not json" + data[17:])


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (_pickle_only, "only pickle weights (pytorch_model.bin)"),
        (_auto_map, "auto_map"),
        (_python_file, "modeling_evil.py"),
        (_corrupt, "model.safetensors"),
    ],
    ids=["pickle-only", "auto-map", "python-file", "corrupt-safetensors"],
)
def test_bad_repo_is_refused(
    mutate, match, hf_api, hub_server, repo_id, image_dir, tmp_path, monkeypatch, capsys
):
    bad_repo(hf_api, repo_id, tmp_path, mutate)
    expect_refused(
        monkeypatch, capsys, hub_server, f"{repo_id}-clean", repo_id, "--data", str(image_dir), match=match
    )


def test_unknown_repo_and_revision(timm_source, hub_server, image_dir, monkeypatch, capsys):
    source, _ = timm_source
    target = new_repo_id("never")
    data = ["--data", str(image_dir)]
    expect_refused(
        monkeypatch, capsys, hub_server, target, "org/does-not-exist", *data, match="No model repo"
    )
    expect_refused(
        monkeypatch, capsys, hub_server, target, f"{source}@no-such-branch", *data, match="no revision"
    )
    expect_refused(
        monkeypatch, capsys, hub_server, target, f"{source}@{'0' * 40}", *data, match="no revision"
    )


def test_push_refusals(timm_source, hub_server, image_dir, monkeypatch, capsys, tmp_path):
    source, sha = timm_source
    data = ["--data", str(image_dir)]
    # Onto the scanned repo itself without --pr: refused before any work.
    err = expect_refused(
        monkeypatch, capsys, hub_server, source, source, *data, match="Refusing to overwrite"
    )
    assert "--pr" in err and hub_server.commits(source)[-1] == sha
    # --push with no data to clean with.
    expect_refused(monkeypatch, capsys, hub_server, new_repo_id("x"), source, match="--data")


def test_push_without_token_in_a_subprocess(timm_source, hub_server, image_dir, tmp_path):
    """The same through the real console script: an empty HF_HOME and no HF_TOKEN."""
    source, _ = timm_source
    target = new_repo_id("no-token")
    env = cli_env(HF_TOKEN=None, HF_HOME=str(tmp_path / "empty-home"))
    proc = run_scan(source, "--data", str(image_dir), "--push", target, "--quiet", env=env)
    assert proc.returncode == EXIT_ERROR
    assert "No Hugging Face token" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == "" and target not in hub_server.repos


def test_failed_commit_leaves_target_as_it_was(
    timm_source, hub_server, hf_api, image_dir, monkeypatch, capsys, tmp_path
):
    """The server refuses the commit after the model was cleaned: the empty target repo is unchanged."""
    source, _ = timm_source
    target = new_repo_id("fails")
    hf_api.create_repo(target)
    before = hub_server.commits(target), hub_server.repo_files(target)
    hub_server.fail_next_commit(target, status=422)  # a 5xx would be retried by upload_folder
    out = tmp_path / "cleaned"
    code, err = cli_main(
        monkeypatch, capsys, source, "--data", str(image_dir), *FAST, "--out", str(out), "--push", target
    )
    assert code == EXIT_ERROR and "nothing was changed" in err, err
    assert (hub_server.commits(target), hub_server.repo_files(target)) == before
    assert not hub_server.repos[target].fail_commits  # the injected failure was hit
    assert (out / "model.safetensors").is_file()  # the local result is kept for a later push


def test_sanitize_result_card_and_push_to_hub(hub_server, hf_api, repo_id) -> None:
    from huggingface_hub import ModelCard

    from hubdefend.data import load_data
    from hubdefend.preprocess import Preprocessing
    from hubdefend.sanitize import sanitize

    loaded = hubdefend.load("hubdefend:example")
    data = load_data("example", Preprocessing.from_timm(loaded.model))
    result = sanitize(loaded, data, defense="anp", prune=3, progress=False, iterations=2, batch_size=32)
    card = result.card(repo_id=repo_id)
    assert card.data.base_model == "hubdefend:example" and "hubdefend" in card.data.tags
    pushed = result.push_to_hub(repo_id)
    files = set(hf_api.list_repo_files(repo_id))
    assert {"config.json", "model.safetensors", "README.md", "report.json"} <= files
    assert hub_server.commits(repo_id)[-1] == pushed.commit_sha
    assert ModelCard.load(repo_id).data.base_model == "hubdefend:example"
