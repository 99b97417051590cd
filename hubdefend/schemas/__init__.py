"""JSON Schemas (draft 2020-12) of hubdefend's JSON output, shipped as package data.

- ``report`` (``report.schema.json``): ``hubdefend sanitize --json`` and ``report.json``
  (`hubdefend.report.Report`).
- ``scan`` (``scan.schema.json``): ``hubdefend scan --json`` (`hubdefend.scan.ScanResult`); when a defense
  ran it also holds every report field, and refers to ``report.schema.json`` for them.

Both follow `hubdefend.report.SCHEMA_VERSION`. Validating needs ``jsonschema`` (the ``dev`` extra).
"""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files
from typing import Any

SCHEMAS = ("report", "scan")


@cache
def _text(name: str) -> str:
    if name not in SCHEMAS:
        raise ValueError(f"Unknown schema {name!r}: choose one of {', '.join(SCHEMAS)}.")
    return files(__package__).joinpath(f"{name}.schema.json").read_text(encoding="utf-8")


def load_schema(name: str) -> dict[str, Any]:
    """The schema ``name`` (``"report"`` or ``"scan"``) as a fresh dict."""
    return json.loads(_text(name))


def validator(name: str):
    """A ``jsonschema`` validator for ``name`` that resolves the references between the schemas."""
    try:
        from jsonschema import Draft202012Validator
        from referencing import Registry, Resource
    except ImportError as exc:  # not a runtime dependency
        raise ImportError(
            "Validating needs jsonschema: pip install 'hubdefend[dev]' (or jsonschema)."
        ) from exc
    registry = Registry().with_resources(
        (f"{other}.schema.json", Resource.from_contents(load_schema(other))) for other in SCHEMAS
    )
    return Draft202012Validator(load_schema(name), registry=registry)


def validate(payload: dict[str, Any], name: str) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``payload`` is valid under the schema ``name``."""
    validator(name).validate(payload)
