"""What the ledger holds: ``results`` and ``status``."""

from __future__ import annotations

import datetime as dt
import json
import sys
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from bonewatch.worker.cli._common import (
    Level,
    OutputFormat,
    TableOrJson,
    cell,
    err,
    fail,
    out,
    render,
    settings_from,
    shown_path,
)

IMAGE_COLUMNS = [
    "path",
    "status",
    "body_part",
    "body_part_confidence",
    "p_fracture",
    "label",
    "reason",
]
STUDY_COLUMNS = ["study_uid", "body_part", "n_images", "mean_p_fracture", "threshold", "label"]
# The study level's CSV carries what its JSON carries.
STUDY_CSV_COLUMNS = [
    "study_uid",
    "bundle",
    "bundle_version",
    "body_part",
    "n_images",
    "mean_p_fracture",
    "threshold",
    "label",
    "updated_at",
]
# Table columns that always show whole, with their widest value; the rest share what is left.
FIXED_WIDTH = {
    "status": 11,
    "body_part": 8,
    "body_part_confidence": 5,
    "p_fracture": 5,
    "label": 8,
    "n_images": 6,
    "mean_p_fracture": 6,
    "threshold": 5,
    "bundle_version": 7,
    "attempts": 3,
    "id": 6,
}
HEADERS = {
    "body_part": "part",
    "body_part_confidence": "conf",
    "p_fracture": "p(fx)",
    "mean_p_fracture": "mean p",
    "n_images": "images",
    "threshold": "thr",
}
SINCE_FORMATS = ["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M"]


class Status(StrEnum):
    queued = "queued"
    processing = "processing"
    done = "done"
    failed = "failed"
    unsupported = "unsupported"
    duplicate = "duplicate"
    cancelled = "cancelled"


class Label(StrEnum):
    positive = "positive"
    negative = "negative"


def results(
    study: Annotated[str | None, typer.Option(help="Study UID (or MURA study folder).")] = None,
    part: Annotated[str | None, typer.Option(help="Body part, e.g. WRIST.")] = None,
    label: Annotated[Label | None, typer.Option(help="positive or negative.")] = None,
    status: Annotated[Status | None, typer.Option(help="An image status.")] = None,
    since: Annotated[
        dt.datetime | None,
        typer.Option(
            formats=SINCE_FORMATS,
            help="Only images registered at or after this time: 2026-12-03 or "
            "2026-12-03T14:30:00, in UTC unless it ends with an offset.",
        ),
    ] = None,
    min_p: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="Lowest p(fracture).")
    ] = None,
    max_p: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="Highest p(fracture).")
    ] = None,
    image_id: Annotated[int | None, typer.Option("--id", min=1, help="One image, by id.")] = None,
    path: Annotated[
        str | None, typer.Option(help="Paths matching a glob, e.g. '*/XR_WRIST/*'.")
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many rows.")] = None,
    run: Annotated[
        int | None, typer.Option("--run", min=1, help="Images of one run (`bonewatch runs`).")
    ] = None,
    bundle: Annotated[
        str | None, typer.Option("--bundle", help="Results of this bundle (by name).")
    ] = None,
    level: Annotated[Level, typer.Option(help="One row per image or per study.")] = Level.image,
    columns: Annotated[
        str | None, typer.Option(help="Table columns, comma-separated (JSON keys).")
    ] = None,
    wide: Annotated[
        bool, typer.Option("--wide", help="Table: every column, paths in full.")
    ] = False,
    fmt: Annotated[OutputFormat, typer.Option("--format", help="Output format.")] = (
        OutputFormat.table
    ),
) -> None:
    """Query stored results."""
    from bonewatch.db import query_results, query_studies
    from bonewatch.worker.runner import read_ledger

    settings = settings_from()
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=dt.UTC)
    chosen = _columns(columns)
    if level is Level.study:
        image_only = {
            "--status": status, "--since": since, "--min-p": min_p, "--max-p": max_p,
            "--id": image_id, "--path": path, "--run": run,
        }  # fmt: skip
        given = [name for name, value in image_only.items() if value is not None]
        if given:
            fail(f"{', '.join(given)} filter(s) images; use them without --level study")
    engine = read_ledger(settings)
    if level is Level.study:
        rows = query_studies(engine, study=study, part=part, label=label)
        rows = [r for r in rows if bundle is None or r["bundle"] == bundle][:limit]
        if fmt is OutputFormat.table:
            _demo_notice(rows, settings)
            columns_shown = chosen or (STUDY_CSV_COLUMNS if wide else STUDY_COLUMNS)
            _table(rows, columns_shown, wide, chosen=bool(chosen))
        else:
            render(rows, chosen or STUDY_CSV_COLUMNS, fmt)
        return
    if run is not None:
        from bonewatch.db.runs import RunNotFoundError, get_run

        try:
            get_run(engine, run)
        except RunNotFoundError as exc:
            fail(f"{exc} (`bonewatch runs` lists them)")
    rows = query_results(
        engine,
        study=study,
        part=part.upper() if part else None,
        label=label.value if label else None,
        status=status.value if status else None,
        since=since,
        min_p=min_p,
        max_p=max_p,
        image_id=image_id,
        path_glob=path,
        limit=limit,
        bundle=bundle,
        run_id=run,
    )
    if fmt is not OutputFormat.table:
        render(rows, chosen or (list(rows[0]) if rows else IMAGE_COLUMNS), fmt)
        return
    _demo_notice(rows, settings)
    shown = chosen or IMAGE_COLUMNS
    if not chosen and any(row.get("heatmap_path") for row in rows):
        shown = [*shown, "heatmap_path"]
    if wide and not chosen and rows:
        shown = list(rows[0])
    _table(rows, shown, wide, chosen=bool(chosen))


def _columns(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:
        raise typer.BadParameter("name at least one column", param_hint="--columns")
    return names


# Default columns that give way on a narrow terminal, and the width below which they do.
DROPPED_BELOW = {"heatmap_path": 140, "body_part_confidence": 100}


def _table(
    rows: list[dict[str, Any]], columns: list[str], wide: bool, *, chosen: bool = False
) -> None:
    """A table that fits the terminal: the short columns whole, paths shortened from the left
    (their end names the file), reasons wrapped. ``wide`` keeps everything whole; columns the
    user chose (``chosen``) are never dropped."""
    width = out.width
    if not wide and not chosen:
        columns = [c for c in columns if width >= DROPPED_BELOW.get(c, 0)]
    fixed = {c: FIXED_WIDTH[c] for c in columns if c in FIXED_WIDTH}
    flexible = [c for c in columns if c not in fixed]
    overhead = 3 * len(columns) + 1  # borders and padding
    room = max(width - overhead - sum(fixed.values()), 8 * max(len(flexible), 1))
    share = {c: room // max(len(flexible), 1) for c in flexible}
    if "reason" in share and len(flexible) > 1:  # reasons wrap; paths get the larger share
        share["reason"] = max(room * 2 // 5, 12)
        others = [c for c in flexible if c != "reason"]
        for c in others:
            share[c] = max((room - share["reason"]) // len(others), 8)
    table = Table(show_lines=False)
    for column in columns:
        if column in fixed:
            table.add_column(HEADERS.get(column, column), no_wrap=True, min_width=fixed[column])
        elif column == "reason" or wide:
            table.add_column(column, overflow="fold")
        else:
            table.add_column(column, no_wrap=True, max_width=share[column])
    for row in rows:
        values = []
        for column in columns:
            text = cell(shown_path(column, row.get(column)))
            if column in share and column != "reason" and not wide:
                text = _left_shortened(text, share[column])
            values.append(Text(text))
        table.add_row(*values)
    # --wide: the table's own width, however wide the terminal (a pager or a file takes it)
    (Console(width=100_000, highlight=False) if wide else out).print(table, crop=not wide)


def _left_shortened(text: str, limit: int) -> str:
    """``text`` cut from the left to ``limit`` characters, with ``…`` where it was cut."""
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]


def _demo_notice(rows: list[dict[str, Any]], settings: Any) -> None:
    """Say so above the table when results come from a bundle not meant for clinical use."""
    from bonewatch.worker.notices import not_for_clinical_use

    names = sorted({str(r["bundle"]) for r in rows if r.get("bundle")})
    flagged = [name for name in names if not_for_clinical_use(name, settings)]
    if flagged:
        err.print(
            f"[bold yellow]note:[/] results of {', '.join(flagged)}, a bundle not for clinical "
            "use (its model card says so)",
            highlight=False,
        )


def status(
    fmt: Annotated[TableOrJson, typer.Option("--format", help="table or json.")] = (
        TableOrJson.table
    ),
    run: Annotated[
        int | None, typer.Option("--run", min=1, help="Count the images of one run only.")
    ] = None,
) -> None:
    """Count images by status and check nothing is lost.

    Also checks that no image is counted twice, and shows queue depths."""
    from bonewatch.worker.runner import ledger_status

    try:
        report = ledger_status(settings_from(), run_id=run)
    except Exception as exc:
        from bonewatch.db.runs import RunNotFoundError
        from bonewatch.worker.distributed import DistributedError

        if isinstance(exc, DistributedError | RunNotFoundError):
            fail(str(exc))
        raise
    if fmt is TableOrJson.json:
        sys.stdout.write(json.dumps(report) + "\n")
        return
    out.print(f"ledger: {report['ledger']}", highlight=False)
    if run is not None:
        out.print(f"run {run}", highlight=False)
    table = Table("status", "images")
    for key, value in report["counts"].items():
        table.add_row(key, str(value))
    table.add_row("[bold]total", str(report["total"]))
    out.print(table)
    health = report["health"]
    out.print(
        f"lost: {report['lost']} ({health['expired_leases']} expired lease(s)"
        + (
            f", {health['unpublished']} queued without a message"
            if health.get("unpublished") is not None
            else ""
        )
        + f"); images predicted twice by one bundle version: {health['double_predictions']}"
    )
    if report["queues"] is not None:
        out.print("queue depths: " + ", ".join(f"{q} {n}" for q, n in report["queues"].items()))
