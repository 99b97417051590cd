"""The in-memory Hub (tests/hub_server.py) is faithful enough for the REAL clients: huggingface_hub,
timm and transformers talk to it over HTTP exactly as they would to huggingface.co (no mocks)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from huggingface_hub import (
    CommitOperationAdd,
    HfApi,
    file_exists,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import save_file

SHA = re.compile(r"^[0-9a-f]{40}$")


def make_folder(root: Path, version: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"version": version}))
    save_file({"w": torch.full((4,), float(version))}, str(root / "model.safetensors"))
    (root / "README.md").write_text(f"---\nlicense: apache-2.0\n---\n# v{version}\n")
    return root


def read_config(path: str) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture
def uploaded(hf_api, repo_id, tmp_path) -> tuple[str, str]:
    """A repo with version 1 of the folder on main; returns (repo_id, sha of that commit)."""
    hf_api.create_repo(repo_id)
    info = hf_api.upload_folder(repo_id=repo_id, folder_path=make_folder(tmp_path / "v1", 1))
    return repo_id, info.oid


def test_create_repo_and_duplicate(hf_api, repo_id, hub_endpoint):
    assert hf_api.create_repo(repo_id) == f"{hub_endpoint}/{repo_id}"
    with pytest.raises(HfHubHTTPError) as err:
        hf_api.create_repo(repo_id)
    assert err.value.response.status_code == 409
    assert hf_api.create_repo(repo_id, exist_ok=True) == f"{hub_endpoint}/{repo_id}"
    assert hf_api.whoami()["name"] == "tester"
    name = repo_id.split("/")[1]
    assert hf_api.create_repo(name) == f"{hub_endpoint}/tester/{name}"  # no org: the user's namespace


def test_upload_folder_lists_files_and_moves_sha(hf_api, hub_server, uploaded, tmp_path):
    repo_id, sha1 = uploaded
    expected = {".gitattributes", "config.json", "model.safetensors", "README.md"}
    assert set(hf_api.list_repo_files(repo_id)) == expected
    info = hf_api.model_info(repo_id)
    assert SHA.match(info.sha) and info.sha == sha1 == hub_server.commits(repo_id)[-1]
    assert {s.rfilename for s in info.siblings} == expected
    hf_api.upload_folder(repo_id=repo_id, folder_path=make_folder(tmp_path / "v2", 2))
    sha2 = hf_api.model_info(repo_id).sha
    assert SHA.match(sha2) and sha2 != sha1
    assert hub_server.commits(repo_id)[-2:] == [sha1, sha2]
    assert hf_api.model_info(repo_id, revision=sha1).sha == sha1
    assert json.loads(hub_server.repo_files(repo_id)["config.json"]) == {"version": 2}
    assert json.loads(hub_server.repo_files(repo_id, sha1)["config.json"]) == {"version": 1}
    # Re-uploading identical content makes no commit (the client compares blob ids from preupload).
    hf_api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "v2")
    assert hub_server.commits(repo_id)[-1] == sha2
    tree = {f.path: f for f in hf_api.list_repo_tree(repo_id, recursive=True)}
    assert tree["config.json"].size == len(b'{"version": 2}')


def test_download_by_branch_pinned_sha_and_snapshot(hf_api, uploaded, tmp_path):
    repo_id, sha1 = uploaded
    hf_api.upload_folder(repo_id=repo_id, folder_path=make_folder(tmp_path / "v2", 2))
    assert read_config(hf_hub_download(repo_id, "config.json")) == {"version": 2}
    assert read_config(hf_hub_download(repo_id, "config.json", revision=sha1)) == {"version": 1}
    snap = Path(snapshot_download(repo_id, revision=sha1, allow_patterns=["*.json", "*.safetensors"]))
    assert sorted(p.name for p in snap.iterdir()) == ["config.json", "model.safetensors"]
    assert read_config(str(snap / "config.json")) == {"version": 1}
    snap_main = Path(snapshot_download(repo_id, allow_patterns=["README.md"]))
    assert (snap_main / "README.md").read_text().endswith("# v2\n")


def test_missing_repo_revision_and_file(uploaded):
    repo_id, _ = uploaded
    assert file_exists(repo_id, "config.json")
    assert not file_exists(repo_id, "nope.bin")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/does-not-exist", "config.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "config.json", revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "nope.bin")


def test_upload_folder_create_pr_leaves_main(hf_api, hub_server, uploaded, tmp_path):
    repo_id, sha1 = uploaded
    info = hf_api.upload_folder(repo_id=repo_id, folder_path=make_folder(tmp_path / "v2", 2), create_pr=True)
    assert info.pr_num == 1 and info.pr_revision == "refs/pr/1"
    assert hub_server.commits(repo_id)[-1] == sha1
    assert read_config(hf_hub_download(repo_id, "config.json")) == {"version": 1}
    assert read_config(hf_hub_download(repo_id, "config.json", revision="refs/pr/1")) == {"version": 2}
    refs = hf_api.list_repo_refs(repo_id, include_pull_requests=True)
    assert [r.ref for r in refs.pull_requests] == ["refs/pr/1"] and refs.branches[0].target_commit == sha1
    # The other flavour: create_commit(create_pr=True) posts `?create_pr=1` to the commit route.
    op = CommitOperationAdd("notes.txt", b"hello")
    info2 = hf_api.create_commit(repo_id, [op], commit_message="notes", create_pr=True)
    assert info2.pr_revision == "refs/pr/2" and "notes.txt" in hub_server.repo_files(repo_id, "refs/pr/2")
    assert hf_api.get_discussion_details(repo_id, 2).is_pull_request


def test_parent_commit_mismatch_is_refused(hf_api, hub_server, uploaded):
    repo_id, sha1 = uploaded
    sha2 = hf_api.upload_file(path_or_fileobj=b"a", path_in_repo="a.txt", repo_id=repo_id).oid
    with pytest.raises(HfHubHTTPError) as err:
        hf_api.create_commit(
            repo_id, [CommitOperationAdd("b.txt", b"b")], commit_message="stale", parent_commit=sha1
        )
    assert err.value.response.status_code == 412
    assert hub_server.commits(repo_id)[-1] == sha2
    hf_api.create_commit(
        repo_id, [CommitOperationAdd("b.txt", b"b")], commit_message="ok", parent_commit=sha2
    )
    assert "b.txt" in hub_server.repo_files(repo_id)


def test_fail_next_commit_leaves_repo_unchanged(hf_api, hub_server, uploaded, tmp_path):
    repo_id, sha1 = uploaded
    before = hub_server.repo_files(repo_id)
    hub_server.fail_next_commit(repo_id)
    with pytest.raises(HfHubHTTPError) as err:
        hf_api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    assert err.value.response.status_code == 500
    # upload_folder retries 5xx commits (http_backoff): make the injected failure a 4xx to see it.
    hub_server.fail_next_commit(repo_id, status=422)
    with pytest.raises(HfHubHTTPError):
        hf_api.upload_folder(repo_id=repo_id, folder_path=make_folder(tmp_path / "v2", 2))
    assert hub_server.repo_files(repo_id) == before and hub_server.commits(repo_id)[-1] == sha1


def test_gated_repo(hub_server, uploaded):
    repo_id, _ = uploaded
    hub_server.set_gated(repo_id)
    assert HfApi().model_info(repo_id).gated == "manual"  # info stays readable, downloads do not
    with pytest.raises(GatedRepoError):
        hf_hub_download(repo_id, "config.json")
    hub_server.set_gated(repo_id, False)
    assert read_config(hf_hub_download(repo_id, "config.json")) == {"version": 1}


def test_unknown_route_is_a_json_404(hub_endpoint):
    for path in ("/api/agent-harnesses", "/api/no/such/route"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(hub_endpoint + path, timeout=10)
        assert err.value.code == 404 and "error" in json.loads(err.value.read())


def test_timm_round_trip(hf_api, repo_id, tmp_path):
    import timm

    model = timm.create_model("test_resnet", pretrained=False, num_classes=10).eval()
    timm.models.save_for_hf(model, str(tmp_path / "m"), safe_serialization=True)
    assert not (tmp_path / "m" / "pytorch_model.bin").exists()
    hf_api.create_repo(repo_id)
    hf_api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "m")
    loaded = timm.create_model(f"hf-hub:{repo_id}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_transformers_round_trip(hf_api, repo_id, tmp_path):
    from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=10,
    )
    model = ViTForImageClassification(cfg).eval()
    model.save_pretrained(tmp_path / "m")
    hf_api.create_repo(repo_id)
    hf_api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "m")
    loaded = AutoModelForImageClassification.from_pretrained(repo_id, trust_remote_code=False).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)


OFFLINE_SCRIPT = textwrap.dedent(
    """
    import sys
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    repo_id, sha = sys.argv[1:3]
    print(open(hf_hub_download(repo_id, "config.json", revision=sha)).read())
    try:
        hf_hub_download(repo_id, "model.safetensors", revision=sha)
    except LocalEntryNotFoundError:
        print("UNCACHED-RAISES")
    """
)


def test_offline_uses_warm_cache(uploaded, hub_server):
    repo_id, sha1 = uploaded
    hf_hub_download(repo_id, "config.json", revision=sha1)  # warm the cache (HF_HOME from conftest)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens
    out = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT, repo_id, sha1],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[0]) == {"version": 1}
    assert "UNCACHED-RAISES" in out.stdout
