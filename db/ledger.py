"""Writing to and reading from the ledger: registration, claiming, results and queries.

Each public function is one transaction on the given Engine and takes and returns plain frozen
dataclasses or dicts, so callers never see SQLAlchemy objects. The code runs unchanged on SQLite
and PostgreSQL; where they differ (insert-or-ignore, row locking) the dialect is looked up here.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Insert,
    Select,
    Table,
    and_,
    bindparam,
    case,
    exists,
    false,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from bonewatch.db.engine import write_transaction
from bonewatch.db.schema import STATUSES, fingerprints, images, study_results, utcnow
from bonewatch.db.schema import predictions as prediction_table

logger = logging.getLogger(__name__)
_rng = random.Random()  # backoff jitter; spreads retries of a batch apart

# Keeps IN lists and multi-row statements well under SQLite's bound-parameter limit.
_CHUNK = 500
# Claim order: the watched folder ("live") goes before archive backfills ("bulk").
_QUEUE_RANK = case((images.c.queue == "live", 0), else_=1)


@dataclass(frozen=True)
class NewImage:
    """A file (or frame) seen by ingest, to be registered in the ledger.

    ``status`` is ``queued`` unless the header already showed the file to be ``failed`` or
    ``unsupported``, in which case ``error_class`` and ``reason`` say why.
    """

    path: str
    sha256: str | None
    size_bytes: int | None
    format: str | None
    queue: str = "live"
    study_uid: str | None = None
    series_uid: str | None = None
    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None
    patient_hash: str | None = None
    modality: str | None = None
    body_part_examined: str | None = None
    view_position: str | None = None
    rows: int | None = None
    columns: int | None = None
    mura_part: str | None = None
    mura_label: int | None = None
    frame_number: int | None = None
    status: str = "queued"
    error_class: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Registered:
    """Where a registered file stands: its row id, status, original if duplicate, new or not."""

    image_id: int
    status: str
    duplicate_of: int | None
    created: bool
    requeued: bool = False  # an old row that had failed for a passing reason, queued again


# Failures that say nothing about the file itself; seeing the file again retries it.
# A file that kept killing its workers (LeaseExpired, WorkerDied) is not retried this way.
RETRYABLE_ERRORS = ("TransientIOError",)


@dataclass(frozen=True)
class ClaimedImage:
    """An image leased to one worker for processing."""

    image_id: int
    path: str
    sha256: str | None
    attempts: int
    queue: str
    study_uid: str | None
    body_part_examined: str | None


@dataclass(frozen=True)
class PredictionRecord:
    """One bundle version's result for one image; ``status`` is ``done`` or ``unsupported``."""

    image_id: int
    bundle_name: str
    bundle_version: str
    status: str
    reason: str | None
    body_part_probs: dict[str, float]
    body_part: str | None
    body_part_confidence: float | None
    body_part_examined: str | None
    body_part_disagrees: bool
    p_fracture: float | None
    label: str | None
    threshold: float | None
    fracture_model: str | None
    timings: dict[str, float]
    heatmap_path: str | None = None
    rows: int | None = None
    columns: int | None = None


@dataclass(frozen=True)
class FailureRecord:
    """A final, non-retryable outcome for an image: ``failed`` or ``unsupported``."""

    image_id: int
    status: str
    error_class: str
    reason: str


# --------------------------------------------------------------------------- helpers


def _chunks(seq: Sequence[Any], size: int = _CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


def _insert(conn: Connection, table: Table) -> Any:
    """An INSERT that supports ``on_conflict_do_nothing`` on this connection's dialect."""
    name = conn.dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"the ledger supports sqlite and postgresql, not {name}")


def _locking(conn: Connection, stmt: Select[Any]) -> Select[Any]:
    """Lock the selected rows, skipping ones other workers hold (PostgreSQL).

    SQLite has no row locks; there the surrounding ``BEGIN IMMEDIATE`` already serialises
    writers, which is just as safe for claiming.
    """
    if conn.dialect.name == "postgresql":
        return stmt.with_for_update(skip_locked=True)
    return stmt


def _fingerprint_values(item: NewImage) -> list[tuple[str, str]]:
    values: list[tuple[str, str]] = []
    if item.sha256:
        values.append(("sha256", item.sha256))
    if item.sop_instance_uid:
        sop = item.sop_instance_uid
        if item.frame_number is not None:
            sop = f"{sop}#{item.frame_number}"
        values.append(("sop", sop))
    return values


def _check_choice(value: str, allowed: Iterable[str], what: str) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{what} must be one of {allowed}, not {value!r}")


def _claimed(rows: Iterable[Any]) -> list[ClaimedImage]:
    out = [
        ClaimedImage(
            image_id=r.id,
            path=r.path,
            sha256=r.sha256,
            attempts=r.attempts,
            queue=r.queue,
            study_uid=r.study_uid,
            body_part_examined=r.body_part_examined,
        )
        for r in rows
    ]
    out.sort(key=_claim_order)
    return out


def _claim_order(c: ClaimedImage) -> tuple[bool, int]:
    return (c.queue != "live", c.image_id)


def _expired(now: datetime) -> Any:
    return and_(images.c.status == "processing", images.c.lease_expires_at < now)


def _claimable(now: datetime) -> Any:
    waiting_done = or_(images.c.retry_after.is_(None), images.c.retry_after <= now)
    return or_(and_(images.c.status == "queued", waiting_done), _expired(now))


def retry_delay(attempts: int, *, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with ±25 % jitter: base, 2·base, 4·base … up to ``cap`` seconds."""
    delay = min(cap, base * 2 ** max(attempts - 1, 0))
    return delay * rng.uniform(0.75, 1.25)


def _give_up(conn: Connection, where: Any, *, error_class: str, reason: str, now: datetime) -> int:
    """Finish the rows matching ``where`` as ``failed`` with the reason, lease cleared."""
    return conn.execute(
        update(images)
        .where(where)
        .values(
            status="failed",
            error_class=error_class,
            reason=reason,
            lease_expires_at=None,
            leased_by=None,
            finished_at=now,
            updated_at=now,
        )
    ).rowcount


def _queue_again(conn: Connection, where: Any, *, now: datetime) -> int:
    """Put the rows matching ``where`` back to ``queued``, lease cleared, attempts kept."""
    return conn.execute(
        update(images)
        .where(where)
        .values(status="queued", lease_expires_at=None, leased_by=None, updated_at=now)
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
        and_(_expired(now), images.c.attempts >= max_attempts),
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
        .returning(
            images.c.id,
            images.c.path,
            images.c.sha256,
            images.c.attempts,
            images.c.queue,
            images.c.study_uid,
            images.c.body_part_examined,
        )
    ).all()
    return _claimed(rows)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


# --------------------------------------------------------------------------- registration


def register_images(engine: Engine, items: Sequence[NewImage]) -> list[Registered]:
    """Register files in the ledger, idempotently, marking copies as duplicates.

    A file already registered at the same path with the same sha256 keeps its row
    (``created=False``). A new row whose sha256, or SOPInstanceUID (plus frame), already belongs
    to another image gets status ``duplicate`` and ``duplicate_of`` that image. Ownership of a
    fingerprint is decided by a unique key with insert-or-ignore, so concurrent registrants agree.

    Returns:
        One ``Registered`` per item, in the order given.
    """
    for item in items:
        _check_choice(item.queue, ("live", "bulk"), "queue")
        _check_choice(item.status, ("queued", "failed", "unsupported"), "registration status")
    if not items:
        return []
    now = utcnow()
    # Same key twice in one batch is still one row. Inserting in key order means two concurrent
    # batches take their unique-index locks in the same order and cannot deadlock each other.
    unique: dict[tuple[str, str | None], NewImage] = {}
    for item in items:
        unique.setdefault((item.path, item.sha256), item)
    ordered = sorted(unique.items(), key=lambda kv: (kv[0][0], kv[0][1] or ""))

    with write_transaction(engine) as conn:
        created_ids: dict[tuple[str, str | None], int] = {}
        for chunk in _chunks(ordered):
            rows = [
                {
                    "path": item.path,
                    "sha256": item.sha256,
                    "size_bytes": item.size_bytes,
                    "format": item.format,
                    "frame_number": item.frame_number,
                    "study_uid": item.study_uid,
                    "series_uid": item.series_uid,
                    "sop_instance_uid": item.sop_instance_uid,
                    "sop_class_uid": item.sop_class_uid,
                    "patient_hash": item.patient_hash,
                    "modality": item.modality,
                    "body_part_examined": item.body_part_examined,
                    "view_position": item.view_position,
                    "rows": item.rows,
                    "columns": item.columns,
                    "mura_part": item.mura_part,
                    "mura_label": item.mura_label,
                    "queue": item.queue,
                    "status": item.status,
                    "attempts": 0,
                    "error_class": item.error_class,
                    "reason": item.reason,
                    "created_at": now,
                    "updated_at": now,
                    "finished_at": now if item.status != "queued" else None,
                }
                for _key, item in chunk
            ]
            stmt: Insert = _insert(conn, images).on_conflict_do_nothing()
            for row in conn.execute(
                stmt.returning(images.c.id, images.c.path, images.c.sha256), rows
            ):
                created_ids[(row.path, row.sha256)] = row.id

        _mark_duplicates(conn, unique, created_ids, now)
        requeued = _requeue_retryable(conn, unique, created_ids, now)

        # Read every row back (new and old) for its final status.
        by_key: dict[tuple[str, str | None], Any] = {}
        paths = sorted({key[0] for key in unique})
        for chunk in _chunks(paths):
            for row in conn.execute(
                select(
                    images.c.id,
                    images.c.path,
                    images.c.sha256,
                    images.c.status,
                    images.c.duplicate_of,
                ).where(images.c.path.in_(chunk))
            ):
                by_key[(row.path, row.sha256)] = row

    result: list[Registered] = []
    for item in items:
        key = (item.path, item.sha256)
        row = by_key[key]
        result.append(
            Registered(
                image_id=row.id,
                status=row.status,
                duplicate_of=row.duplicate_of,
                created=key in created_ids,
                requeued=row.id in requeued,
            )
        )
    n_new = len(created_ids)
    n_dup = sum(1 for r in result if r.created and r.status == "duplicate")
    logger.debug("registered %d items: %d new, %d duplicates", len(items), n_new, n_dup)
    return result


def _owned_elsewhere(item: NewImage) -> Any:
    """SQL: one of ``item``'s fingerprints belongs to an image other than the row at hand."""
    pairs = [
        and_(fingerprints.c.kind == kind, fingerprints.c.value == value)
        for kind, value in _fingerprint_values(item)
    ]
    if not pairs:
        return false()
    return exists().where(or_(*pairs), fingerprints.c.image_id != images.c.id)


def _requeue_retryable(
    conn: Connection,
    unique: dict[tuple[str, str | None], NewImage],
    created_ids: dict[tuple[str, str | None], int],
    now: datetime,
) -> set[int]:
    """Queue again known files whose earlier attempts failed for reasons outside the file (a
    share that was down, workers that died): registering them again is the user's retry."""
    keys = [k for k, item in unique.items() if k not in created_ids and item.status == "queued"]
    ids: set[int] = set()
    for chunk in _chunks(sorted(keys, key=lambda k: (k[0], k[1] or ""))):
        for key in chunk:
            path, sha = key
            match = and_(
                images.c.path == path,
                images.c.sha256.is_(None) if sha is None else images.c.sha256 == sha,
                images.c.status == "failed",
                images.c.error_class.in_(RETRYABLE_ERRORS),
                # A copy that took over its fingerprints meanwhile is the one to process.
                ~_owned_elsewhere(unique[key]),
            )
            for row in conn.execute(
                update(images)
                .where(match)
                .values(
                    status="queued",
                    queue=unique[key].queue,
                    attempts=0,
                    error_class=None,
                    reason=None,
                    retry_after=None,
                    finished_at=None,
                    updated_at=now,
                )
                .returning(images.c.id)
            ):
                ids.add(row.id)
    return ids


def _mark_duplicates(
    conn: Connection,
    unique: dict[tuple[str, str | None], NewImage],
    created_ids: dict[tuple[str, str | None], int],
    now: datetime,
) -> None:
    """Claim fingerprints for new rows; rows whose fingerprint another image owns are duplicates."""
    if not created_ids:
        return
    wanted: dict[tuple[str, str], int] = {}
    # Lowest id first, so within one batch the first-inserted row owns the fingerprint.
    for key, image_id in sorted(created_ids.items(), key=lambda kv: kv[1]):
        for fp in _fingerprint_values(unique[key]):
            wanted.setdefault(fp, image_id)
    if not wanted:
        return
    fp_rows = [
        {"kind": kind, "value": value, "image_id": image_id}
        for (kind, value), image_id in sorted(wanted.items())
    ]
    for chunk in _chunks(fp_rows):
        conn.execute(_insert(conn, fingerprints).on_conflict_do_nothing(), list(chunk))

    owners: dict[tuple[str, str], tuple[int, int | None]] = {}
    failed_owners: dict[tuple[str, str], int] = {}
    for kind in ("sha256", "sop"):
        values = sorted(v for k, v in wanted if k == kind)
        for chunk in _chunks(values):
            rows = conn.execute(
                select(
                    fingerprints.c.value,
                    fingerprints.c.image_id,
                    images.c.duplicate_of,
                    images.c.status,
                )
                .join(images, images.c.id == fingerprints.c.image_id)
                .where(fingerprints.c.kind == kind, fingerprints.c.value.in_(chunk))
            )
            for row in rows:
                owners[(kind, row.value)] = (row.image_id, row.duplicate_of)
                if row.status == "failed":
                    failed_owners[(kind, row.value)] = row.image_id

    # A re-send of an image whose earlier copy failed (truncated transfer, read error) is the
    # one to process, not a duplicate of the failure: the fingerprint moves to the new row.
    # The conditional update makes two concurrent re-sends agree on a single new owner.
    for fp, old_owner in sorted(failed_owners.items()):
        new_owner = wanted[fp]
        if new_owner == old_owner:
            continue
        moved = conn.execute(
            update(fingerprints)
            .where(
                fingerprints.c.kind == fp[0],
                fingerprints.c.value == fp[1],
                fingerprints.c.image_id == old_owner,
            )
            .values(image_id=new_owner)
        )
        if moved.rowcount == 1:
            owners[fp] = (new_owner, None)
        else:  # a concurrent re-send took it first: point at that one, not at the failure
            current = conn.execute(
                select(fingerprints.c.image_id).where(
                    fingerprints.c.kind == fp[0], fingerprints.c.value == fp[1]
                )
            ).scalar_one()
            owners[fp] = (current, None)

    updates: list[dict[str, Any]] = []
    for key, image_id in created_ids.items():
        # A byte-identical copy is the stronger evidence, so sha256 is checked before SOP.
        for fp in _fingerprint_values(unique[key]):
            owner, owner_original = owners[fp]
            if owner != image_id:
                updates.append(
                    {
                        "b_id": image_id,
                        # Point at the original, not at another duplicate.
                        "b_original": owner_original or owner,
                        "b_reason": f"same {fp[0]} as image {owner_original or owner}",
                    }
                )
                break
    if updates:
        conn.execute(
            update(images)
            .where(images.c.id == bindparam("b_id"))
            .values(
                status="duplicate",
                duplicate_of=bindparam("b_original"),
                reason=bindparam("b_reason"),
                finished_at=now,
                updated_at=now,
            ),
            updates,
        )


# --------------------------------------------------------------------------- claiming


def claim_batch(
    engine: Engine,
    *,
    limit: int,
    lease_seconds: float,
    worker_id: str,
    queues: Sequence[str] | None = None,
    max_attempts: int | None = None,
) -> list[ClaimedImage]:
    """Lease up to ``limit`` images to ``worker_id`` for ``lease_seconds``.

    Takes ``queued`` rows and ``processing`` rows whose lease has expired, ``live`` before
    ``bulk`` and then oldest first. Two concurrent callers never get the same row. With
    ``max_attempts``, expired rows that already had that many attempts are marked ``failed``
    instead of being claimed again.

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
            .where(_claimable(now))
            .order_by(_QUEUE_RANK, images.c.id)
            .limit(limit)
        )
        if queues is not None:
            stmt = stmt.where(images.c.queue.in_(list(queues)))
        ids = list(conn.scalars(_locking(conn, stmt)))
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
) -> list[ClaimedImage]:
    """Lease the given images, but only those that are ``queued`` or whose lease expired.

    For tasks that carry ids: a replayed message for an image that is done, or that another
    worker holds, claims nothing. Rows that ``worker_id`` itself still holds, or that a worker
    in ``taking_over_from`` holds, are taken again: that is a task retried after the database
    went away mid-batch, in the same process or in another one the batch was handed to.
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
        for chunk in _chunks(sorted(set(image_ids))):
            holders = [worker_id, *taking_over_from]
            mine = and_(images.c.status == "processing", images.c.leased_by.in_(holders))
            stmt = (
                select(images.c.id)
                .where(images.c.id.in_(chunk), or_(_claimable(now), mine))
                .order_by(images.c.id)
            )
            ids.extend(conn.scalars(_locking(conn, stmt)))
        claimed: list[ClaimedImage] = []
        for chunk in _chunks(ids):
            claimed.extend(_lease(conn, chunk, now, lease_seconds, worker_id))
    claimed.sort(key=_claim_order)
    return claimed


# --------------------------------------------------------------------------- results


def record_results(
    engine: Engine,
    predictions: Sequence[PredictionRecord],
    failures: Sequence[FailureRecord] = (),
    *,
    worker_id: str | None = None,
) -> int:
    """Store predictions and final failures, and refresh the touched studies' results.

    A prediction already stored for the same (image, bundle, version) is left as it is, so a
    replayed message never doubles a row. Each image gets its final status and reason, its lease
    is cleared, and ``study_results`` is recomputed for every study that got a prediction.

    With ``worker_id``, only images that worker still holds are recorded: a worker whose lease
    ran out and was taken over must not overwrite what the new holder records.

    Returns:
        How many images were recorded.
    """
    for p in predictions:
        _check_choice(p.status, ("done", "unsupported"), "prediction status")
    for f in failures:
        _check_choice(f.status, ("failed", "unsupported"), "failure status")
    if not predictions and not failures:
        return 0
    now = utcnow()
    with write_transaction(engine) as conn:
        if worker_id is not None:
            held = _still_held(
                conn,
                [*(p.image_id for p in predictions), *(f.image_id for f in failures)],
                worker_id,
            )
            lost = len(predictions) + len(failures)
            predictions = [p for p in predictions if p.image_id in held]
            failures = [f for f in failures if f.image_id in held]
            lost -= len(predictions) + len(failures)
            if lost:
                logger.warning(
                    "%s lost the lease on %d image(s) before recording them; the worker that "
                    "took them over records them",
                    worker_id,
                    lost,
                )
        if predictions:
            rows = [
                {
                    "image_id": p.image_id,
                    "bundle_name": p.bundle_name,
                    "bundle_version": p.bundle_version,
                    "body_part_probs": dict(p.body_part_probs),
                    "body_part": p.body_part,
                    "body_part_confidence": p.body_part_confidence,
                    "body_part_examined": p.body_part_examined,
                    "body_part_disagrees": p.body_part_disagrees,
                    "p_fracture": p.p_fracture,
                    "label": p.label,
                    "threshold": p.threshold,
                    "fracture_model": p.fracture_model,
                    "timings": dict(p.timings),
                    "heatmap_path": p.heatmap_path,
                    "created_at": now,
                }
                for p in sorted(
                    predictions, key=lambda p: (p.image_id, p.bundle_name, p.bundle_version)
                )
            ]
            for chunk in _chunks(rows):
                conn.execute(
                    _insert(conn, prediction_table).on_conflict_do_nothing(
                        index_elements=["image_id", "bundle_name", "bundle_version"]
                    ),
                    list(chunk),
                )
            conn.execute(
                update(images)
                .where(images.c.id == bindparam("b_id"))
                .values(
                    status=bindparam("b_status"),
                    reason=bindparam("b_reason"),
                    error_class=None,
                    rows=func.coalesce(bindparam("b_rows"), images.c.rows),
                    columns=func.coalesce(bindparam("b_columns"), images.c.columns),
                    lease_expires_at=None,
                    leased_by=None,
                    finished_at=now,
                    updated_at=now,
                ),
                [
                    {
                        "b_id": p.image_id,
                        "b_status": p.status,
                        "b_reason": p.reason,
                        "b_rows": p.rows,
                        "b_columns": p.columns,
                    }
                    for p in predictions
                ],
            )
        if failures:
            conn.execute(
                update(images)
                .where(images.c.id == bindparam("b_id"))
                .values(
                    status=bindparam("b_status"),
                    error_class=bindparam("b_error_class"),
                    reason=bindparam("b_reason"),
                    lease_expires_at=None,
                    leased_by=None,
                    finished_at=now,
                    updated_at=now,
                ),
                [
                    {
                        "b_id": f.image_id,
                        "b_status": f.status,
                        "b_error_class": f.error_class,
                        "b_reason": f.reason,
                    }
                    for f in failures
                ],
            )
        if predictions:
            image_ids = sorted({p.image_id for p in predictions})
            studies: set[str] = set()
            for chunk in _chunks(image_ids):
                studies.update(
                    conn.scalars(
                        select(images.c.study_uid)
                        .where(images.c.id.in_(chunk), images.c.study_uid.is_not(None))
                        .distinct()
                    )
                )
            for chunk in _chunks(sorted(studies)):
                _refresh_studies(conn, chunk, now)
    return len(predictions) + len(failures)


def _still_held(conn: Connection, image_ids: Sequence[int], worker_id: str) -> set[int]:
    """The ids among ``image_ids`` that are ``processing`` under ``worker_id``'s lease, locked."""
    held: set[int] = set()
    for chunk in _chunks(sorted(set(image_ids))):
        stmt = select(images.c.id).where(
            images.c.id.in_(chunk),
            images.c.status == "processing",
            images.c.leased_by == worker_id,
        )
        if conn.dialect.name == "postgresql":
            stmt = stmt.with_for_update()  # wait for a concurrent reclaim rather than skip
        held.update(conn.scalars(stmt))
    return held


def _refresh_studies(conn: Connection, study_uids: Sequence[str], now: datetime) -> None:
    """Recompute ``study_results`` for these studies, for every bundle version they have.

    Following MURA, a study's score is the mean p(fracture) of its scored images; its part is the
    part most of them were classified as (ties broken alphabetically); its label compares the
    mean with the mean of the images' thresholds (the same for images of one part).
    """
    study = images.c.study_uid
    scored = and_(study.in_(study_uids), prediction_table.c.p_fracture.is_not(None))
    joined = prediction_table.join(images, images.c.id == prediction_table.c.image_id)
    group = (study, prediction_table.c.bundle_name, prediction_table.c.bundle_version)

    part_rank = (
        select(
            study.label("study_uid"),
            prediction_table.c.bundle_name,
            prediction_table.c.bundle_version,
            prediction_table.c.body_part,
            func.row_number()
            .over(
                partition_by=group,
                order_by=(func.count().desc(), prediction_table.c.body_part),
            )
            .label("rank"),
        )
        .select_from(joined)
        .where(scored)
        .group_by(*group, prediction_table.c.body_part)
        .subquery("part_rank")
    )
    mean_p = func.avg(prediction_table.c.p_fracture)
    mean_threshold = func.avg(prediction_table.c.threshold)
    stats = (
        select(
            study.label("study_uid"),
            prediction_table.c.bundle_name,
            prediction_table.c.bundle_version,
            func.count(prediction_table.c.p_fracture).label("n_images"),
            mean_p.label("mean_p_fracture"),
            mean_threshold.label("threshold"),
            case(
                (mean_threshold.is_(None), None),
                (mean_p >= mean_threshold, "positive"),
                else_="negative",
            ).label("label"),
        )
        .select_from(joined)
        .where(scored)
        .group_by(*group)
        .subquery("stats")
    )
    source = (
        select(
            stats.c.study_uid,
            stats.c.bundle_name,
            stats.c.bundle_version,
            part_rank.c.body_part,
            stats.c.n_images,
            stats.c.mean_p_fracture,
            stats.c.threshold,
            stats.c.label,
            bindparam("now", now, type_=study_results.c.updated_at.type),
        )
        .join(
            part_rank,
            and_(
                part_rank.c.study_uid == stats.c.study_uid,
                part_rank.c.bundle_name == stats.c.bundle_name,
                part_rank.c.bundle_version == stats.c.bundle_version,
                part_rank.c.rank == 1,
            ),
        )
        # SQLite needs a WHERE before ON CONFLICT in INSERT ... SELECT to parse it unambiguously.
        .where(stats.c.n_images > 0)
    )
    cols = [
        "study_uid",
        "bundle_name",
        "bundle_version",
        "body_part",
        "n_images",
        "mean_p_fracture",
        "threshold",
        "label",
        "updated_at",
    ]
    stmt = _insert(conn, study_results).from_select(cols, source)
    stmt = stmt.on_conflict_do_update(
        index_elements=["study_uid", "bundle_name", "bundle_version"],
        set_={c: stmt.excluded[c] for c in cols[3:]},
    )
    conn.execute(stmt)


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
    image is not claimable before its backoff (:func:`retry_delay`) has passed.
    """
    if not image_ids:
        return
    now = utcnow()
    ids = sorted(set(image_ids))
    with write_transaction(engine) as conn:
        n_failed = n_requeued = 0
        for chunk in _chunks(ids):
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
            if retry:
                conn.execute(
                    update(images)
                    .where(images.c.id == bindparam("b_id"))
                    .values(
                        status="queued",
                        error_class=error_class,
                        reason=reason,
                        lease_expires_at=None,
                        leased_by=None,
                        retry_after=bindparam("b_after"),
                        updated_at=now,
                    ),
                    retry,
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
        count = _queue_again(conn, _expired(now), now=now)
    if count:
        logger.info("reclaimed %d images with expired leases", count)
    return count


def next_retry_at(engine: Engine) -> datetime | None:
    """When the earliest queued image that is waiting out a backoff becomes claimable."""
    with engine.connect() as conn:
        value = conn.execute(
            select(func.min(images.c.retry_after)).where(
                images.c.status == "queued", images.c.retry_after.is_not(None)
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


# --------------------------------------------------------------------------- queries


def queued_ids(
    engine: Engine, *, queue: str | None = None, limit: int | None = None, after_id: int = 0
) -> list[int]:
    """Ids of ``queued`` images above ``after_id``, ascending; for re-publishing lost messages."""
    stmt = (
        select(images.c.id)
        .where(images.c.status == "queued", images.c.id > after_id)
        .order_by(images.c.id)
    )
    if queue is not None:
        stmt = stmt.where(images.c.queue == queue)
    if limit is not None:
        stmt = stmt.limit(limit)
    with engine.connect() as conn:
        return list(conn.scalars(stmt))


def waiting_images(
    engine: Engine, *, settled_before: datetime, after_id: int = 0, limit: int = _CHUNK
) -> list[tuple[int, str]]:
    """``(id, queue)`` of ``queued`` rows, due now, last changed before ``settled_before``.

    For re-publishing lost messages: a row changed more recently may still have its message on
    the way. Pages by id (``after_id``), ascending.
    """
    now = utcnow()
    stmt = (
        select(images.c.id, images.c.queue)
        .where(
            images.c.status == "queued",
            images.c.id > after_id,
            images.c.updated_at < settled_before,
            or_(images.c.retry_after.is_(None), images.c.retry_after <= now),
        )
        .order_by(images.c.id)
        .limit(limit)
    )
    with engine.connect() as conn:
        return [(int(r.id), str(r.queue)) for r in conn.execute(stmt)]


def ledger_health(engine: Engine) -> dict[str, int]:
    """Checks that nothing was lost or counted twice.

    ``expired_leases``: ``processing`` rows whose worker stopped renewing (to be reclaimed).
    ``double_predictions``: images with more than one prediction from the same bundle version.
    ``finished_without_prediction``: ``done`` rows with no prediction at all.
    """
    now = utcnow()
    per_version = (
        select(prediction_table.c.image_id)
        .group_by(
            prediction_table.c.image_id,
            prediction_table.c.bundle_name,
            prediction_table.c.bundle_version,
        )
        .having(func.count() > 1)
        .subquery()
    )
    has_prediction = exists().where(prediction_table.c.image_id == images.c.id)
    with engine.connect() as conn:
        expired = conn.execute(select(func.count()).where(_expired(now))).scalar_one()
        doubles = conn.execute(select(func.count()).select_from(per_version)).scalar_one()
        orphans = conn.execute(
            select(func.count()).where(images.c.status == "done", ~has_prediction)
        ).scalar_one()
    return {
        "expired_leases": int(expired),
        "double_predictions": int(doubles),
        "finished_without_prediction": int(orphans),
    }


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


def count_by_status(engine: Engine) -> dict[str, int]:
    """How many images are in each status; every status is a key, zeros included."""
    counts = dict.fromkeys(STATUSES, 0)
    with engine.connect() as conn:
        for status, n in conn.execute(
            select(images.c.status, func.count()).group_by(images.c.status)
        ):
            counts[status] = n
    return counts


def query_results(
    engine: Engine,
    *,
    study: str | None = None,
    part: str | None = None,
    label: str | None = None,
    status: str | None = None,
    since: datetime | None = None,
    min_p: float | None = None,
    max_p: float | None = None,
    limit: int | None = None,
) -> list[dict[str, object]]:
    """One dict per image with its latest prediction (if any), filtered, ordered by image id.

    ``part`` and ``label`` and the score range match the latest prediction; ``status`` and
    ``since`` (on ``created_at``) match the image. Timestamps come back as ISO 8601 strings.
    """
    latest = (
        select(
            prediction_table.c.image_id,
            func.max(prediction_table.c.id).label("prediction_id"),
        )
        .group_by(prediction_table.c.image_id)
        .subquery("latest")
    )
    p = prediction_table
    stmt = (
        select(
            images.c.id,
            images.c.path,
            images.c.sha256,
            images.c.status,
            images.c.reason,
            images.c.error_class,
            images.c.queue,
            images.c.study_uid,
            images.c.series_uid,
            images.c.sop_instance_uid,
            images.c.modality,
            images.c.mura_part,
            images.c.mura_label,
            images.c.duplicate_of,
            images.c.attempts,
            images.c.created_at,
            images.c.finished_at,
            images.c.body_part_examined.label("image_body_part_examined"),
            p.c.body_part,
            p.c.body_part_confidence,
            p.c.body_part_examined,
            p.c.body_part_disagrees,
            p.c.p_fracture,
            p.c.label,
            p.c.threshold,
            p.c.fracture_model,
            p.c.bundle_name,
            p.c.bundle_version,
            p.c.heatmap_path,
        )
        .select_from(
            images.outerjoin(latest, latest.c.image_id == images.c.id).outerjoin(
                p, p.c.id == latest.c.prediction_id
            )
        )
        .order_by(images.c.id)
    )
    if study is not None:
        stmt = stmt.where(images.c.study_uid == study)
    if part is not None:
        stmt = stmt.where(func.upper(p.c.body_part) == part.upper())
    if label is not None:
        stmt = stmt.where(p.c.label == label)
    if status is not None:
        stmt = stmt.where(images.c.status == status)
    if since is not None:
        stmt = stmt.where(images.c.created_at >= since)
    if min_p is not None:
        stmt = stmt.where(p.c.p_fracture >= min_p)
    if max_p is not None:
        stmt = stmt.where(p.c.p_fracture <= max_p)
    if limit is not None:
        stmt = stmt.limit(limit)
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    return [
        {
            "id": r.id,
            "path": r.path,
            "sha256": r.sha256,
            "status": r.status,
            "reason": r.reason,
            "error_class": r.error_class,
            "queue": r.queue,
            "study_uid": r.study_uid,
            "series_uid": r.series_uid,
            "sop_instance_uid": r.sop_instance_uid,
            "modality": r.modality,
            "mura_part": r.mura_part,
            "mura_label": r.mura_label,
            "body_part": r.body_part,
            "body_part_confidence": r.body_part_confidence,
            # The model's copy of the header value if it ran, else the registered one.
            "body_part_examined": (
                r.body_part_examined if r.bundle_name is not None else r.image_body_part_examined
            ),
            "body_part_disagrees": r.body_part_disagrees,
            "p_fracture": r.p_fracture,
            "label": r.label,
            "threshold": r.threshold,
            "fracture_model": r.fracture_model,
            "bundle": r.bundle_name,
            "bundle_version": r.bundle_version,
            "heatmap_path": r.heatmap_path,
            "duplicate_of": r.duplicate_of,
            "attempts": r.attempts,
            "created_at": _iso(r.created_at),
            "finished_at": _iso(r.finished_at),
        }
        for r in rows
    ]


def query_studies(
    engine: Engine,
    *,
    study: str | None = None,
    part: str | None = None,
    label: str | None = None,
) -> list[dict[str, object]]:
    """Study-level results (one dict per study and bundle version), ordered by study then bundle.

    Keys: study_uid, bundle, bundle_version, body_part, n_images, mean_p_fracture, threshold,
    label, updated_at (ISO string).
    """
    s = study_results
    stmt = select(s).order_by(s.c.study_uid, s.c.bundle_name, s.c.bundle_version)
    if study is not None:
        stmt = stmt.where(s.c.study_uid == study)
    if part is not None:
        stmt = stmt.where(func.upper(s.c.body_part) == part.upper())
    if label is not None:
        stmt = stmt.where(s.c.label == label)
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    return [
        {
            "study_uid": r.study_uid,
            "bundle": r.bundle_name,
            "bundle_version": r.bundle_version,
            "body_part": r.body_part,
            "n_images": r.n_images,
            "mean_p_fracture": r.mean_p_fracture,
            "threshold": r.threshold,
            "label": r.label,
            "updated_at": _iso(r.updated_at),
        }
        for r in rows
    ]
