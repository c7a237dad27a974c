"""What every command shares: the consoles, the settings factory, option types, errors, the
progress bar and table/CSV/JSON rendering."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
import threading
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter off

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from bonewatch.worker.settings import Settings, unknown_variables

# Piped or captured output has no terminal width; rich would squeeze tables into 80 columns.
_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200
out = Console(width=_WIDTH)
err = Console(stderr=True)


class OutputFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


class TableOrJson(StrEnum):
    """For commands whose output has no rows to put in a CSV."""

    table = "table"
    json = "json"


class Level(StrEnum):
    image = "image"
    study = "study"


class SynthFormat(StrEnum):
    png = "png"
    dicom = "dicom"
    both = "both"


# Options whose name is not the setting's field name with dashes.
OPTION_NAMES = {
    "settle_seconds": "--settle",
    "dicom_host": "--host",
    "dicom_port": "--port",
    "dicom_ae_title": "--ae-title",
}


def settings_from(**options: Any) -> Settings:
    """The settings of this command: ``BONEWATCH_*`` variables with the given options on top,
    validated once, and the process's file-creation mask set from them. A value out of range is
    a usage error (exit 2) naming the option or the variable it came from."""
    try:
        settings = Settings.resolve(**options)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = str(error["loc"][0]) if error["loc"] else ""
            if options.get(name) is not None:
                source = f"{OPTION_NAMES.get(name, '--' + name.replace('_', '-'))} "
                source += str(options[name])
            else:
                source = f"BONEWATCH_{name.upper()}"
            problems.append(f"{source}: {error['msg']}")
        fail("; ".join(problems))
    for name, nearest in unknown_variables(os.environ):
        hint = f"; did you mean {nearest}?" if nearest else ""
        err.print(f"[bold yellow]warning:[/] {name} is not a bonewatch setting{hint}")
    # Everything this process writes (the ledger, heatmaps, received files) is private unless
    # BONEWATCH_UMASK says otherwise; the pool children of `worker` inherit the mask.
    os.umask(settings.umask_bits)
    return settings


def fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def progress_bar(*extra: ProgressColumn) -> Progress:
    """The CLI's progress bar on stderr: description, bar, done of all, elapsed, then ``extra``."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        *extra,
        console=err,
        transient=False,
    )


BundleOpt = Annotated[
    Path | None, typer.Option("--bundle", "-b", help="Model bundle folder (BONEWATCH_BUNDLE).")
]

LayoutOpt = Annotated[str, typer.Option(help="Dataset layout: auto, mura, folders or labels.")]
LabelsOpt = Annotated[
    Path | None, typer.Option(help="Labels CSV (labels layout); DATASET/labels.csv if unset.")
]
PartOpt = Annotated[str | None, typer.Option(help="Body part of images whose layout names none.")]


def render(rows: list[dict[str, Any]], columns: list[str], fmt: OutputFormat) -> None:
    if fmt is OutputFormat.json:
        sys.stdout.write(json.dumps(rows, indent=2, default=str) + "\n")
    elif fmt is OutputFormat.csv:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: _csv_safe(v) for k, v in row.items()} for row in rows)
        sys.stdout.write(buf.getvalue())
    else:
        table = Table(show_lines=False)
        for column in columns:
            table.add_column(column, no_wrap=column != "reason", overflow="fold")
        for row in rows:
            table.add_row(*(Text(cell(shown_path(c, row.get(c)))) for c in columns))
        out.print(table)


def shown_path(column: str, value: Any) -> Any:
    """Paths under the working directory are shown relative to it, to keep tables readable."""
    if column in ("path", "heatmap_path") and isinstance(value, str):
        try:
            return str(Path(value).relative_to(Path.cwd()))
        except ValueError:
            return value
    return value


def cell(value: Any) -> str:
    """A value as table text; control characters (terminal escapes, newlines that would forge
    rows) are shown as escapes, never sent to the terminal."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], str(value))


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# A spreadsheet runs a cell that starts with one of these as a formula.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_safe(value: Any) -> Any:
    """A CSV cell that no spreadsheet runs as a formula: text starting like one gets a ``'``."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def describe_fault(exc: BaseException) -> str:
    """One line naming what failed and where, for a fault of the system (not of an input)."""
    from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError

    if isinstance(exc, ArgumentError) and "URL" in str(exc):
        return f"BONEWATCH_DATABASE_URL is not a database URL ({exc})"
    if isinstance(exc, DBAPIError):
        detail = str(exc.orig).strip() if exc.orig is not None else str(exc)
        detail = " ".join(detail.split())
        verb = "cannot reach" if isinstance(exc, OperationalError) else "error in"
        return f"{verb} the ledger at {_ledger_url_for_message()}: {detail}"
    if isinstance(exc, OSError) and exc.filename is not None:
        where = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
        return f"{where}: {exc.strerror or type(exc).__name__}"
    text = " ".join(str(exc).split())
    if type(exc).__module__.startswith("bonewatch.") and text:
        return text  # our own errors say what failed already
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _ledger_url_for_message() -> str:
    """The configured ledger URL with any password hidden."""
    from sqlalchemy.engine import make_url

    try:
        url = Settings().resolved_database_url
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "the configured database"


def warn_if_not_clinical(settings: Settings) -> None:
    """At the start of a serving command: say so when the bundle is not for clinical use."""
    from bonewatch.worker.notices import start_warning

    warning = start_warning(settings)
    if warning:
        err.print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False)


def start_live_service(
    settings: Settings, *, serve_here: bool = True
) -> tuple[threading.Event, Callable[[list[int]], None] | None]:
    """What ``watch`` and ``listen`` do first: a stop event that SIGTERM sets, and either a
    publisher on ``live`` (distributed mode) or, when they process here, the checks and the
    clinical-use warning of a serving command."""
    import signal

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if settings.distributed:
        from bonewatch.worker.distributed import Publisher

        return stop, Publisher(settings, "live")
    if serve_here:
        from bonewatch.worker.runner import preflight

        preflight(settings)
        warn_if_not_clinical(settings)
    return stop, None
