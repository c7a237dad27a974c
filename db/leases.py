"""Leases: claiming images for a worker, handing them back for a retry, and taking back the
leases of workers that died or ran out of time."""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, and_, bindparam, case, func, or_, select, update

from bonewatch.db._sql import (
    chunks,
    finished,
    in_active_run,
    lease_expired,
    locking,
    released,
    update_each,
)
from bonewatch.db.backoff import retry_delay
from bonewatch.db.engine import write_transaction
from bonewatch.db.records import ClaimedImage
from bonewatch.db.registration import hand_over_duplicates
from bonewatch.db.schema import QUEUES, images, utcnow

logger = logging.getLogger(__name__)
_rng = random.Random()  # backoff jitter; spreads retries of a batch apart

# Claim order: the watched folder ("live") goes before archive backfills ("bulk").
_QUEUE_RANK = case((images.c.queue == "live", 0), else_=1)
# What a claim reads back: a ClaimedImage's fields, each the images column of that name.
_CLAIMED_COLUMNS = tuple(
    images.c.id.label(f.name) if f.name == "image_id" else images.c[f.name]
    for f in fields(ClaimedImage)
)


def _claimed(rows: Iterable[Any]) -> list[ClaimedImage]:
    out = [ClaimedImage(**row._mapping) for row in rows]
    out.sort(key=_claim_order)
    return out


def _claim_order(c: ClaimedImage) -> tuple[bool, int]:
    return (c.queue != "live", c.image_id)


def claim_queues(bulk_open: bool) -> tuple[str, ...]:
    """The queues a worker takes from, the bulk window's one rule for both modes: outside the
    window ``live`` only; inside it ``bulk`` as well (``live`` still first)."""
    return QUEUES if bulk_open else ("live",)


def _takeable(bulk_open: bool, held_runs: Sequence[int]) -> Any:
    """SQL: on a queue the window opens, in no paused or cancelled run, and in none of
    ``held_runs`` (runs outside a bulk window of their own)."""
    where = and_(images.c.queue.in_(claim_queues(bulk_open)), in_active_run())
    if held_runs:
        held = or_(images.c.run_id.is_(None), images.c.run_id.not_in(sorted(set(held_runs))))
        where = and_(where, held)
    return where


def _claimable(now: datetime, bulk_open: bool = True, held_runs: Sequence[int] = ()) -> Any:
    """SQL: a row a claim may take now: queued and past its backoff, or under an expired lease,
    and :func:`_takeable`."""
    waiting_done = or_(images.c.retry_after.is_(None), images.c.retry_after <= now)
    return and_(
        or_(and_(images.c.status == "queued", waiting_done), lease_expired(now)),
        _takeable(bulk_open, held_runs),
    )


def _give_up(conn: Connection, where: Any, *, error_class: str, reason: str, now: datetime) -> int:
    """Finish the rows matching ``where`` as ``failed`` with the reason, lease cleared; their
    duplicates with other bytes are handed over (one queued again) in the same transaction."""
    failed = list(
        conn.scalars(
            update(images)
            .where(where)
            .values(status="failed", error_class=error_class, reason=reason, **finished(now))
            .returning(images.c.id)
        )
    )
    hand_over_duplicates(conn, failed, now)
    return len(failed)


def _queue_again(conn: Connection, where: Any, *, now: datetime) -> int:
    """Put the rows matching ``where`` back to ``queued``, lease cleared, attempts kept."""
    return conn.execute(
        update(images).where(where).values(status="queued", **released(now))
    ).rowcount


def _fail_exhausted(conn: Connection, now: datetime, max_attempts: int | None) -> int:
    """Mark lease-expired rows that used up their attempts as failed; returns how many.

    A file that kills its worker outright (out of memory, a segfault in a decoder) never reaches
    ``release_for_retry``; without this it would be claimed again forever.
    """
    if max_attempts is None:
        return 0
    count = _give_up(
        conn,
        and_(lease_expired(now), images.c.attempts >= max_attempts),
        error_class="LeaseExpired",
        reason=f"worker lease expired {max_attempts} times; giving up",
        now=now,
    )
    if count:
        logger.warning("failed %d images whose lease expired too often", count)
    return count


def _lease(
    conn: Connection, ids: Sequence[int], now: datetime, lease_seconds: float, worker_id: str
) -> list[ClaimedImage]:
    if not ids:
        return []
    rows = conn.execute(
        update(images)
        .where(images.c.id.in_(ids))
        .values(
            status="processing",
            attempts=images.c.attempts + 1,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            leased_by=worker_id,
            updated_at=now,
        )
        .returning(*_CLAIMED_COLUMNS)
    ).all()
    return _claimed(rows)


def claim_batch(
    engine: Engine,
    *,
    limit: int,
    lease_seconds: float,
    worker_id: str,
    queues: Sequence[str] | None = None,
    max_attempts: int | None = None,
    bulk_open: bool = True,
    held_runs: Sequence[int] = (),
) -> list[ClaimedImage]:
    """Lease up to ``limit`` images to ``worker_id`` for ``lease_seconds``.

    Takes ``queued`` rows and ``processing`` rows whose lease has expired, ``live`` before
    ``bulk`` and then oldest first. Two concurrent callers never get the same row. With
    ``max_attempts``, expired rows that already had that many attempts are marked ``failed``
    instead of being claimed again. Rows of paused and cancelled runs are never taken, nor
    ``bulk`` rows while the bulk window is closed (``bulk_open`` False), nor rows of the runs
    in ``held_runs``.

    Returns:
        The claimed images, ``live`` first, then by id; attempts already counts this claim.
    """
    if limit <= 0:
        return []
    now = utcnow()
    with write_transaction(engine) as conn:
        _fail_exhausted(conn, now, max_attempts)
        stmt = (
            select(images.c.id)
            .where(_claimable(now, bulk_open, held_runs))
            .order_by(_QUEUE_RANK, images.c.id)
            .limit(limit)
        )
        if queues is not None:
            stmt = stmt.where(images.c.queue.in_(list(queues)))
        ids = list(conn.scalars(locking(conn, stmt)))
        claimed = _lease(conn, ids, now, lease_seconds, worker_id)
    if claimed:
        logger.debug("%s claimed %d images", worker_id, len(claimed))
    return claimed


def claim_images(
    engine: Engine,
    image_ids: Sequence[int],
    *,
    lease_seconds: float,
    worker_id: str,
    max_attempts: int | None = None,
    taking_over_from: Sequence[str] = (),
    bulk_open: bool = True,
    held_runs: Sequence[int] = (),
) -> list[ClaimedImage]:
    """Lease the given images, but only those that are ``queued`` or whose lease expired.

    For tasks that carry ids: a replayed message for an image that is done, or that another
    worker holds, claims nothing; nor does one for a paused or cancelled run, or for ``bulk``
    rows while the bulk window is closed (``bulk_open`` False) or of ``held_runs``. Rows that
    ``worker_id`` itself
    still holds, or that a worker in ``taking_over_from`` holds, are taken again: that is a
    task retried after the database went away mid-batch, in the same process or in another one
    the batch was handed to.
    ``max_attempts`` works as in :func:`claim_batch`.

    Returns:
        The images actually claimed (possibly none).
    """
    if not image_ids:
        return []
    now = utcnow()
    with write_transaction(engine) as conn:
        _fail_exhausted(conn, now, max_attempts)
        ids: list[int] = []
        for chunk in chunks(sorted(set(image_ids))):
            holders = [worker_id, *taking_over_from]
            mine = and_(images.c.status == "processing", images.c.leased_by.in_(holders))
            stmt = (
                select(images.c.id)
                .where(images.c.id.in_(chunk), or_(_claimable(now, bulk_open, held_runs), mine))
                .order_by(images.c.id)
            )
            ids.extend(conn.scalars(locking(conn, stmt)))
        claimed: list[ClaimedImage] = []
        for chunk in chunks(ids):
            claimed.extend(_lease(conn, chunk, now, lease_seconds, worker_id))
    claimed.sort(key=_claim_order)
    return claimed


def release_for_retry(
    engine: Engine,
    image_ids: Sequence[int],
    *,
    error_class: str,
    reason: str,
    max_attempts: int,
    worker_id: str | None = None,
    backoff_seconds: float = 2.0,
    backoff_cap_seconds: float = 60.0,
) -> None:
    """Hand images back after a transient failure.

    Images still ``processing`` go back to ``queued`` with the error noted, unless they have had
    ``max_attempts`` attempts already; those become ``failed`` with the reason. Images in any
    other state (already finished by a replay, say) are left alone, and so, with ``worker_id``,
    are images that another worker has claimed since this one's lease expired. A queued-again
    image is not claimable before its backoff has passed: :func:`retry_delay` of its attempts
    with ``backoff_seconds`` as base, jittered, never longer than ``backoff_cap_seconds``.
    """
    if not image_ids:
        return
    now = utcnow()
    ids = sorted(set(image_ids))
    with write_transaction(engine) as conn:
        n_failed = n_requeued = 0
        for chunk in chunks(ids):
            mine = and_(images.c.id.in_(chunk), images.c.status == "processing")
            if worker_id is not None:
                mine = and_(mine, images.c.leased_by == worker_id)
            n_failed += _give_up(
                conn,
                and_(mine, images.c.attempts >= max_attempts),
                error_class=error_class,
                reason=f"{reason} (gave up after {max_attempts} attempts)",
                now=now,
            )
            retry = [
                {
                    "b_id": row.id,
                    "b_after": now
                    + timedelta(
                        seconds=retry_delay(
                            row.attempts, base=backoff_seconds, cap=backoff_cap_seconds, rng=_rng
                        )
                    ),
                }
                for row in conn.execute(
                    select(images.c.id, images.c.attempts).where(
                        mine, images.c.attempts < max_attempts
                    )
                )
            ]
            update_each(
                conn,
                retry,
                status="queued",
                error_class=error_class,
                reason=reason,
                retry_after=bindparam("b_after"),
                **released(now),
            )
            n_requeued += len(retry)
    logger.info(
        "released %d images after %s: %d queued again, %d failed",
        len(ids),
        error_class,
        n_requeued,
        n_failed,
    )


def reclaim_expired(engine: Engine, *, max_attempts: int | None = None) -> int:
    """Put ``processing`` images whose lease expired back to ``queued``.

    With ``max_attempts``, those that already had that many attempts are failed instead.

    Returns:
        How many images were queued again.
    """
    now = utcnow()
    with write_transaction(engine) as conn:
        _fail_exhausted(conn, now, max_attempts)
        count = _queue_again(conn, lease_expired(now), now=now)
    if count:
        logger.info("reclaimed %d images with expired leases", count)
    return count


def next_retry_at(
    engine: Engine, *, bulk_open: bool = True, held_runs: Sequence[int] = ()
) -> datetime | None:
    """When the earliest queued image that is waiting out a backoff becomes claimable (of
    those a claim with ``bulk_open`` and ``held_runs`` may take: none of a paused or
    cancelled run)."""
    with engine.connect() as conn:
        value = conn.execute(
            select(func.min(images.c.retry_after)).where(
                images.c.status == "queued",
                images.c.retry_after.is_not(None),
                _takeable(bulk_open, held_runs),
            )
        ).scalar()
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def lease_holders(engine: Engine) -> list[str]:
    """The distinct ``leased_by`` names of images now ``processing``."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(images.c.leased_by)
            .where(images.c.status == "processing", images.c.leased_by.is_not(None))
            .distinct()
        )
        return sorted(str(r.leased_by) for r in rows)


def release_leases(
    engine: Engine, holders: Sequence[str], *, max_attempts: int | None = None
) -> int:
    """Queue again the ``processing`` images leased by ``holders`` (workers known to be dead),
    without waiting for their leases to expire. Attempts are kept; with ``max_attempts``, an
    image that has had that many is failed instead, so a file that kills its worker is not
    retried forever. Returns how many were queued again."""
    if not holders:
        return 0
    now = utcnow()
    held = and_(images.c.status == "processing", images.c.leased_by.in_(sorted(holders)))
    with write_transaction(engine) as conn:
        if max_attempts is not None:
            _give_up(
                conn,
                and_(held, images.c.attempts >= max_attempts),
                error_class="WorkerDied",
                reason=f"the worker died while processing this image {max_attempts} times",
                now=now,
            )
        count = _queue_again(conn, held, now=now)
    if count:
        logger.info("released %d images leased by dead workers %s", count, list(holders))
    return count


@contextmanager
def exclusive(engine: Engine, name: str) -> Iterator[bool]:
    """Try to become the one holder of ``name`` across every process using this database.

    Yields whether this caller got it; on PostgreSQL it is a session advisory lock, released on
    exit or when the connection dies. SQLite serves one host, so there it is always granted.
    """
    if engine.dialect.name != "postgresql":
        yield True
        return
    key = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)
    with engine.connect() as conn:
        got = bool(conn.execute(select(func.pg_try_advisory_lock(key))).scalar())
        try:
            yield got
        finally:
            if got:
                conn.execute(select(func.pg_advisory_unlock(key)))
            conn.commit()
