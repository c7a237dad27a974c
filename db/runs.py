"""Runs: an archive given to ``process``, or a watched folder or listener for as long as it lives.

A run row holds what was asked (paths, who, when, the bundle, the bulk window) and what its
owner wants now (``control``: active, paused or cancelled). Its counts are its images' rows,
by ``images.run_id``, never a copy that could drift. Pausing changes the run row only: a claim
skips the rows of a run that is not active (``_sql.in_active_run``). Cancelling also marks the
run's waiting rows ``cancelled`` with a reason; resuming queues them again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, and_, func, or_, select, update

from bonewatch.db._sql import check_choice, insert, lease_expired
from bonewatch.db.engine import write_transaction
from bonewatch.db.records import NewRun, RunInfo
from bonewatch.db.schema import QUEUES, RUN_KINDS, STATUSES, images, runs, utcnow

logger = logging.getLogger(__name__)

# Statuses of images still to be worked on; a cancelled image is one, until its run resumes.
LEFT_STATUSES: tuple[str, ...] = ("queued", "processing", "cancelled")
# Statuses a worker's attempt ends in; the rate counts only rows that had an attempt.
WORKED_STATUSES: tuple[str, ...] = ("done", "failed", "unsupported")
# How far back the "recent" rate looks, by default.
RECENT_SECONDS = 300.0


class RunNotFoundError(LookupError):
    """No run has that id."""


class RunStateError(ValueError):
    """The run cannot go where it was asked to (a cancelled run paused, say)."""


@dataclass(frozen=True)
class CancelOutcome:
    """A cancel: the run afterwards, the rows it marked ``cancelled``, and the rows of an
    already claimed batch that still finish."""

    run: RunInfo
    cancelled: int
    still_processing: int


def _new_run_values(run: NewRun, now: datetime) -> dict[str, Any]:
    check_choice(run.kind, RUN_KINDS, "run kind")
    check_choice(run.queue, QUEUES, "run queue")
    values = asdict(run)
    values["paths"] = list(run.paths)
    return {**values, "control": "active", "created_at": now, "updated_at": now}


def create_run(engine: Engine, run: NewRun) -> int:
    """A new run (``process``); returns its id."""
    now = utcnow()
    with write_transaction(engine) as conn:
        return int(
            conn.execute(
                runs.insert().values(**_new_run_values(run, now)).returning(runs.c.id)
            ).scalar_one()
        )


def open_long_lived_run(engine: Engine, run: NewRun) -> int:
    """The run named ``run.key`` (a watched folder, a listener), created on first use; a
    restart carries on with the same run. Returns its id."""
    if not run.key:
        raise ValueError("a long-lived run needs a key")
    now = utcnow()
    with write_transaction(engine) as conn:
        conn.execute(
            insert(conn, runs).values(**_new_run_values(run, now)).on_conflict_do_nothing()
        )
        return int(conn.execute(select(runs.c.id).where(runs.c.key == run.key)).scalar_one())


def seal_run(engine: Engine, run_id: int) -> None:
    """Every path of the run is registered: once nothing is left, the run is done."""
    now = utcnow()
    with write_transaction(engine) as conn:
        conn.execute(update(runs).where(runs.c.id == run_id).values(sealed_at=now, updated_at=now))


def _counts(conn: Connection, run_ids: Sequence[int]) -> dict[int, dict[str, int]]:
    counts = {run_id: dict.fromkeys(STATUSES, 0) for run_id in run_ids}
    if not run_ids:
        return counts
    stmt = (
        select(images.c.run_id, images.c.status, func.count())
        .where(images.c.run_id.in_(list(run_ids)))
        .group_by(images.c.run_id, images.c.status)
    )
    for run_id, status, n in conn.execute(stmt):
        counts[run_id][status] = int(n)
    return counts


def _finishes(
    conn: Connection, run_id: int, since: datetime | None
) -> tuple[int, int, float, datetime | None]:
    """(images finished by a worker, of them at the first finish time, seconds from the first
    finish to the last, the last finish time) of a run, since ``since`` where given."""
    where = [
        images.c.run_id == run_id,
        images.c.status.in_(WORKED_STATUSES),
        images.c.attempts > 0,
        images.c.finished_at.is_not(None),
    ]
    if since is not None:
        where.append(images.c.finished_at > since)
    n, first, last = conn.execute(
        select(func.count(), func.min(images.c.finished_at), func.max(images.c.finished_at))
        .select_from(images)
        .where(*where)
    ).one()
    if not n:
        return 0, 0, 0.0, None
    first, last = _aware(first), _aware(last)
    at_first = conn.execute(
        select(func.count()).select_from(images).where(*where, images.c.finished_at <= first)
    ).scalar_one()
    return int(n), int(at_first), (last - first).total_seconds(), last


def _aware(value: Any) -> Any:
    """A timestamp read through an aggregate (no column type on the way): UTC-aware."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _state(row: Any, counts: dict[str, int], worked: int) -> str:
    left = sum(counts[s] for s in LEFT_STATUSES)
    if row.sealed_at is not None and left == 0:
        return "done"  # paused or cancelled after the last image finished: done all the same
    if row.control != "active":
        return str(row.control)
    if row.key is not None:
        return "running"  # a watched folder or listener: following, whether or not busy
    if worked == 0 and counts["processing"] == 0:
        return "queued"
    return "running"


def _infos(conn: Connection, rows: Sequence[Any], recent_seconds: float) -> list[RunInfo]:
    counts = _counts(conn, [row.id for row in rows])
    since = utcnow() - timedelta(seconds=recent_seconds)
    out = []
    for row in rows:
        c = counts[row.id]
        total, total_first, total_span, last = _finishes(conn, row.id, None)
        recent, recent_first, recent_span, _ = _finishes(conn, row.id, since)
        out.append(
            RunInfo(
                id=row.id,
                kind=row.kind,
                key=row.key,
                queue=row.queue,
                paths=tuple(row.paths or ()),
                started_by=row.started_by,
                bundle_name=row.bundle_name,
                bundle_version=row.bundle_version,
                bulk_window=row.bulk_window,
                control=row.control,
                reason=row.reason,
                created_at=row.created_at,
                updated_at=row.updated_at,
                sealed_at=row.sealed_at,
                state=_state(row, c, total),
                counts=c,
                left=sum(c[s] for s in LEFT_STATUSES),
                recent_seconds=recent_seconds,
                recent=recent,
                recent_first=recent_first,
                recent_span_seconds=recent_span,
                total_worked=total,
                total_first=total_first,
                total_span_seconds=total_span,
                last_finished_at=last,
            )
        )
    return out


def get_run(engine: Engine, run_id: int, *, recent_seconds: float = RECENT_SECONDS) -> RunInfo:
    """One run, with its counts and rates.

    Raises:
        RunNotFoundError: no run has that id.
    """
    with engine.connect() as conn:
        row = conn.execute(select(runs).where(runs.c.id == run_id)).first()
        if row is None:
            raise RunNotFoundError(f"no run {run_id}")
        return _infos(conn, [row], recent_seconds)[0]


def list_runs(
    engine: Engine, *, limit: int | None = None, recent_seconds: float = RECENT_SECONDS
) -> list[RunInfo]:
    """The runs, newest first (at most ``limit``), with their counts and rates."""
    stmt = select(runs).order_by(runs.c.id.desc())
    if limit is not None:
        stmt = stmt.limit(limit)
    with engine.connect() as conn:
        return _infos(conn, conn.execute(stmt).all(), recent_seconds)


def _set_control(
    conn: Connection, run_id: int, control: str, reason: str | None, now: datetime
) -> None:
    """Set a run's control state (active, paused or cancelled) and its reason."""
    conn.execute(
        update(runs)
        .where(runs.c.id == run_id)
        .values(control=control, reason=reason, updated_at=now)
    )


def _locked_run(conn: Connection, run_id: int) -> Any:
    stmt = select(runs).where(runs.c.id == run_id)
    if conn.dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    row = conn.execute(stmt).first()
    if row is None:
        raise RunNotFoundError(f"no run {run_id}")
    return row


def pause_run(engine: Engine, run_id: int, *, reason: str | None = None) -> RunInfo:
    """Hold the run: its waiting images are not claimed until it is resumed; a batch already
    claimed finishes. Pausing a paused run changes nothing.

    Raises:
        RunNotFoundError: no run has that id.
        RunStateError: the run is cancelled (``resume`` starts it again).
    """
    now = utcnow()
    with write_transaction(engine) as conn:
        row = _locked_run(conn, run_id)
        if row.control == "cancelled":
            raise RunStateError(f"run {run_id} is cancelled; `resume` starts it again")
        if row.control == "active":
            _set_control(conn, run_id, "paused", reason, now)
    logger.info("run %d paused", run_id)
    return get_run(engine, run_id)


def resume_run(engine: Engine, run_id: int) -> tuple[RunInfo, int]:
    """Let a paused or cancelled run go on: its ``cancelled`` images are queued again
    (attempts kept). Resuming an active run changes nothing.

    Returns:
        The run, and how many images were queued again.

    Raises:
        RunNotFoundError: no run has that id.
    """
    now = utcnow()
    with write_transaction(engine) as conn:
        _locked_run(conn, run_id)
        _set_control(conn, run_id, "active", None, now)
        requeued = conn.execute(
            update(images)
            .where(images.c.run_id == run_id, images.c.status == "cancelled")
            .values(
                status="queued",
                error_class=None,
                reason=None,
                retry_after=None,
                finished_at=None,
                updated_at=now,
            )
        ).rowcount
    logger.info("run %d resumed; %d images queued again", run_id, requeued)
    return get_run(engine, run_id), int(requeued)


def cancel_run(engine: Engine, run_id: int, *, reason: str) -> CancelOutcome:
    """Cancel the run: finished results stay as they are; its waiting images (queued, or
    under a lease that expired) become ``cancelled`` with ``reason``. Images of a batch already
    claimed finish. ``resume`` starts the run again.

    Raises:
        RunNotFoundError: no run has that id.
    """
    now = utcnow()
    with write_transaction(engine) as conn:
        _locked_run(conn, run_id)
        _set_control(conn, run_id, "cancelled", reason, now)
        waiting = or_(images.c.status == "queued", lease_expired(now))
        cancelled = conn.execute(
            update(images)
            .where(images.c.run_id == run_id, waiting)
            .values(
                status="cancelled",
                error_class="RunCancelled",
                reason=reason,
                lease_expires_at=None,
                leased_by=None,
                updated_at=now,
            )
        ).rowcount
        still = conn.execute(
            select(func.count())
            .select_from(images)
            .where(and_(images.c.run_id == run_id, images.c.status == "processing"))
        ).scalar_one()
    logger.info("run %d cancelled: %d images cancelled, %d finishing", run_id, cancelled, still)
    return CancelOutcome(get_run(engine, run_id), int(cancelled), int(still))


def set_run_window(engine: Engine, run_id: int, window: str | None) -> RunInfo:
    """Move the bulk window a run was started with (None: any hour). The run's own ``process``
    follows it from its next look at the run.

    Raises:
        RunNotFoundError: no run has that id.
    """
    now = utcnow()
    with write_transaction(engine) as conn:
        _locked_run(conn, run_id)
        conn.execute(
            update(runs).where(runs.c.id == run_id).values(bulk_window=window, updated_at=now)
        )
    return get_run(engine, run_id)


def windowed_runs(engine: Engine) -> list[tuple[int, str]]:
    """``(id, bulk_window)`` of the active runs that have a window of their own and images
    waiting: a claim holds back those whose window is closed now."""
    waiting = (
        select(images.c.id)
        .where(images.c.run_id == runs.c.id, images.c.status == "queued")
        .exists()
    )
    stmt = (
        select(runs.c.id, runs.c.bulk_window)
        .where(runs.c.bulk_window.is_not(None), runs.c.control == "active", waiting)
        .order_by(runs.c.id)
    )
    with engine.connect() as conn:
        return [(int(r.id), str(r.bulk_window)) for r in conn.execute(stmt)]


def run_waiting_ids(engine: Engine, run_id: int) -> list[int]:
    """The ids of the run's ``queued`` images, ascending (to publish them on resume)."""
    with engine.connect() as conn:
        return [
            int(i)
            for i in conn.scalars(
                select(images.c.id)
                .where(images.c.run_id == run_id, images.c.status == "queued")
                .order_by(images.c.id)
            )
        ]
