"""What the ledger holds: ``results`` and ``status``."""

from __future__ import annotations

import datetime as dt
import json
import sys
from typing import Annotated

import typer
from rich.table import Table

from bonewatch.worker.cli._common import Level, OutputFormat, fail, out, render, settings_from

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


def results(
    study: Annotated[str | None, typer.Option(help="Study UID (or MURA study folder).")] = None,
    part: Annotated[str | None, typer.Option(help="Body part, e.g. WRIST.")] = None,
    label: Annotated[str | None, typer.Option(help="positive or negative.")] = None,
    status: Annotated[str | None, typer.Option(help="queued, done, failed, ...")] = None,
    since: Annotated[
        dt.datetime | None, typer.Option(help="Only images registered at or after this time.")
    ] = None,
    min_p: Annotated[float | None, typer.Option(help="Lowest p(fracture).")] = None,
    max_p: Annotated[float | None, typer.Option(help="Highest p(fracture).")] = None,
    level: Annotated[Level, typer.Option(help="One row per image or per study.")] = Level.image,
    fmt: Annotated[OutputFormat, typer.Option("--format", help="Output format.")] = (
        OutputFormat.table
    ),
) -> None:
    """Query stored results."""
    from bonewatch.db import query_results, query_studies
    from bonewatch.worker.runner import open_ledger

    engine = open_ledger(settings_from())
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=dt.UTC)
    if level is Level.study:
        image_only = {"--status": status, "--since": since, "--min-p": min_p, "--max-p": max_p}
        given = [name for name, value in image_only.items() if value is not None]
        if given:
            fail(f"{', '.join(given)} filter(s) images; use them without --level study")
        rows = query_studies(engine, study=study, part=part, label=label)
        render(rows, STUDY_COLUMNS, fmt)
        return
    rows = query_results(
        engine,
        study=study,
        part=part.upper() if part else None,
        label=label,
        status=status,
        since=since,
        min_p=min_p,
        max_p=max_p,
    )
    columns = list(rows[0]) if rows and fmt is not OutputFormat.table else IMAGE_COLUMNS
    if fmt is OutputFormat.table and any(row.get("heatmap_path") for row in rows):
        columns = [*columns, "heatmap_path"]
    render(rows, columns, fmt)


def status(
    fmt: Annotated[OutputFormat, typer.Option("--format", help="table or json.")] = (
        OutputFormat.table
    ),
) -> None:
    """Count images by status, check nothing is lost or counted twice, show queue depths."""
    from bonewatch.worker.runner import ledger_status

    try:
        report = ledger_status(settings_from())
    except Exception as exc:
        from bonewatch.worker.distributed import DistributedError

        if isinstance(exc, DistributedError):
            fail(str(exc))
        raise
    if fmt is OutputFormat.json:
        sys.stdout.write(json.dumps(report) + "\n")
        return
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
