"""Runs: ``runs`` (the list), ``runs show``, ``runs pause``, ``runs resume``, ``runs cancel``."""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich import box
from rich.progress import (
    Progress,
    TextColumn,
)
from rich.table import Table
from rich.text import Text

from bonewatch.worker.cli._common import (
    TableOrJson,
    cell,
    fail,
    out,
    progress_bar,
    settings_from,
)
from bonewatch.worker.settings import Settings

FormatOpt = Annotated[TableOrJson, typer.Option("--format", help="table or json.")]
RunId = Annotated[int, typer.Argument(min=1, help="The run's id (`bonewatch runs` lists them).")]


# --------------------------------------------------------------------------- rendering


def eta_text(report: dict[str, Any], now: datetime | None = None) -> str:
    """The ETA as a table shows it: local time (with the date when not today), why there is
    none, or that the run waits for the bulk window."""
    now = now or datetime.now(UTC)
    if report["state"] == "done":
        return "done"
    if report["state"] in ("paused", "cancelled"):
        return "-"
    if report["eta"] is None:
        if report["waits_for_window"] and report["window_opens_at"]:
            opens = datetime.fromisoformat(report["window_opens_at"]).astimezone()
            return f"opens {opens:%H:%M}"
        return "-"
    at = datetime.fromisoformat(report["eta"]).astimezone()
    if at.date() == now.astimezone().date():
        return f"{at:%H:%M}"
    return f"{at:%m-%d %H:%M}"


def short_paths(paths: list[str], width: int) -> str:
    """The run's paths in ``width`` characters: the first one, cut from the left (its end
    names the folder), and how many more."""
    if not paths:
        return ""
    more = f" +{len(paths) - 1}" if len(paths) > 1 else ""
    room = max(width - len(more), 4)
    first = cell(paths[0])
    if len(first) > room:
        first = "…" + first[-(room - 1) :]
    return first + more


def _rate(report: dict[str, Any]) -> str:
    rate = report["images_per_second"]
    if rate is None:
        return "-"
    return f"{rate:.1f}" if rate >= 1 else f"{rate:.2f}"


# id, state, done, fail, unsup, left, img/s, ETA: the widest values each column shows.
_FIXED = {
    "id": 4, "state": 9, "done": 6, "fail": 4, "unsup": 5, "left": 6, "img/s": 5, "ETA": 11,
}  # fmt: skip


def runs_table(reports: list[dict[str, Any]], width: int) -> Table:
    """The runs as one table no wider than ``width`` (80 at least): the short columns whole,
    the paths in what is left."""
    width = max(width, 80)
    gaps = len(_FIXED)  # the one-space rule between columns
    paths_width = max(width - sum(_FIXED.values()) - gaps, 10)
    table = Table(box=box.SIMPLE_HEAD, padding=0, pad_edge=False, show_edge=False)
    table.add_column("id", justify="right", no_wrap=True, min_width=_FIXED["id"])
    table.add_column("state", no_wrap=True, min_width=_FIXED["state"])
    table.add_column("paths", no_wrap=True, max_width=paths_width)
    for name in ("done", "fail", "unsup", "left", "img/s"):
        table.add_column(name, justify="right", no_wrap=True, min_width=_FIXED[name])
    table.add_column("ETA", no_wrap=True, min_width=_FIXED["ETA"])
    for r in reports:
        table.add_row(
            str(r["id"]),
            r["state"],
            Text(short_paths(r["paths"], paths_width)),
            str(r["done"]),
            str(r["failed"]),
            str(r["unsupported"]),
            str(r["left"]),
            _rate(r),
            eta_text(r),
        )
    return table


def _local(value: str | None) -> str:
    if value is None:
        return "-"
    return f"{datetime.fromisoformat(value).astimezone():%Y-%m-%d %H:%M:%S}"


def show_lines(r: dict[str, Any]) -> list[tuple[str, str]]:
    """One run as (label, value) lines for ``runs show``."""
    counts = ", ".join(f"{k} {v}" for k, v in r["counts"].items() if v) or "no images yet"
    bundle = f"{r['bundle']} {r['bundle_version'] or ''}".strip() if r["bundle"] else "-"
    lines = [
        ("run", f"{r['id']} ({r['kind']}, queue {r['queue']})"),
        ("state", r["state"] + (f": {r['reason']}" if r["reason"] else "")),
        ("started", f"{_local(r['created_at'])} by {r['started_by']}"),
        ("bundle", bundle),
        ("window", f"{r['bulk_window']} local time" if r["bulk_window"] else "any hour"),
        ("images", f"{r['total']}: {counts}"),
        ("left", str(r["left"])),
        ("rate", f"{_rate(r)} images/s over the last 5 minutes"),
        ("ETA", eta_text(r) if r["eta"] is None else _local(r["eta"])),
    ]
    lines += [("path", cell(p)) for p in r["paths"]]
    return lines


# --------------------------------------------------------------------------- following


def run_progress() -> Progress:
    """The progress bar of a run: images finished of all, elapsed time and the run's ETA."""
    return progress_bar(TextColumn("{task.fields[eta]}"))


def progress_eta(report: dict[str, Any]) -> str:
    """The ETA field of the progress bar."""
    if report["state"] in ("paused", "cancelled"):
        return report["state"]
    text = eta_text(report)
    return "" if text in ("-", "done") else f"ETA {text}"


class RunEta:
    """The progress bar's ETA field for a run, looked up again at most every ``every``
    seconds (the bar advances on every batch)."""

    def __init__(self, settings: Settings, run_id: int, every: float = 2.0) -> None:
        self.settings, self.run_id, self.every = settings, run_id, every
        self._at = 0.0
        self._text = ""

    def text(self) -> str:
        if time.monotonic() - self._at >= self.every:
            from bonewatch.db import make_engine
            from bonewatch.db.runs import get_run
            from bonewatch.worker.runs import run_report

            engine = make_engine(self.settings.resolved_database_url)
            try:
                self._text = progress_eta(run_report(get_run(engine, self.run_id), self.settings))
            finally:
                engine.dispose()
            self._at = time.monotonic()
        return self._text


def follow_run(settings: Settings, run_id: int, *, poll_seconds: float = 1.0) -> dict[str, Any]:
    """Show a run's progress bar until it is done or cancelled; returns its last report."""
    from bonewatch.db.runs import get_run
    from bonewatch.worker.runs import run_report

    engine = _reading_engine(settings)
    try:
        with run_progress() as progress:
            task = progress.add_task(f"run {run_id}", total=None, eta="")
            while True:
                report = run_report(get_run(engine, run_id), settings)
                finished = report["total"] - report["left"]
                progress.update(
                    task, total=report["total"], completed=finished, eta=progress_eta(report)
                )
                if report["state"] in ("done", "cancelled"):
                    return report
                time.sleep(poll_seconds)
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- commands


def _reading_engine(settings: Settings) -> Any:
    from bonewatch.worker.runner import enqueue_ledger, read_ledger

    return enqueue_ledger(settings) if settings.distributed else read_ledger(settings)


def _writing_engine(settings: Settings) -> Any:
    from bonewatch.worker.runner import enqueue_ledger, open_ledger, read_ledger

    if settings.distributed:
        return enqueue_ledger(settings)
    read_ledger(settings).dispose()  # no ledger yet: say so, rather than create one
    return open_ledger(settings)


def _one(engine: Any, run_id: int) -> Any:
    from bonewatch.db.runs import RunNotFoundError, get_run

    try:
        return get_run(engine, run_id)
    except RunNotFoundError as exc:
        fail(f"{exc} (`bonewatch runs` lists them)")


def list_runs(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, newest first.")] = 20,
    fmt: FormatOpt = TableOrJson.table,
) -> None:
    """Archive runs and their progress; pause, resume or cancel one.

    Each run's state, paths, done/failed/unsupported/left, rate and ETA. The ETA counts
    only the hours the bulk window is open (BONEWATCH_BULK_WINDOW, or the one a run was
    started with).
    """
    if ctx.invoked_subcommand is not None:
        return
    from bonewatch.db.runs import list_runs as query_runs
    from bonewatch.worker.runs import run_report

    settings = settings_from()
    engine = _reading_engine(settings)
    try:
        reports = [run_report(r, settings) for r in query_runs(engine, limit=limit)]
    finally:
        engine.dispose()
    if fmt is TableOrJson.json:
        sys.stdout.write(json.dumps(reports) + "\n")
        return
    if not reports:
        out.print("no runs yet: `bonewatch process`, `watch` and `listen` start them")
        return
    out.print(runs_table(reports, out.width))


def show(
    run_id: RunId,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Progress bar until done or cancelled.")
    ] = False,
    fmt: FormatOpt = TableOrJson.table,
) -> None:
    """Show one run; --follow draws its progress bar with the ETA."""
    from bonewatch.worker.runs import run_report

    settings = settings_from()
    engine = _reading_engine(settings)
    try:
        report = run_report(_one(engine, run_id), settings)
    finally:
        engine.dispose()
    if follow and report["state"] not in ("done", "cancelled"):
        report = follow_run(settings, run_id)
    if fmt is TableOrJson.json:
        sys.stdout.write(json.dumps(report) + "\n")
        return
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for label, value in show_lines(report):
        grid.add_row(label, Text(value))
    out.print(grid)


def pause(
    run_id: RunId,
    reason: Annotated[str | None, typer.Option(help="Why (shown with the state).")] = None,
) -> None:
    """Pause a run; a batch already claimed finishes.

    Its waiting images are not taken until `bonewatch runs resume ID`."""
    from bonewatch.db.runs import RunNotFoundError, RunStateError, pause_run

    settings = settings_from()
    engine = _writing_engine(settings)
    try:
        run = pause_run(engine, run_id, reason=reason)
    except (RunNotFoundError, RunStateError) as exc:
        fail(str(exc))
    finally:
        engine.dispose()
    out.print(
        f"run {run_id} paused: {run.counts['done']} done, {run.left} left "
        f"({run.counts['processing']} in a claimed batch still finish)",
        highlight=False,
    )


def resume(run_id: RunId) -> None:
    """Resume a paused or cancelled run.

    Its cancelled images are queued again; in distributed mode its waiting images are published
    again at once."""
    from bonewatch.db.runs import RunNotFoundError, resume_run

    settings = settings_from()
    engine = _writing_engine(settings)
    published = None
    try:
        run, requeued = resume_run(engine, run_id)
        if settings.distributed:
            from bonewatch.worker.distributed import DistributedError
            from bonewatch.worker.runs import republish_run

            try:
                published = republish_run(engine, settings, run_id)
            except DistributedError as exc:
                fail(str(exc))
    except RunNotFoundError as exc:
        fail(str(exc))
    finally:
        engine.dispose()
    text = f"run {run_id} resumed: {requeued} image(s) queued again, {run.left} left"
    if published is not None:
        text += f"; {published} published on {run.queue}"
    out.print(text, highlight=False)


def cancel(
    run_id: RunId,
    reason: Annotated[str | None, typer.Option(help="Why; kept on each image cancelled.")] = None,
) -> None:
    """Cancel a run: results stay; what is left becomes `cancelled`.

    A batch already claimed finishes. `bonewatch runs resume ID` starts it again."""
    from bonewatch.db.runs import RunNotFoundError, cancel_run
    from bonewatch.worker.runs import started_by

    settings = settings_from()
    engine = _writing_engine(settings)
    try:
        outcome = cancel_run(
            engine, run_id, reason=reason or f"run {run_id} cancelled by {started_by()}"
        )
    except RunNotFoundError as exc:
        fail(str(exc))
    finally:
        engine.dispose()
    out.print(
        f"run {run_id} cancelled: {outcome.cancelled} image(s) cancelled, "
        f"{outcome.run.counts['done']} done stay; {outcome.still_processing} in a claimed "
        "batch still finish",
        highlight=False,
    )


def window(
    run_id: RunId,
    spec: Annotated[
        str, typer.Argument(metavar="HH:MM-HH:MM|any", help="Local-time window, or any hour.")
    ],
) -> None:
    """Move an embedded run's bulk window.

    Its waiting `bonewatch process` follows it within a second. Distributed
    workers take bulk work in their own window (`worker --bulk-window`)."""
    from bonewatch.db.runs import RunNotFoundError, set_run_window
    from bonewatch.worker.window import WindowError, parse_window

    try:
        chosen = None if spec.strip().lower() == "any" else parse_window(spec)
    except WindowError as exc:
        fail(str(exc))
    settings = settings_from()
    if settings.distributed:
        fail(
            "distributed workers take bulk work in their own window: set "
            "BONEWATCH_BULK_WINDOW or `bonewatch worker --bulk-window` and restart them"
        )
    engine = _writing_engine(settings)
    try:
        run = set_run_window(engine, run_id, str(chosen) if chosen else None)
    except RunNotFoundError as exc:
        fail(str(exc))
    finally:
        engine.dispose()
    where = f"{run.bulk_window} local time" if run.bulk_window else "any hour"
    out.print(f"run {run_id} takes bulk work {where}", highlight=False)
