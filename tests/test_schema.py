"""The JSON output follows its documented schemas (hubdefend/schemas/*.schema.json; issue 5).

A real quick `sanitize()` report and a real `hubdefend scan --json` validate; a scan that ran a
defense must carry the whole report; malformed payloads are rejected.
"""

from __future__ import annotations

import copy
import io
import json
import sys
from contextlib import redirect_stdout
from dataclasses import fields
from typing import Any

import pytest
from jsonschema import Draft202012Validator, ValidationError  # the dev extra

import hubdefend
from hubdefend.data import load_data
from hubdefend.preprocess import Preprocessing
from hubdefend.report import SCHEMA_VERSION, Report
from hubdefend.scan import VERDICT_SUSPECTED, ScanResult
from hubdefend.schemas import SCHEMAS, load_schema, validate, validator

TRIGGER = "badnets:size=3,corner=br,target=0"


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    """The report of a quick ANP run on the bundled example, as printed (through JSON)."""
    from hubdefend.sanitize import sanitize

    loaded = hubdefend.load("hubdefend:example")
    data = load_data("example", Preprocessing.from_timm(loaded.model))
    result = sanitize(
        loaded,
        data,
        defense="anp",
        trigger=TRIGGER,
        eval_data=data,
        prune=5,
        iterations=5,
        batch_size=32,
        progress=False,
    )
    return json.loads(result.report.to_json())


@pytest.fixture(scope="module")
def scan_payload() -> dict[str, Any]:
    """`hubdefend scan hubdefend:example --json` (no data: the quick path), run in-process
    (module scope, so stdout is redirected here rather than read with capsys)."""
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars

    from hubdefend.cli import EXIT_BACKDOOR_SUSPECTED, main

    bars_were_off = are_progress_bars_disabled()
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, redirect_stdout(stdout), pytest.raises(SystemExit) as exit_info:
        mp.setattr(sys, "argv", ["hubdefend", "scan", "hubdefend:example", "--json"])
        main()
    if not bars_were_off:  # --json turns huggingface_hub's bars off for the whole process
        enable_progress_bars()
    assert exit_info.value.code == EXIT_BACKDOOR_SUSPECTED  # the example is backdoored
    return json.loads(stdout.getvalue())  # --json: stdout is ONE JSON object and nothing else


def errors(payload: dict[str, Any], name: str) -> list[str]:
    return [error.message for error in validator(name).iter_errors(payload)]


def test_schemas_are_valid_and_documented() -> None:
    for name in SCHEMAS:
        schema = load_schema(name)
        Draft202012Validator.check_schema(schema)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert schema["properties"]["schema_version"]["const"] == SCHEMA_VERSION
        undocumented = [path for path, sub in _properties(schema) if "description" not in sub]
        assert not undocumented, f"{name}: fields without a description: {undocumented}"
    # Every field the code writes is in its schema (adding one without documenting it fails here).
    assert {f.name for f in fields(Report)} <= set(load_schema("report")["properties"])
    scan_keys = ScanResult(source={"id": "x", "revision": None}, model={}).to_dict()
    assert set(scan_keys) <= set(load_schema("scan")["properties"])


def _properties(schema: Any, path: str = ""):
    """(path, subschema) for every field the schema defines, at any depth (conditions excluded:
    their ``properties`` only restate fields defined elsewhere)."""
    if isinstance(schema, dict):
        for key, sub in schema.items():
            if key == "properties":
                for field_name, field_schema in sub.items():
                    yield f"{path}/{field_name}", field_schema
                    yield from _properties(field_schema, f"{path}/{field_name}")
            elif key not in ("if", "then", "else", "not"):
                yield from _properties(sub, f"{path}/{key}")
    elif isinstance(schema, list):
        for i, sub in enumerate(schema):
            yield from _properties(sub, f"{path}/{i}")


def test_sanitize_report_validates(report: dict[str, Any]) -> None:
    validate(report, "report")
    assert report["asr_before"] is not None and report["neurons_pruned"] == 5  # a real, measured run


def test_scan_json_validates(scan_payload: dict[str, Any]) -> None:
    validate(scan_payload, "scan")
    assert scan_payload["source"] == {"id": "hubdefend:example", "revision": None}
    assert "defense" not in scan_payload  # no data: no defense ran, no report fields


def test_scan_with_a_defense_carries_the_whole_report(report: dict[str, Any]) -> None:
    result = ScanResult(
        source={"id": "org/model", "revision": "0123456789abcdef0123456789abcdef01234567"},
        model={
            "family": "timm",
            "architecture": "test_resnet",
            "parameters": 1,
            "norm_layers": 1,
            "neurons": 8,
        },
        verdict=VERDICT_SUSPECTED,
        suspected_target=0,
        anomaly_index=3.2,
        detection={"method": "clean-data", "anomaly_index": [3.2, 0.4], "suspected_target": 0},
        sanitize=report,
        pushed={
            "repo_id": "org/model-clean",
            "commit_sha": "89abcdef0123456789abcdef0123456789abcdef",
            "commit_url": "https://huggingface.co/org/model-clean/commit/89abcdef",
            "pr_url": None,
        },
        out="cleaned",
    )
    payload = json.loads(json.dumps(result.to_dict()))
    validate(payload, "scan")
    del payload["ba_before"]  # `defense` is there, so every report field must be
    assert "'ba_before' is a required property" in errors(payload, "scan")


@pytest.mark.parametrize(
    ("name", "change", "expected"),
    [
        ("report", lambda p: p.update(asr_after=1.5), "1.5 is greater than the maximum of 1"),
        ("report", lambda p: p.pop("defense"), "'defense' is a required property"),
        ("report", lambda p: p.update(schema_version=2), "1 was expected"),
        ("report", lambda p: p["pruned"].update(layer=[-1]), "-1 is less than the minimum of 0"),
        ("scan", lambda p: p.update(verdict="clean"), "'clean' is not one of"),
        ("scan", lambda p: p.update(suspected_target=None), "None is not of type 'integer'"),
        (
            "scan",
            lambda p: p["source"].update(revision="main"),
            "is not valid under any of the given schemas",
        ),
        (
            "scan",
            lambda p: p.update(pushed={"repo_id": "org/x"}),
            "is not valid under any of the given schemas",
        ),
    ],
)
def test_malformed_payloads_are_rejected(
    report: dict[str, Any], scan_payload: dict[str, Any], name: str, change, expected: str
) -> None:
    payload = copy.deepcopy(report if name == "report" else scan_payload)
    validate(payload, name)
    change(payload)
    with pytest.raises(ValidationError):
        validate(payload, name)
    assert any(expected in message for message in errors(payload, name)), errors(payload, name)


def test_unknown_schema_name() -> None:
    with pytest.raises(ValueError, match="Unknown schema 'card'"):
        load_schema("card")
