"""Save and load models in their family's own layout, atomically.

A save writes into a temporary folder beside the target and renames it into place, so a failure
leaves no half-written model behind. A load reads ``config.json`` to tell the family and lets that
family's adapter build the model with its own loader.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from hubdefend.adapters import LoadedModel, adapter_for, list_adapters
from hubdefend.errors import HubDefendError, MaskError, NotAModelError
from hubdefend.masks import is_masked


def save(
    model: nn.Module,
    directory: str | Path,
    *,
    image_processor: Any = None,
    overwrite: bool = False,
) -> Path:
    """Save ``model`` in its family's layout (timm: config.json + model.safetensors; transformers:
    ``save_pretrained``, with the image processor when given).

    Args:
        model: a timm or transformers model without mask hooks (bake first).
        directory: the folder to create. It must not exist, or be empty, unless ``overwrite``.
        image_processor: a transformers image processor to save beside the model.
        overwrite: replace an existing non-empty folder.

    Returns:
        The folder written.

    Raises:
        MaskError: the model still carries mask hooks.
        HubDefendError: the folder exists and is not empty, or the model has no family layout.
    """
    if is_masked(model):
        raise MaskError(
            "The model still carries hubdefend mask hooks: bake the plan or detach the masks first."
        )
    target = Path(directory)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise HubDefendError(
            f"{target} exists and is not empty. Choose a new folder, or pass overwrite=True."
        )
    adapter = adapter_for(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        adapter.save(model, staging, image_processor=image_processor)
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def read_config(directory: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a model folder, with errors that say what is wrong."""
    if not directory.is_dir():
        raise NotAModelError(f"{directory} is not a folder. Give the path of a saved model folder.")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise NotAModelError(
            f"{directory} holds no config.json, so it is not a saved timm or transformers model. Give a folder "
            "written by hubdefend.save, timm's save_for_hf or transformers' save_pretrained."
        )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NotAModelError(f"{config_path} is not valid JSON ({exc}). Re-save the model.") from exc
    if not isinstance(config, dict):
        raise NotAModelError(f"{config_path} does not hold a JSON object. Re-save the model.")
    return config


def load_folder(directory: str | Path) -> LoadedModel:
    """Load a model saved in a family layout (timm or transformers) from a local folder.

    Raises:
        NotAModelError: the folder is missing, has no config.json or no safetensors weights.
        UnknownArchitectureError: the config names an architecture its family does not know.
        WeightsMismatchError: the weights do not fit the architecture.
    """
    path = Path(directory)
    config = read_config(path)
    for cls in list_adapters():
        if cls.can_load(config):
            return cls().load(path, config)
    raise NotAModelError(
        f"{path}/config.json has neither 'architecture' (timm) nor 'model_type' (transformers), so hubdefend "
        "cannot tell which library built the model."
    )
