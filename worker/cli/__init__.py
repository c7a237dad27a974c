"""The ``bonewatch`` command line: one module per command group, each command a thin shell over a
library function. This module assembles them into one typer app."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.logging import RichHandler
from rich.markup import escape

from bonewatch.worker.cli import (
    bench,
    bundle,
    db,
    evaluate,
    explain,
    listen,
    process,
    rescore,
    results,
    reviews,
    runs,
    send,
    serve,
    synth,
    train,
    user,
    workers,
)
from bonewatch.worker.cli._common import describe_fault, err

app = typer.Typer(
    help="bonewatch: find bone fractures on upper-limb radiographs (DICOM and PNG).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain help: wraps to the terminal, names each flag once, and shows no value for flags.
    rich_markup_mode=None,
)
db_app = typer.Typer(
    help="Ledger database maintenance.", no_args_is_help=True, rich_markup_mode=None
)
bundle_app = typer.Typer(help="Model bundles.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(db_app, name="db")
app.add_typer(bundle_app, name="bundle")
user_app = typer.Typer(
    help="Accounts of the review web app.", no_args_is_help=True, rich_markup_mode=None
)
reviews_app = typer.Typer(
    help="Reviewers' verdicts, as training labels and as a measure.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(user_app, name="user")
app.add_typer(reviews_app, name="reviews")
# `bonewatch runs` lists the runs (the group's callback); its subcommands act on one.
runs_app = typer.Typer(rich_markup_mode=None)
runs_app.callback(invoke_without_command=True)(runs.list_runs)
app.add_typer(runs_app, name="runs")


@app.callback()
def global_options(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False)],
    )
    # Library warnings (pydicom's about odd headers, ...) become log lines, each shown once.
    logging.captureWarnings(True)
    # Alembic's start-up lines ("Context impl", "Will assume") are detail, for -v only.
    logging.getLogger("alembic").setLevel(logging.INFO if verbose else logging.WARNING)


# Every command, in the order --help lists them: (group, name or None for the function's).
COMMANDS: list[tuple[typer.Typer, str | None, Callable[..., Any]]] = [
    (app, None, process.process),
    (app, None, process.watch),
    (app, None, rescore.rescore),
    (app, None, listen.listen),
    (app, None, listen.echo),
    (app, None, workers.worker),
    (app, None, workers.reconcile),
    (app, None, results.results),
    (app, "status", results.status),
    (runs_app, "show", runs.show),
    (runs_app, "pause", runs.pause),
    (runs_app, "resume", runs.resume),
    (runs_app, "cancel", runs.cancel),
    (runs_app, "window", runs.window),
    (app, None, send.send),
    (app, None, serve.serve),
    (user_app, "add", user.add),
    (user_app, "passwd", user.passwd),
    (user_app, "remove", user.remove),
    (user_app, "list", user.list_users),
    (reviews_app, "export", reviews.export),
    (reviews_app, "stats", reviews.stats),
    (db_app, "upgrade", db.upgrade),
    (app, None, synth.synth),
    (app, None, train.train),
    (app, None, evaluate.evaluate),
    (app, None, explain.explain),
    (bundle_app, "show", bundle.show),
    (bundle_app, "export-onnx", bundle.export_onnx),
    (bundle_app, "quantize", bundle.quantize),
    (app, None, bench.bench),
]
for group, name, command in COMMANDS:
    group.command(name)(command)

VERBOSE_FLAGS = ("-v", "--verbose")


def main(argv: list[str] | None = None) -> None:
    """The ``bonewatch`` entry point: the typer app, with ``-v`` accepted anywhere and a fault of
    the system (an unreachable database, an unwritable folder, a bad bundle) shown as one line
    with exit status 1; ``-v`` adds the traceback."""
    args = list(sys.argv[1:] if argv is None else argv)
    # `bonewatch results -v` means the same as `bonewatch -v results`; after `--` it is data.
    end = args.index("--") if "--" in args else len(args)
    verbose = any(a in VERBOSE_FLAGS for a in args[:end])
    if verbose:
        args = ["-v", *[a for a in args[:end] if a not in VERBOSE_FLAGS], *args[end:]]
    try:
        app(args=args, prog_name="bonewatch")
    except SystemExit:
        raise
    except KeyboardInterrupt:
        err.print("interrupted")
        raise SystemExit(130) from None
    except Exception as exc:
        if verbose:
            err.print_exception(show_locals=False)
        # soft_wrap: one line however narrow the terminal, so it can be grepped from a log
        err.print(
            f"[bold red]error:[/] {escape(describe_fault(exc))}", highlight=False, soft_wrap=True
        )
        if not verbose and not type(exc).__module__.startswith("bonewatch."):
            err.print("(run with -v for the traceback)", style="dim")
        raise SystemExit(1) from None


__all__ = ["app", "main"]
