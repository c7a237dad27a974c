"""Runs, wired: starting one for ``process``, ``watch`` and ``listen``, the rate and the ETA
(which counts only the hours the bulk window is open), the JSON report of ``bonewatch runs``,
and publishing a resumed run's images again in distributed mode.
"""

from __future__ import annotations

import getpass
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from bonewatch.db.records import NewRun, RunInfo
from bonewatch.db.runs import create_run, get_run, open_long_lived_run, run_waiting_ids
from bonewatch.worker.settings import Settings
from bonewatch.worker.window import BulkWindow, parse_window

log = logging.getLogger(__name__)


def started_by() -> str:
    """Who starts a run: the account and the host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container's)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _bundle_identity(settings: Settings) -> tuple[str | None, str | None]:
    from bonewatch.models.bundle import read_manifest

    try:
        manifest = read_manifest(settings.bundle)
    except Exception as exc:  # the run is recorded anyway; serving reports the bundle's fault
        log.warning("the run records no bundle version: %s", exc)
        return str(settings.bundle), None
    return manifest.name, manifest.version


def _new_run(
    settings: Settings, kind: str, queue: str, paths: Sequence[str], key: str | None = None
) -> NewRun:
    name, version = _bundle_identity(settings)
    # An embedded run keeps its window: every claimer on the ledger holds it back outside it.
    # Distributed workers apply their own (BONEWATCH_BULK_WINDOW of each worker host).
    embedded = queue == "bulk" and not settings.distributed
    window = parse_window(settings.bulk_window) if embedded else None
    return NewRun(
        kind=kind,
        queue=queue,
        paths=tuple(paths),
        started_by=started_by(),
        bundle_name=name,
        bundle_version=version,
        bulk_window=str(window) if window else None,
        key=key,
    )


def start_archive_run(engine: Engine, paths: Sequence[Path], settings: Settings) -> int:
    """A new run for the paths given to ``process`` (on ``bulk``); returns its id."""
    shown = [str(Path(p).absolute()) for p in paths]
    return create_run(engine, _new_run(settings, "archive", "bulk", shown))


def start_archive_run_on(ledger: Engine, paths: Sequence[Path], settings: Settings) -> int:
    """:func:`start_archive_run` on a ledger opened for it alone, disposed of afterwards."""
    try:
        return start_archive_run(ledger, paths, settings)
    finally:
        ledger.dispose()


def watch_run(engine: Engine, inbox: Path, settings: Settings) -> int:
    """The one long-lived run of a watched folder (the same one after a restart)."""
    folder = str(inbox.absolute())
    return open_long_lived_run(
        engine, _new_run(settings, "watch", "live", [folder], key=f"watch:{folder}")
    )


def listen_run(engine: Engine, settings: Settings, received: Path) -> int:
    """The one long-lived run of the DICOM listener of this AE title and port."""
    key = f"listen:{settings.dicom_ae_title}@{settings.dicom_host}:{settings.dicom_port}"
    return open_long_lived_run(
        engine, _new_run(settings, "listen", "live", [str(received)], key=key)
    )


def run_rate(run: RunInfo) -> float | None:
    """Images per second over the last minutes: between the first and last finish there (the
    images of the first finish started before the span). None with too few finishes."""
    if run.recent_span_seconds > 0 and run.recent > run.recent_first:
        return (run.recent - run.recent_first) / run.recent_span_seconds
    return None


def _lifetime_rate(run: RunInfo) -> float | None:
    if run.total_span_seconds > 0 and run.total_worked > run.total_first:
        return (run.total_worked - run.total_first) / run.total_span_seconds
    return None


def run_window(run: RunInfo, settings: Settings) -> BulkWindow | None:
    """The bulk window that governs a run: none for ``live`` runs; else the one it was started
    with (``process --window``), else the configured one (BONEWATCH_BULK_WINDOW)."""
    if run.queue != "bulk":
        return None
    return parse_window(run.bulk_window or settings.bulk_window)


@dataclass(frozen=True)
class Eta:
    """When a run should finish: ``at`` (None when it cannot be told: paused, cancelled, no
    rate yet), and whether it waits for the bulk window to open first."""

    at: datetime | None
    waits_for_window: bool = False


def run_eta(run: RunInfo, window: BulkWindow | None, now: datetime | None = None) -> Eta:
    """The finish time of what is left at the recent rate (the run's lifetime rate when
    nothing finished lately), counting only the hours the window is open."""
    now = now or datetime.now(UTC)
    waits = window is not None and not window.is_open(now)
    if run.state in ("paused", "cancelled", "done") or run.left == 0:
        return Eta(None, waits and run.left > 0 and run.state not in ("paused", "cancelled"))
    rate = run_rate(run) or _lifetime_rate(run)
    if not rate:
        return Eta(None, waits)
    work = run.left / rate
    if window is None:
        return Eta(now + timedelta(seconds=work), False)
    return Eta(window.finish_time(now, work), waits)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


# The keys of `bonewatch runs --format json`, in order (docs/output-contracts.md).
REPORT_KEYS = (
    "id", "kind", "state", "control", "reason", "queue", "paths", "started_by", "created_at",
    "sealed_at", "bundle", "bundle_version", "bulk_window", "counts", "done", "failed",
    "unsupported", "left", "total", "images_per_second", "eta", "eta_seconds",
    "waits_for_window", "window_opens_at",
)  # fmt: skip


def run_report(run: RunInfo, settings: Settings, now: datetime | None = None) -> dict[str, Any]:
    """One run as ``bonewatch runs --format json`` gives it (keys in :data:`REPORT_KEYS`)."""
    now = now or datetime.now(UTC)
    window = run_window(run, settings)
    eta = run_eta(run, window, now)
    rate = run_rate(run)
    report = {
        "id": run.id,
        "kind": run.kind,
        "state": run.state,
        "control": run.control,
        "reason": run.reason,
        "queue": run.queue,
        "paths": list(run.paths),
        "started_by": run.started_by,
        "created_at": _iso(run.created_at),
        "sealed_at": _iso(run.sealed_at),
        "bundle": run.bundle_name,
        "bundle_version": run.bundle_version,
        "bulk_window": str(window) if window else None,
        "counts": dict(run.counts),
        "done": run.counts["done"],
        "failed": run.counts["failed"],
        "unsupported": run.counts["unsupported"],
        "left": run.left,
        "total": sum(run.counts.values()),
        "images_per_second": round(rate, 3) if rate is not None else None,
        "eta": _iso(eta.at),
        "eta_seconds": round((eta.at - now).total_seconds(), 1) if eta.at else None,
        "waits_for_window": eta.waits_for_window,
        "window_opens_at": _iso(window.opens_at(now)) if window and eta.waits_for_window else None,
    }
    assert tuple(report) == REPORT_KEYS
    return report


def republish_run(engine: Engine, settings: Settings, run_id: int) -> int:
    """Distributed mode, on resume: publish the run's queued images that no message holds
    (all of them where the broker cannot list its messages: a second message claims nothing).
    Returns how many were published."""
    from bonewatch.worker.distributed import get_app, inspect_broker, publish

    app = get_app(settings)
    view = inspect_broker(app, fresh_seconds=settings.reconcile_grace_seconds)
    ids = [i for i in run_waiting_ids(engine, run_id) if view.ids is None or i not in view.ids]
    run = get_run(engine, run_id)
    if ids:
        publish(app, ids, run.queue, batch_size=settings.batch_size)
    return len(ids)
