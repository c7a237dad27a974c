"""The ``bonewatch`` command line: one module per command group, each command a thin shell over a
library function. This module assembles them into one typer app."""

from __future__ import annotations

import logging
from typing import Annotated

import typer
from rich.logging import RichHandler

from bonewatch.worker.cli import (
    bench,
    bundle,
    db,
    evaluate,
    explain,
    process,
    results,
    synth,
    train,
    workers,
)
from bonewatch.worker.cli._common import err

app = typer.Typer(
    help="bonewatch: find bone fractures on upper-limb radiographs (DICOM and PNG).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Ledger database maintenance.", no_args_is_help=True)
bundle_app = typer.Typer(help="Model bundles.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(bundle_app, name="bundle")


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False)],
    )


# Every command, in the order --help lists them: (group, name or None for the function's).
COMMANDS = [
    (app, None, process.process),
    (app, None, process.watch),
    (app, None, workers.worker),
    (app, None, workers.reconcile),
    (app, None, results.results),
    (app, "status", results.status),
    (db_app, "upgrade", db.upgrade),
    (app, None, synth.synth),
    (app, None, train.train),
    (app, None, evaluate.evaluate),
    (app, None, explain.explain),
    (bundle_app, "show", bundle.show),
    (bundle_app, "export-onnx", bundle.export_onnx),
    (app, None, bench.bench),
]
for group, name, command in COMMANDS:
    group.command(name)(command)

__all__ = ["app"]
