"""Safe loading from the Hugging Face Hub: pin the revision, download only what is needed, refuse
what can run code.

Policy (DESIGN.md): safetensors only by default; pickle weights only with ``allow_pickle=True``,
after a clean picklescan, loaded with ``weights_only=True``; never ``trust_remote_code``; timm
configs that switch to custom loaders are refused.
"""

from __future__ import annotations

import re
import tempfile
import warnings
from pathlib import Path

from hubdefend.adapters import LoadedModel
from hubdefend.errors import HubDefendError, NotAModelError
from hubdefend.model_io import load_folder, read_config

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
NEEDED_FILES = ["*.json", "*.safetensors", "README.md"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubLoadError(HubDefendError, OSError):
    """A Hub model cannot be loaded safely, or at all."""

    def __init__(self, message: str, *, repo_id: str | None = None) -> None:
        self.repo_id = repo_id
        super().__init__(message)


class RemoteCodeRefused(HubLoadError, PermissionError):
    """The repo needs its own Python code to build the model."""


class PickleWeightsRefused(HubLoadError, PermissionError):
    """The repo has only pickle weights, which can run code when loaded."""


def parse_source(source: str) -> tuple[str, str | None]:
    """``org/name[@revision]`` or timm's ``hf-hub:org/name[@revision]`` -> (repo id, revision)."""
    text = source.removeprefix("hf-hub:")
    repo_id, _, revision = text.partition("@")
    if not _REPO_ID.match(repo_id):
        raise HubLoadError(
            f"{source!r} is not a Hub model id: write org/name, org/name@revision or hf-hub:org/name."
        )
    return repo_id, revision or None


def is_hub_source(source: str) -> bool:
    if source.startswith("hf-hub:"):
        return True
    return bool(_REPO_ID.match(source.partition("@")[0])) and not Path(source).exists()


def _client_errors():
    from huggingface_hub import errors

    return errors


def _model_info(api, repo_id: str, revision: str | None):
    errors = _client_errors()
    try:
        return api.model_info(repo_id, revision=revision)
    except errors.GatedRepoError as exc:
        raise HubLoadError(
            f"{repo_id} is gated: accept its conditions on the Hub and log in (hf auth login) or set HF_TOKEN.",
            repo_id=repo_id,
        ) from exc
    except errors.RevisionNotFoundError as exc:
        raise HubLoadError(
            f"{repo_id} has no revision {revision!r}. Give a branch, tag or commit sha that exists.",
            repo_id=repo_id,
        ) from exc
    except errors.RepositoryNotFoundError as exc:
        raise HubLoadError(
            f"No model repo {repo_id!r} on {api.endpoint} (or it is private and you are not logged in). "
            "Check the id, or log in with hf auth login.",
            repo_id=repo_id,
        ) from exc
    except errors.OfflineModeIsEnabled as exc:
        raise HubLoadError(
            f"Offline mode (HF_HUB_OFFLINE=1) and {repo_id} is not pinned to a cached commit: give org/name@<sha> of "
            "a revision in the cache, or go online.",
            repo_id=repo_id,
        ) from exc


def _check_files(repo_id: str, files: list[str], *, allow_pickle: bool) -> list[str]:
    """Refuse remote code and pickle-only repos; return the pickle files to fetch (if allowed)."""
    if any(f.endswith(".py") for f in files):
        raise RemoteCodeRefused(
            f"{repo_id} ships Python code ({', '.join(f for f in files if f.endswith('.py'))}) to build its model. "
            "hubdefend never runs a repo's code: use a model that loads with stock timm or transformers.",
            repo_id=repo_id,
        )
    safetensors = [f for f in files if f.endswith(".safetensors")]
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if safetensors and pickles:
        warnings.warn(
            f"{repo_id} has both safetensors and pickle weights; hubdefend loads only the safetensors.",
            stacklevel=3,
        )
        return []
    if not safetensors and pickles:
        if not allow_pickle:
            raise PickleWeightsRefused(
                f"{repo_id} has only pickle weights ({', '.join(pickles)}), which can run code on load. Ask the author "
                "for model.safetensors, or pass --allow-pickle if you trust this repo (it is scanned first).",
                repo_id=repo_id,
            )
        return pickles
    if not safetensors:
        raise NotAModelError(f"{repo_id} has no model weights (no .safetensors file).")
    return []


def _check_config(repo_id: str, config: dict) -> None:
    if config.get("auto_map"):
        raise RemoteCodeRefused(
            f"{repo_id}'s config.json has auto_map: its model class lives in the repo's own code, which hubdefend never "
            "runs. Use a model that loads with stock timm or transformers.",
            repo_id=repo_id,
        )
    pretrained_cfg = config.get("pretrained_cfg") or {}
    if pretrained_cfg.get("custom_load") or pretrained_cfg.get("hf_hub_filename"):
        raise HubLoadError(
            f"{repo_id}'s timm config switches to a custom loader (custom_load / hf_hub_filename), which hubdefend "
            "refuses for untrusted repos. Use a repo with plain model.safetensors.",
            repo_id=repo_id,
        )


def _scan_pickles(folder: Path, pickles: list[str], repo_id: str) -> None:
    from picklescan.scanner import scan_file_path

    for name in pickles:
        result = scan_file_path(str(folder / name))
        if result.infected_files or result.issues_count or result.scan_err:
            raise PickleWeightsRefused(
                f"picklescan flagged {repo_id}/{name} ({result.issues_count} dangerous imports): not loading it.",
                repo_id=repo_id,
            )


def _convert_pickle(folder: Path, pickles: list[str]) -> None:
    """Load scanned pickle weights with weights_only=True and write them as model.safetensors."""
    import torch
    from safetensors.torch import save_file

    state = torch.load(folder / pickles[0], map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")


def load_from_hub(source: str, revision: str | None = None, *, allow_pickle: bool = False) -> LoadedModel:
    """Load ``org/name[@rev]`` from the Hub safely, pinned to a commit sha.

    Raises:
        HubLoadError: missing / gated repo or revision, remote code, pickle-only weights (without
            ``allow_pickle``), custom timm loaders.
    """
    from huggingface_hub import HfApi, constants, snapshot_download

    repo_id, rev = parse_source(source)
    revision = revision or rev
    if constants.is_offline_mode():
        folder, sha = _cached_snapshot(repo_id, revision)
        files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        pickles = _check_files(repo_id, files, allow_pickle=allow_pickle)
    else:
        api = HfApi()
        info = _model_info(api, repo_id, revision)
        sha = info.sha
        files = [s.rfilename for s in (info.siblings or [])]
        pickles = _check_files(repo_id, files, allow_pickle=allow_pickle)
        patterns = NEEDED_FILES + pickles
        folder = Path(snapshot_download(repo_id, revision=sha, allow_patterns=patterns))
        _remember_revision(folder, revision or "main", sha)
    config = read_config(folder)
    _check_config(repo_id, config)
    if pickles:
        _scan_pickles(folder, pickles, repo_id)
        # Convert a copy: the Hub cache stays exactly what the server sent.
        local = Path(tempfile.mkdtemp(prefix="hubdefend-pickle-"))
        for path in folder.iterdir():
            if path.is_file():
                (local / path.name).write_bytes(path.read_bytes())
        _convert_pickle(local, pickles)
        folder = local
    if not _has_license(folder):
        warnings.warn(
            f"{repo_id} states no licence in its model card: check the terms before republishing.",
            stacklevel=2,
        )
    loaded = load_folder(folder)
    loaded.source, loaded.revision = repo_id, sha
    loaded.extra["license"] = _license(folder)
    return loaded


def _cached_snapshot(repo_id: str, revision: str | None) -> tuple[Path, str]:
    """Offline (HF_HUB_OFFLINE=1): the cached snapshot of ``revision`` (default main) and its sha."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, revision=revision or "main", allow_patterns=NEEDED_FILES))
    except _client_errors().LocalEntryNotFoundError as exc:
        raise HubLoadError(
            f"Offline mode (HF_HUB_OFFLINE=1) and {repo_id}@{revision or 'main'} is not in the Hugging Face cache: "
            "scan it once online, or unset HF_HUB_OFFLINE.",
            repo_id=repo_id,
        ) from exc
    return folder, folder.name


def _remember_revision(folder: Path, revision: str, sha: str) -> None:
    """Record ``revision -> sha`` in the cache (a download by sha does not), so that the same source
    still resolves offline."""
    if revision == sha:
        return
    ref = folder.parent.parent / "refs" / revision
    try:
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(sha)
    except OSError:  # a read-only cache only costs offline use
        pass


def _license(folder: Path) -> str | None:
    readme = folder / "README.md"
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(readme).data.to_dict().get("license")
    except Exception:  # noqa: BLE001 - a malformed card means no stated licence
        return None


def _has_license(folder: Path) -> bool:
    return _license(folder) is not None


__all__ = [
    "HubLoadError",
    "PickleWeightsRefused",
    "RemoteCodeRefused",
    "is_hub_source",
    "load_from_hub",
    "parse_source",
]
