"""Recording results: predictions and final failures, and the study aggregates they feed."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, and_, bindparam, case, func, select

from bonewatch.db._sql import check_choice, chunks, finished, insert, update_each
from bonewatch.db.engine import write_transaction
from bonewatch.db.records import (
    FAILURE_IMAGE_FIELDS,
    PREDICTION_IMAGE_FIELDS,
    FailureRecord,
    PredictionRecord,
    prediction_values,
)
from bonewatch.db.registration import hand_over_duplicates
from bonewatch.db.schema import images, study_results, utcnow
from bonewatch.db.schema import predictions as prediction_table

logger = logging.getLogger(__name__)


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
    is cleared, and ``study_results`` is recomputed for every study that got a prediction. An
    image that ends ``failed`` hands its duplicates with other bytes over
    (:func:`~bonewatch.db.registration.hand_over_duplicates`): one of them is queued again.

    With ``worker_id``, only images that worker still holds are recorded: a worker whose lease
    ran out and was taken over must not overwrite what the new holder records.

    Returns:
        How many images were recorded.
    """
    for p in predictions:
        check_choice(p.status, ("done", "unsupported"), "prediction status")
    for f in failures:
        check_choice(f.status, ("failed", "unsupported"), "failure status")
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
                {**prediction_values(p), "created_at": now}
                for p in sorted(
                    predictions, key=lambda p: (p.image_id, p.bundle_name, p.bundle_version)
                )
            ]
            for chunk in chunks(rows):
                conn.execute(
                    insert(conn, prediction_table).on_conflict_do_nothing(
                        index_elements=["image_id", "bundle_name", "bundle_version"]
                    ),
                    list(chunk),
                )
            _finish_images(
                conn,
                predictions,
                PREDICTION_IMAGE_FIELDS,
                now,
                error_class=None,
                # A size the decoder could not tell keeps the one the header gave.
                rows=func.coalesce(bindparam("b_rows"), images.c.rows),
                columns=func.coalesce(bindparam("b_columns"), images.c.columns),
            )
        _finish_images(conn, failures, FAILURE_IMAGE_FIELDS, now)
        # A copy with other bytes that was registered as this image's duplicate is processed
        # now instead (in this transaction): a failure must not keep it a duplicate for ever.
        hand_over_duplicates(conn, [f.image_id for f in failures if f.status == "failed"], now)
        if predictions:
            image_ids = sorted({p.image_id for p in predictions})
            studies: set[str] = set()
            for chunk in chunks(image_ids):
                studies.update(
                    conn.scalars(
                        select(images.c.study_uid)
                        .where(images.c.id.in_(chunk), images.c.study_uid.is_not(None))
                        .distinct()
                    )
                )
            for chunk in chunks(sorted(studies)):
                _refresh_studies(conn, chunk, now)
    return len(predictions) + len(failures)


def _finish_images(
    conn: Connection,
    records: Sequence[PredictionRecord | FailureRecord],
    names: tuple[str, ...],
    now: datetime,
    **values: Any,
) -> None:
    """Give each record's image its final row: the record's fields ``names`` (each the images
    column of that name) unless ``values`` says otherwise, and the lease given up."""
    update_each(
        conn,
        [{"b_id": r.image_id, **{f"b_{n}": getattr(r, n) for n in names}} for r in records],
        **{**{n: bindparam(f"b_{n}") for n in names}, **finished(now), **values},
    )


def _still_held(conn: Connection, image_ids: Sequence[int], worker_id: str) -> set[int]:
    """The ids among ``image_ids`` that are ``processing`` under ``worker_id``'s lease, locked."""
    held: set[int] = set()
    for chunk in chunks(sorted(set(image_ids))):
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
    stmt = insert(conn, study_results).from_select(cols, source)
    stmt = stmt.on_conflict_do_update(
        index_elements=["study_uid", "bundle_name", "bundle_version"],
        set_={c: stmt.excluded[c] for c in cols[3:]},
    )
    conn.execute(stmt)
