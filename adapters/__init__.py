"""Adapters: one per model family. Each finds the neurons of a model and saves/loads it in its
family's own layout. `discover` picks the adapter by what the model is.

Third parties add an adapter through the entry-point group ``hubdefend.adapters``; the entry point
names an `Adapter` subclass. Registered adapters are tried before the built-in ones, most specific
first; the generic torch adapter, last, takes any ``nn.Module``.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from torch import nn

from hubdefend.adapters.base import Adapter, LoadedModel
from hubdefend.errors import HubDefendError, NoNormLayersError
from hubdefend.neurons import EXCLUSIVE_KINDS, NEURON_KINDS, NeuronGroup

ENTRY_POINT_GROUP = "hubdefend.adapters"
_REGISTRY: list[type[Adapter]] = []
_entry_points_loaded = False


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make ``cls`` available to `discover`, `save` and `load`.

    Later registrations are tried first, so a plug-in overrides a built-in adapter.
    """
    if cls not in _REGISTRY:
        _REGISTRY.insert(0, cls)
    return cls


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        cls = entry_point.load()
        if not (isinstance(cls, type) and issubclass(cls, Adapter)):
            raise HubDefendError(
                f"Entry point {entry_point.name!r} in group {ENTRY_POINT_GROUP!r} names {cls!r}, which is not "
                "a hubdefend.adapters.Adapter subclass. Fix or uninstall the package that declares it."
            )
        register_adapter(cls)


def list_adapters() -> list[type[Adapter]]:
    """Adapters in the order they are tried."""
    _load_entry_points()
    return list(_REGISTRY)


def adapter_for(model: nn.Module) -> Adapter:
    """The first adapter that recognises ``model`` (the torch adapter takes any module)."""
    for cls in list_adapters():
        if cls.matches(model):
            return cls()
    raise HubDefendError(f"{type(model).__name__} is not a torch nn.Module; hubdefend works on torch models.")


def discover(model: nn.Module, *, kinds: tuple[str, ...] | list[str] = ("norm",)) -> list[NeuronGroup]:
    """Find the neurons of ``model``.

    Args:
        model: a timm, transformers or any other torch model (not ``torch.compile``d: compile after).
        kinds: which neuron kinds to return: ``"norm"`` (normalization channels, the default),
            ``"mlp"`` (transformer MLP hidden units), ``"head"`` (attention heads) or ``"attn"``
            (the channels of the attention output, ``head_dim`` per head; not with ``"head"``).

    Returns:
        One `NeuronGroup` per layer, in module order, norms first.

    Raises:
        NoNormLayersError: ``"norm"`` was asked for and the model has no normalization layer.
        HubDefendError: an unknown kind, or ``"head"`` with ``"attn"``.
    """
    unknown = set(kinds) - set(NEURON_KINDS)
    if unknown:
        raise HubDefendError(f"Unknown neuron kind(s) {sorted(unknown)}; choose from {list(NEURON_KINDS)}.")
    if all(kind in kinds for kind in EXCLUSIVE_KINDS):
        raise HubDefendError(
            "Neuron kinds 'head' and 'attn' mask the same projection input (a head is head_dim attn "
            "channels): choose one of them."
        )
    adapter = adapter_for(model)
    groups = adapter.discover(model, kinds=tuple(kinds))
    if "norm" in kinds and not any(g.kind == "norm" for g in groups):
        raise NoNormLayersError(adapter.architecture(model))
    return groups


def available_kinds(model: nn.Module) -> tuple[str, ...]:
    """The neuron kinds `discover` finds in ``model``, in `NEURON_KINDS` order."""
    found = {g.kind for g in adapter_for(model).discover(model, kinds=("norm", "mlp", "head"))}
    if "head" in found:
        found.add("attn")  # the same layers as the heads, one neuron per channel
    return tuple(kind for kind in NEURON_KINDS if kind in found)


# Built-in adapters register on import; the generic one first so that it is tried last.
from hubdefend.adapters import torch_modules, transformers_models, timm_models  # noqa: E402, F401, I001

__all__ = [
    "ENTRY_POINT_GROUP",
    "Adapter",
    "LoadedModel",
    "adapter_for",
    "available_kinds",
    "discover",
    "list_adapters",
    "register_adapter",
]
