"""What every command shares: the consoles, the settings factory, option types, errors, the
progress bar and table/CSV/JSON rendering."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter off

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from bonewatch.worker.settings import Settings

# Piped or captured output has no terminal width; rich would squeeze tables into 80 columns.
_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200
out = Console(width=_WIDTH)
err = Console(stderr=True)


class OutputFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


class Level(StrEnum):
    image = "image"
    study = "study"


class SynthFormat(StrEnum):
    png = "png"
    dicom = "dicom"
    both = "both"


# Options whose name is not the setting's field name with dashes.
OPTION_NAMES = {"settle_seconds": "--settle"}


def settings_from(**options: Any) -> Settings:
    """The settings of this command: ``BONEWATCH_*`` variables with the given options on top,
    validated once. A value out of range is a usage error (exit 2) naming the option or the
    variable it came from."""
    try:
        return Settings.resolve(**options)
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
        raise AssertionError("unreachable") from exc


def fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def progress_bar() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
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
            table.add_row(*(Text(cell(_shown(c, row.get(c)))) for c in columns))
        out.print(table)


def _shown(column: str, value: Any) -> Any:
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
