"""Defense registry: ``@register_defense("anp")`` on a `Defense` subclass, `get_defense(name)` to
look one up. Third parties add defenses through the entry-point group ``hubdefend.defenses``."""

from __future__ import annotations

from importlib.metadata import entry_points

from hubdefend.defenses.base import Defense, DefenseConfig, DefenseOutput, NeuronScores
from hubdefend.errors import UnknownDefenseError

ENTRY_POINT_GROUP = "hubdefend.defenses"
_REGISTRY: dict[str, type[Defense]] = {}
_entry_points_loaded = False


def register_defense(name: str):
    """Class decorator registering a `Defense` under ``name``."""

    def decorator(cls: type[Defense]) -> type[Defense]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def _load_entry_points() -> None:
    global _entry_points_loaded
    if not _entry_points_loaded:
        _entry_points_loaded = True
        for entry_point in entry_points(group=ENTRY_POINT_GROUP):
            cls = entry_point.load()
            _REGISTRY.setdefault(entry_point.name, cls)


def list_defenses() -> list[str]:
    """Names of every registered defense, sorted."""
    _load_entry_points()
    return sorted(_REGISTRY)


def data_free_defenses() -> list[str]:
    """Names of the defenses that need no data."""
    return [name for name in list_defenses() if not _REGISTRY[name].needs_data]


def few_shot_defenses() -> list[str]:
    """Names of the defenses that work from a handful of images."""
    return [name for name in list_defenses() if _REGISTRY[name].few_shot]


def get_defense(name: str) -> type[Defense]:
    """The defense class registered as ``name``."""
    _load_entry_points()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownDefenseError(name, list_defenses()) from None


from hubdefend.defenses import anp, bnp, clp, cnp, dbrpu, mcldef, rnp, shap  # noqa: E402, F401  (built-in registrations)

__all__ = [
    "Defense",
    "DefenseConfig",
    "DefenseOutput",
    "NeuronScores",
    "data_free_defenses",
    "few_shot_defenses",
    "get_defense",
    "list_defenses",
    "register_defense",
]
