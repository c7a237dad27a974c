"""The outbox: DICOM result objects to send, one row per (object, destination).

A row goes pending -> sent, or pending -> failed once ``max_attempts`` attempts have failed
(each failure waits :func:`bonewatch.db.retry_delay` before the next). Sending is at least once:
a row is marked sent only after the destination said it stored the object, so a sender killed
mid-send sends it again on restart, and the deterministic UIDs make that a replacement. Enqueuing
is idempotent (the unique (object, destination) pair); a row already sent stays sent.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Engine, and_, exists, func, or_, select, update
from sqlalchemy import true as sa_true

from bonewatch.db._sql import chunks, insert
from bonewatch.db.backoff import retry_delay
from bonewatch.db.engine import write_transaction
from bonewatch.db.schema import (
    DELIVERY_STATUSES,
    FINAL_STATUSES,
    deliveries,
    images,
    predictions,
    studies,
    study_results,
    utcnow,
)


@dataclass(frozen=True)
class NewDelivery:
    """One object to send to one destination."""

    study_uid: str
    bundle_name: str
    bundle_version: str
    kind: str  # "sr" or "sc"
    sop_instance_uid: str
    destination: str
    source_sop_instance_uid: str | None = None


@dataclass(frozen=True)
class DueDelivery(NewDelivery):
    """An outbox row whose time has come."""

    id: int = 0
    attempts: int = 0


@dataclass(frozen=True)
class ImageResultRow:
    """An image's result, as the report needs it."""

    image_id: int
    path: str
    sop_instance_uid: str
    sop_class_uid: str
    body_part: str | None
    p_fracture: float
    threshold: float
    label: str | None
    heatmap_path: str | None


@dataclass(frozen=True)
class StudyResultRow:
    """A study's MURA result for one bundle version, and its images' results."""

    study_uid: str
    body_part: str | None
    mean_p_fracture: float
    threshold: float
    label: str
    images: tuple[ImageResultRow, ...]


def enqueue_deliveries(engine: Engine, items: Sequence[NewDelivery]) -> int:
    """Add the rows not there yet (pending, due now); returns how many were added."""
    now = utcnow()
    added = 0
    with write_transaction(engine) as conn:
        for chunk in chunks(items):
            for item in chunk:
                stmt = insert(conn, deliveries).values(
                    **vars(item),
                    status="pending",
                    attempts=0,
                    next_attempt_at=now,
                    created_at=now,
                    updated_at=now,
                )
                # RETURNING counts what was added on both dialects (psycopg's rowcount here is
                # not the row count).
                added += len(
                    conn.execute(
                        stmt.on_conflict_do_nothing(
                            index_elements=[deliveries.c.sop_instance_uid, deliveries.c.destination]
                        ).returning(deliveries.c.id)
                    ).all()
                )
    return added


def due_deliveries(
    engine: Engine,
    *,
    now: datetime | None = None,
    study: str | None = None,
    bundle: tuple[str, str] | None = None,
    limit: int = 500,
) -> list[DueDelivery]:
    """Pending rows whose next attempt is due, oldest first (of one ``(name, version)``)."""
    now = now or utcnow()
    stmt = (
        select(deliveries)
        .where(deliveries.c.status == "pending", deliveries.c.next_attempt_at <= now)
        .order_by(deliveries.c.next_attempt_at, deliveries.c.id)
        .limit(limit)
    )
    if study is not None:
        stmt = stmt.where(deliveries.c.study_uid == study)
    if bundle is not None:
        stmt = stmt.where(
            deliveries.c.bundle_name == bundle[0], deliveries.c.bundle_version == bundle[1]
        )
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    return [_due(row._mapping) for row in rows]


def _due(m: Any) -> DueDelivery:
    return DueDelivery(
        study_uid=m["study_uid"],
        bundle_name=m["bundle_name"],
        bundle_version=m["bundle_version"],
        kind=m["kind"],
        sop_instance_uid=m["sop_instance_uid"],
        destination=m["destination"],
        source_sop_instance_uid=m["source_sop_instance_uid"],
        id=m["id"],
        attempts=m["attempts"],
    )


def next_delivery_at(
    engine: Engine, *, study: str | None = None, bundle: tuple[str, str] | None = None
) -> datetime | None:
    """When the earliest pending row (of one ``(name, version)``) is due; None when nothing is
    pending."""
    stmt = select(func.min(deliveries.c.next_attempt_at)).where(deliveries.c.status == "pending")
    if study is not None:
        stmt = stmt.where(deliveries.c.study_uid == study)
    if bundle is not None:
        stmt = stmt.where(
            deliveries.c.bundle_name == bundle[0], deliveries.c.bundle_version == bundle[1]
        )
    with engine.connect() as conn:
        return conn.execute(stmt).scalar()


def mark_sent(engine: Engine, ids: Iterable[int]) -> None:
    """The destination stored these objects."""
    now = utcnow()
    with write_transaction(engine) as conn:
        for chunk in chunks(sorted(set(ids))):
            conn.execute(
                update(deliveries)
                .where(deliveries.c.id.in_(chunk))
                .values(
                    status="sent",
                    attempts=deliveries.c.attempts + 1,
                    last_error=None,
                    sent_at=now,
                    updated_at=now,
                )
            )


def mark_attempt_failed(
    engine: Engine,
    failures: dict[int, str],
    *,
    max_attempts: int,
    base: float,
    cap: float,
    rng: random.Random | None = None,
) -> int:
    """Record a failed attempt per row: pending again after the backoff, or ``failed`` once
    ``max_attempts`` attempts have failed. Returns how many became failed."""
    now = utcnow()
    gave_up = 0
    with write_transaction(engine) as conn:
        rows = conn.execute(
            select(deliveries.c.id, deliveries.c.attempts).where(
                deliveries.c.id.in_(sorted(failures)), deliveries.c.status == "pending"
            )
        ).all()
        for row in rows:
            attempts = row.attempts + 1
            values: dict[str, Any] = {
                "attempts": attempts,
                "last_error": failures[row.id][:2000],
                "updated_at": now,
            }
            if attempts >= max_attempts:
                values["status"] = "failed"
                gave_up += 1
            else:
                delay = retry_delay(attempts, base=base, cap=cap, rng=rng)
                values["next_attempt_at"] = now + timedelta(seconds=delay)
            conn.execute(update(deliveries).where(deliveries.c.id == row.id).values(**values))
    return gave_up


def retry_failed(engine: Engine, *, study: str | None = None) -> int:
    """Failed rows pending again, due now, with their attempts reset; returns how many."""
    now = utcnow()
    stmt = update(deliveries).where(deliveries.c.status == "failed")
    if study is not None:
        stmt = stmt.where(deliveries.c.study_uid == study)
    with write_transaction(engine) as conn:
        return conn.execute(
            stmt.values(status="pending", attempts=0, next_attempt_at=now, updated_at=now)
        ).rowcount


def count_deliveries(engine: Engine, *, study: str | None = None) -> dict[str, int]:
    """Rows by status: ``{"pending": N, "sent": N, "failed": N}``."""
    stmt = select(deliveries.c.status, func.count()).group_by(deliveries.c.status)
    if study is not None:
        stmt = stmt.where(deliveries.c.study_uid == study)
    counts = dict.fromkeys(DELIVERY_STATUSES, 0)
    with engine.connect() as conn:
        for status, n in conn.execute(stmt).all():
            counts[status] = int(n)
    return counts


def query_deliveries(engine: Engine, *, study: str | None = None) -> list[dict[str, Any]]:
    """Every row (for tests and reports), by id."""
    stmt = select(deliveries).order_by(deliveries.c.id)
    if study is not None:
        stmt = stmt.where(deliveries.c.study_uid == study)
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(stmt).all()]


def studies_to_deliver(
    engine: Engine,
    bundle_name: str,
    bundle_version: str,
    *,
    study_uids: Sequence[str] | None = None,
    finished: bool = False,
    enqueued: bool = False,
    destinations: Sequence[str] | None = None,
) -> list[str]:
    """Complete studies with a result of this bundle version and no SR row yet (for one of
    ``destinations`` at least, when given; with ``enqueued``, those that have one too).

    Complete: every image of the study has a final status, and either ``study_uids`` names it
    (``process``: all its images finished), or ``finished`` is set (the same for every study),
    or it counts as received (``studies.stable_at``), or it was complete when its objects were
    first enqueued (an SR row for another destination).
    """
    unfinished = exists().where(
        images.c.study_uid == study_results.c.study_uid, images.c.status.not_in(FINAL_STATUSES)
    )

    def has_sr(*where: ColumnElement[bool]) -> ColumnElement[bool]:
        return exists().where(
            deliveries.c.study_uid == study_results.c.study_uid,
            deliveries.c.bundle_name == bundle_name,
            deliveries.c.bundle_version == bundle_version,
            deliveries.c.kind == "sr",
            *where,
        )

    if enqueued:
        not_enqueued: ColumnElement[bool] = sa_true()
    elif destinations:
        not_enqueued = or_(*(~has_sr(deliveries.c.destination == d) for d in destinations))
    else:
        not_enqueued = ~has_sr()
    stable = exists().where(
        studies.c.study_uid == study_results.c.study_uid, studies.c.stable_at.is_not(None)
    )
    complete: ColumnElement[bool]
    if finished:
        complete = sa_true()
    else:
        # received (stable), or complete when its objects were first enqueued
        known = or_(stable, has_sr())
        complete = (
            known if study_uids is None else or_(known, study_results.c.study_uid.in_(study_uids))
        )
    stmt = (
        select(study_results.c.study_uid)
        .where(
            study_results.c.bundle_name == bundle_name,
            study_results.c.bundle_version == bundle_version,
            study_results.c.mean_p_fracture.is_not(None),
            ~unfinished,
            not_enqueued,
            complete,
        )
        .order_by(study_results.c.study_uid)
    )
    if study_uids is not None:
        stmt = stmt.where(study_results.c.study_uid.in_(study_uids))
    with engine.connect() as conn:
        return [row[0] for row in conn.execute(stmt).all()]


def finished_studies(engine: Engine, bundle_name: str, bundle_version: str) -> list[str]:
    """``process``: the studies with a result of this bundle version whose images all finished,
    and no SR row yet."""
    return studies_to_deliver(engine, bundle_name, bundle_version, finished=True)


def study_result(
    engine: Engine, study_uid: str, bundle_name: str, bundle_version: str
) -> StudyResultRow | None:
    """A study's result and its scored DICOM images' results (ordered by image id)."""
    with engine.connect() as conn:
        head = conn.execute(
            select(study_results).where(
                study_results.c.study_uid == study_uid,
                study_results.c.bundle_name == bundle_name,
                study_results.c.bundle_version == bundle_version,
            )
        ).first()
        if head is None or head.mean_p_fracture is None:
            return None
        rows = conn.execute(
            select(
                images.c.id,
                images.c.path,
                images.c.sop_instance_uid,
                images.c.sop_class_uid,
                predictions.c.body_part,
                predictions.c.p_fracture,
                predictions.c.threshold,
                predictions.c.label,
                predictions.c.heatmap_path,
            )
            .join(predictions, predictions.c.image_id == images.c.id)
            .where(
                and_(
                    images.c.study_uid == study_uid,
                    images.c.status == "done",
                    images.c.sop_instance_uid.is_not(None),
                    predictions.c.bundle_name == bundle_name,
                    predictions.c.bundle_version == bundle_version,
                    predictions.c.p_fracture.is_not(None),
                )
            )
            .order_by(images.c.id)
        ).all()
    return StudyResultRow(
        study_uid=study_uid,
        body_part=head.body_part,
        mean_p_fracture=float(head.mean_p_fracture),
        threshold=float(head.threshold if head.threshold is not None else 0.5),
        label=str(head.label or "negative"),
        images=tuple(
            ImageResultRow(
                image_id=r.id,
                path=r.path,
                sop_instance_uid=r.sop_instance_uid,
                sop_class_uid=r.sop_class_uid,
                body_part=r.body_part,
                p_fracture=float(r.p_fracture),
                threshold=float(r.threshold if r.threshold is not None else 0.5),
                label=r.label,
                heatmap_path=r.heatmap_path,
            )
            for r in rows
        ),
    )
