"""The one `Report` that the CLI prints, the card shows and the API returns.

JSON-serialisable and versioned: bump `SCHEMA_VERSION` when a field changes meaning or goes away;
adding a field is backwards compatible.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hubdefend

SCHEMA_VERSION = 1


@dataclass
class Report:
    """What a defense run did and achieved. Fractions in [0, 1]; ``None`` where not measurable."""

    defense: str
    options: dict[str, Any]
    model: dict[str, Any]
    data: dict[str, Any]
    neuron_kinds: list[str]
    neurons_total: int
    neurons_pruned: int
    pruned: dict[str, list[int]]
    operating_point: dict[str, Any]
    # Low-scored neurons kept because clean data could not spare them (`planning.protect_critical`).
    protected: dict[str, list[int]] = field(default_factory=dict)
    # True when the defense changed weights (fine-tuning, unlearning), not only pruned neurons.
    weights_changed: bool = False
    ba_before: float | None = None
    ba_after: float | None = None
    asr_before: float | None = None
    asr_after: float | None = None
    trigger: str | None = None
    val_accuracy_before: float | None = None
    val_accuracy_after: float | None = None
    reversed_asr_before: float | None = None
    reversed_asr_after: float | None = None
    suspected_target: int | None = None
    deviations: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    sweep: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    defense_seconds: float = 0.0
    peak_memory_mb: float | None = None
    seed: int = 0
    hubdefend_version: str = hubdefend.__version__
    schema_version: int = SCHEMA_VERSION

    @property
    def pruned_per_layer(self) -> dict[str, int]:
        return {name: len(indices) for name, indices in self.pruned.items()}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_jsonable)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> Report:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in payload.items() if k in known})


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)
