"""Turn what a user types as SOURCE into a loaded model.

Today: a local model folder, or ``timm:NAME`` (a timm architecture built with random weights, which
needs no download: handy to see where a model's neurons are). Hub ids come with the Hub loader.
"""

from __future__ import annotations

from pathlib import Path

from hubdefend.adapters import LoadedModel
from hubdefend.errors import NotAModelError, UnknownArchitectureError
from hubdefend.model_io import load

TIMM_PREFIX = "timm:"


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


def resolve_model(source: str) -> LoadedModel:
    """Load the model that ``source`` names: a local folder or ``timm:NAME``."""
    if source.startswith(TIMM_PREFIX):
        return build_timm(source[len(TIMM_PREFIX) :])
    path = Path(source).expanduser()
    if path.exists():
        return load(path)
    raise NotAModelError(
        f"{source!r} is neither a local model folder nor timm:NAME. Give the path of a folder written by "
        "hubdefend.save / save_for_hf / save_pretrained, or timm:resnet18 to build a timm architecture."
    )
