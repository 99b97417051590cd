"""Turn what a user types as SOURCE into a loaded model.

A local model folder, a Hub id, ``timm:NAME`` (a timm architecture built with random weights,
which needs no download: handy to see where a model's neurons are), or ``example`` /
``hubdefend:example`` (the small backdoored model shipped with the package, `hubdefend.example`).
"""

from __future__ import annotations

from pathlib import Path

from hubdefend.adapters import LoadedModel
from hubdefend.errors import NotAModelError, UnknownArchitectureError
from hubdefend.example import QUALIFIED_NAME, model_dir, names_example
from hubdefend.model_io import load_folder

TIMM_PREFIX = "timm:"
LOCAL_PREFIX = "local-dir:"


def build_timm(name: str, **model_args) -> LoadedModel:
    """A timm architecture with random weights (no download)."""
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:5]
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise UnknownArchitectureError(f"timm has no architecture named {name!r}.{hint}")
    model = timm.create_model(name, pretrained=False, **model_args).eval()
    return LoadedModel(
        model, "timm", name, {"architecture": name, **model_args}, source=f"{TIMM_PREFIX}{name}"
    )


def load(source: str | Path, revision: str | None = None, *, allow_pickle: bool = False) -> LoadedModel:
    """Load the model that ``source`` names: a local folder (or timm's ``local-dir:PATH``),
    ``timm:NAME``, a Hub id (``org/name[@rev]``, ``hf-hub:org/name``), pinned to a commit sha, or
    ``example`` / ``hubdefend:example``, the bundled backdoored model."""
    from hubdefend.hub_load import is_hub_source, load_from_hub

    source = str(source)
    if source.startswith(TIMM_PREFIX):
        return build_timm(source[len(TIMM_PREFIX) :])
    if names_example(source):
        loaded = load_folder(model_dir())
        loaded.source = QUALIFIED_NAME  # not the install path: reports and cards name it portably
        return loaded
    path = Path(source.removeprefix(LOCAL_PREFIX)).expanduser()
    if path.exists():
        return load_folder(path)
    if is_hub_source(source):
        return load_from_hub(source, revision, allow_pickle=allow_pickle)
    raise NotAModelError(
        f"{source!r} is neither a local model folder, a Hub id (org/name) nor timm:NAME. Give the path of a folder "
        "written by hubdefend.save / save_for_hf / save_pretrained, a Hub model id, timm:resnet18, or example "
        "(the bundled backdoored model)."
    )
