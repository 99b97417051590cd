"""The ``hubdefend`` command. Commands parse options and call the library; `Output` prints.

Errors that hubdefend raises on purpose print one line and exit with `EXIT_ERROR`; a traceback
is shown only with ``HUBDEFEND_DEBUG=1``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

import hubdefend
from hubdefend.errors import HubDefendError
from hubdefend.sources import resolve_model

EXIT_OK = 0
EXIT_ERROR = 1

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
        str, typer.Argument(help="A saved model folder, or timm:NAME to build a timm architecture.")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
) -> None:
    """Show a model's family, architecture, size and normalization layers (its neurons)."""
    out = Output(as_json=as_json)
    loaded = resolve_model(source)
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


def main() -> None:
    """Console entry point: run the app, turning hubdefend errors into one line and an exit code."""
    try:
        app(standalone_mode=False)
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
