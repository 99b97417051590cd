"""The ``hubdefend`` command. Commands parse options and call the library; `Output` prints.

Errors that hubdefend raises on purpose print one line and exit with `EXIT_ERROR`; a traceback
is shown only with ``HUBDEFEND_DEBUG=1``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.table import Table

import hubdefend
from hubdefend.errors import HubDefendError
from hubdefend.planning import DEFAULT_BA_BUDGET
from hubdefend.sources import load as load_model

EXIT_OK = 0  # no backdoor evidence
EXIT_ERROR = 1  # hubdefend could not do what was asked (the message says why)
EXIT_BACKDOOR_SUSPECTED = 10  # scan: the model is suspected to carry a backdoor

app = typer.Typer(
    name="hubdefend",
    help="Find and remove backdoors in vision models from the Hugging Face Hub.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class Output:
    """One place that prints: human tables on stdout, or one JSON object with ``--json``."""

    def __init__(self, *, as_json: bool = False, quiet: bool = False) -> None:
        self.as_json = as_json
        self.quiet = quiet
        self.console = Console(highlight=False)
        self.errors = Console(stderr=True, highlight=False)

    def json(self, payload: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")

    def table(self, table: Table) -> None:
        if not self.quiet:
            self.console.print(table)

    def line(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text)

    def error(self, message: str) -> None:
        self.errors.print(f"[bold red]Error:[/] {message}", markup=True, soft_wrap=True)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"hubdefend {hubdefend.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Find and remove backdoors in vision models from the Hugging Face Hub."""


@app.command()
def inspect(
    source: Annotated[
        str,
        typer.Argument(
            help="A saved model folder, timm:NAME to build a timm architecture, or example (the bundled model)."
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
) -> None:
    """Show a model's family, architecture, size and normalization layers (its neurons)."""
    out = Output(as_json=as_json)
    loaded = load_model(source)
    groups = hubdefend.discover(loaded.model)
    facts = {
        "source": source,
        "family": loaded.family,
        "architecture": loaded.architecture,
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "norm_layers": len(groups),
        "neurons": sum(g.num_neurons for g in groups),
        "layers": [
            {
                "name": g.name,
                "type": g.layer_type,
                "neurons": g.num_neurons,
                "channel_dim": g.channel_dim,
                "fused_activation": g.hook_on != "output",
            }
            for g in groups
        ],
    }
    if as_json:
        out.json(facts)
        return
    out.line(
        f"[bold]{facts['architecture']}[/] ({facts['family']}), {facts['parameters']:,} parameters, "
        f"{facts['norm_layers']} normalization layers, {facts['neurons']:,} neurons"
    )
    table = Table("layer", "type", "neurons", "channel dim", "fused act")
    for layer in facts["layers"]:
        table.add_row(
            layer["name"],
            layer["type"],
            str(layer["neurons"]),
            str(layer["channel_dim"]),
            "yes" if layer["fused_activation"] else "",
        )
    out.table(table)


@app.command()
def evaluate(
    source: Annotated[
        str, typer.Argument(help="A saved model folder, timm:NAME, or example (the bundled model).")
    ],
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="Clean test data: an image folder, hf:NAME[:SPLIT], a saved datasets folder, fmnist[:train|test], or example (the bundled images).",
        ),
    ],
    trigger: Annotated[
        str | None, typer.Option("--trigger", help="Trigger spec, e.g. badnets:size=3,corner=br,target=0.")
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Use only the first N images.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Measure benign accuracy (BA) and, with --trigger, attack success rate (ASR)."""
    from hubdefend.data import load_data
    from hubdefend.metrics import evaluate as run_evaluation
    from hubdefend.preprocess import Preprocessing
    from hubdefend.triggers import parse_trigger

    out = Output(as_json=as_json, quiet=quiet)
    loaded = load_model(source)
    preprocessing = Preprocessing.from_model(loaded.model, image_processor=loaded.image_processor)
    dataset = load_data(data, preprocessing, limit=limit)
    spec = parse_trigger(trigger) if trigger else None
    loader = torch.utils.data.DataLoader(dataset, batch_size=256)
    result = run_evaluation(
        loaded.model, loader, preprocessing, trigger=spec, progress=not (quiet or as_json)
    )
    payload = {"source": source, "trigger": spec.to_spec() if spec else None, **result.to_dict()}
    if as_json:
        out.json(payload)
        return
    table = Table("metric", "value")
    table.add_row("BA (benign accuracy)", f"{result.ba:.4f}  ({result.n_clean} images)")
    if result.asr is not None:
        table.add_row(
            "ASR (attack success rate)", f"{result.asr:.4f}  ({result.n_triggered} non-target images)"
        )
        table.add_row("robust accuracy", f"{result.robust_accuracy:.4f}")
    out.table(table)


@app.command()
def sanitize(
    source: Annotated[
        str, typer.Argument(help="A saved model folder, timm:NAME, or example (the bundled model).")
    ],
    out_dir: Annotated[
        Path, typer.Option("--out", help="Folder to write the cleaned model and report.json into.")
    ],
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="Clean defender data (20% is held out to choose the operating point). Data-free defenses "
            "(clp, dbrpu, shap) run without it.",
        ),
    ] = None,
    defense: Annotated[
        str, typer.Option("--defense", help="Defense name; see `hubdefend list-defenses`.")
    ] = "anp",
    eval_data: Annotated[
        str | None, typer.Option("--eval-data", help="Clean test data for BA/ASR (never used to choose).")
    ] = None,
    trigger: Annotated[
        str | None, typer.Option("--trigger", help="The attack's trigger spec, when known, to measure ASR.")
    ] = None,
    prune: Annotated[
        str,
        typer.Option("--prune", help="auto, a threshold in [0,1) such as 0.2, or a neuron count such as 48."),
    ] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seed for the split, the defense and the sweep.")] = 0,
    defender_size: Annotated[
        int | None, typer.Option("--defender-size", help="Use only N images of --data.")
    ] = None,
    kinds: Annotated[
        str | None,
        typer.Option(
            "--kinds",
            help="Neuron kinds to prune, comma-separated: norm, mlp, head, attn (attention channels, head_dim "
            "per head; not with head). Default: norm for CNNs, mlp,attn for transformers.",
        ),
    ] = None,
    ba_budget: Annotated[
        float,
        typer.Option(
            "--ba-budget", help="Clean accuracy the automatic operating point may spend (0.02: 2 points)."
        ),
    ] = DEFAULT_BA_BUDGET,
    option: Annotated[
        list[str] | None,
        typer.Option("--option", "-o", help="Defense option KEY=VALUE (repeatable), e.g. -o iterations=500."),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Prune a model's backdoor neurons with clean data only (or none, for a data-free defense); write the
    cleaned model and report."""
    from hubdefend.sanitize import sanitize as run_sanitize

    out = Output(as_json=as_json, quiet=quiet)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise HubDefendError(
            f"{out_dir} exists and is not empty. Choose a new --out folder, or pass --overwrite."
        )
    result = run_sanitize(
        load_model(source),
        data,
        defense=defense,
        trigger=trigger,
        eval_data=eval_data,
        prune=prune,
        seed=seed,
        defender_size=defender_size,
        kinds=tuple(k.strip() for k in kinds.split(",") if k.strip()) if kinds else None,
        ba_budget=ba_budget,
        progress=not (quiet or as_json),
        **parse_options(option or []),
    )
    result.save(out_dir, overwrite=overwrite)
    report = result.report
    if as_json:
        out.json(report.to_dict())
        return
    table = Table("", "before", "after")
    for label, before, after in [
        ("BA", report.ba_before, report.ba_after),
        ("ASR", report.asr_before, report.asr_after),
        ("defender clean accuracy", report.val_accuracy_before, report.val_accuracy_after),
        ("reversed-trigger ASR", report.reversed_asr_before, report.reversed_asr_after),
    ]:
        table.add_row(label, _fraction(before), _fraction(after))
    out.table(table)
    out.line(
        f"{report.defense}: pruned {report.neurons_pruned} of {report.neurons_total} neurons "
        f"({report.operating_point['rule']}) in {report.seconds:.1f} s; wrote {out_dir}"
    )


@app.command(
    epilog="Exit status: 0 no backdoor evidence; 10 backdoor suspected; 1 error (one line on stderr).",
)
def scan(
    source: Annotated[
        str,
        typer.Argument(
            help="A Hub model id (org/name[@revision]), a local model folder, timm:NAME, or example."
        ),
    ],
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="Clean images: the detectors use up to 500 of them (labels unused), and the defense all.",
        ),
    ] = None,
    defense: Annotated[
        str | None,
        typer.Option(
            "--defense", help="Sanitize with this defense (default anp when --out or --push is given)."
        ),
    ] = None,
    trigger: Annotated[
        str | None, typer.Option("--trigger", help="The attack's trigger spec, when known, to measure ASR.")
    ] = None,
    eval_data: Annotated[
        str | None, typer.Option("--eval-data", help="Clean test data for BA/ASR in the report and card.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Write the cleaned model, README.md card, report.json and plots here."),
    ] = None,
    push: Annotated[
        str | None, typer.Option("--push", help="Publish the cleaned model to this Hub repo in one commit.")
    ] = None,
    pr: Annotated[
        bool, typer.Option("--pr", help="Open a pull request instead (on --push, or on the source repo).")
    ] = False,
    private: Annotated[bool, typer.Option("--private", help="Create the --push repo as private.")] = False,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Allow pickle-only weights after a clean picklescan.")
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed for detection and the defense.")] = 0,
    option: Annotated[
        list[str] | None, typer.Option("--option", "-o", help="Defense option KEY=VALUE (repeatable).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Is this model backdoored? With --data: which class is the target; with --out/--push: clean and publish it."""
    from hubdefend.scan import VERDICT_SUSPECTED
    from hubdefend.scan import scan as run_scan

    out_console = Output(as_json=as_json, quiet=quiet)
    if quiet or as_json:  # huggingface_hub's download bars too, not only hubdefend's
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if out is not None and out.exists() and any(out.iterdir()):
        raise HubDefendError(f"{out} exists and is not empty. Choose a new --out folder.")
    push_target = push
    if pr and push is None:
        push_target = source.removeprefix("hf-hub:").partition("@")[0]  # a pull request on the scanned repo
    result = run_scan(
        source,
        data=data,
        defense=defense,
        trigger=trigger,
        eval_data=eval_data,
        out=out,
        push=push_target,
        pr=pr,
        private=private,
        allow_pickle=allow_pickle,
        seed=seed,
        progress=not (quiet or as_json),
        **parse_options(option or []),
    )
    payload = result.to_dict()
    if as_json:
        out_console.json(payload)
    else:
        _print_scan(out_console, result)
    if result.verdict == VERDICT_SUSPECTED:
        raise typer.Exit(EXIT_BACKDOOR_SUSPECTED)


def _print_scan(out: Output, result) -> None:
    source = result.source
    revision = f"@{source['revision'][:12]}" if source.get("revision") else ""
    facts = result.model
    out.line(
        f"[bold]{source['id']}{revision}[/]: {facts['architecture']} ({facts['family']}), "
        f"{facts['parameters']:,} parameters, {facts['neurons']:,} neurons in {facts['norm_layers']} norm layers"
    )
    for warning in result.warnings:
        out.line(f"[yellow]warning:[/] {warning}")
    if result.verdict == "backdoor_suspected":
        out.line(
            f"[bold red]backdoored, target class {result.suspected_target}[/] "
            f"(anomaly index {result.anomaly_index:.2f}, {result.detection.get('method')})"
        )
    else:
        note = result.detection.get("note") or f"anomaly index {result.anomaly_index:.2f}"
        out.line(f"[bold green]no backdoor evidence[/] ({note})")
    if result.sanitize:
        report = result.sanitize
        table = Table("", "before", "after")
        for label, key in [
            ("BA", "ba"),
            ("ASR", "asr"),
            ("reversed-trigger ASR", "reversed_asr"),
            ("defender clean accuracy", "val_accuracy"),
        ]:
            table.add_row(
                label, _fraction(report.get(f"{key}_before")), _fraction(report.get(f"{key}_after"))
            )
        out.table(table)
        out.line(
            f"{report['defense']}: pruned {report['neurons_pruned']} of {report['neurons_total']} neurons; wrote {result.out}"
        )
    if result.pushed:
        pushed = result.pushed
        out.line(
            f"pushed to {pushed['repo_id']} (commit {pushed['commit_sha'][:12]}){' ' + pushed['pr_url'] if pushed.get('pr_url') else ''}"
        )


@app.command("list-defenses")
def list_defenses_command() -> None:
    """List the registered defenses."""
    from hubdefend.defenses import get_defense, list_defenses

    table = Table("name", "needs data", "needs labels")
    for name in list_defenses():
        cls = get_defense(name)
        table.add_row(name, "yes" if cls.needs_data else "no", "yes" if cls.needs_labels else "no")
    Output().table(table)


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs into typed options (JSON values where they parse: 500, 0.2, true)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise HubDefendError(f"--option {pair!r}: write KEY=VALUE, e.g. -o iterations=500.")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def main() -> None:
    """Console entry point: run the app, turning hubdefend errors into one line and an exit code."""
    try:
        # Without standalone mode click returns the code of a typer.Exit instead of raising it.
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else EXIT_OK)
    except HubDefendError as exc:
        if os.environ.get("HUBDEFEND_DEBUG") == "1":
            raise
        Output().error(str(exc))
        sys.exit(EXIT_ERROR)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        Output().error("Interrupted.")
        sys.exit(130)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
