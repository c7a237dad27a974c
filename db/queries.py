"""Reading the ledger: counts, health checks, and the results and study queries.

The keys of :func:`query_results` and :func:`query_studies`, and their order, are an output
contract (``bonewatch results --format json/csv``); each is declared once, in the column tuples.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Engine, Select, case, exists, func, or_, select

from bonewatch.db._sql import CHUNK, in_active_run, lease_expired
from bonewatch.db.schema import STATUSES, images, study_results, utcnow
from bonewatch.db.schema import predictions as prediction_table

_p = prediction_table
# query_results' keys in order, each an images column, or one of the image's latest prediction.
_RESULT_COLUMNS: tuple[Any, ...] = (
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
    _p.c.body_part,
    _p.c.body_part_confidence,
    # The model's copy of the header value if it ran, else the registered one.
    case(
        (_p.c.bundle_name.is_not(None), _p.c.body_part_examined),
        else_=images.c.body_part_examined,
    ).label("body_part_examined"),
    _p.c.body_part_disagrees,
    _p.c.p_fracture,
    _p.c.label,
    _p.c.threshold,
    _p.c.fracture_model,
    _p.c.bundle_name.label("bundle"),
    _p.c.bundle_version,
    _p.c.heatmap_path,
    images.c.duplicate_of,
    images.c.attempts,
    images.c.created_at,
    images.c.finished_at,
    images.c.run_id,
)
# query_studies' keys in order.
_STUDY_COLUMNS: tuple[Any, ...] = (
    study_results.c.study_uid,
    study_results.c.bundle_name.label("bundle"),
    study_results.c.bundle_version,
    study_results.c.body_part,
    study_results.c.n_images,
    study_results.c.mean_p_fracture,
    study_results.c.threshold,
    study_results.c.label,
    study_results.c.updated_at,
)


def _by_study_part_label(
    stmt: Select[Any],
    columns: tuple[Any, Any, Any],
    *,
    study: str | None,
    part: str | None,
    label: str | None,
) -> Select[Any]:
    """The filters both queries take: study UID, body part (any case) and label, where given."""
    study_uid, body_part, label_column = columns
    if study is not None:
        stmt = stmt.where(study_uid == study)
    if part is not None:
        stmt = stmt.where(func.upper(body_part) == part.upper())
    if label is not None:
        stmt = stmt.where(label_column == label)
    return stmt


def _plain(row: Any) -> dict[str, object]:
    """A result row as a dict in column order, timestamps as ISO 8601 strings."""
    return {
        key: value.isoformat() if isinstance(value, datetime) else value
        for key, value in row._mapping.items()
    }


def waiting_images(
    engine: Engine, *, settled_before: datetime, after_id: int = 0, limit: int = CHUNK
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
            in_active_run(),  # a paused run's rows are published again when it resumes
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
        expired = conn.execute(select(func.count()).where(lease_expired(now))).scalar_one()
        doubles = conn.execute(select(func.count()).select_from(per_version)).scalar_one()
        orphans = conn.execute(
            select(func.count()).where(images.c.status == "done", ~has_prediction)
        ).scalar_one()
    return {
        "expired_leases": int(expired),
        "double_predictions": int(doubles),
        "finished_without_prediction": int(orphans),
    }


def count_by_status(engine: Engine, *, run_id: int | None = None) -> dict[str, int]:
    """How many images are in each status (of one run, with ``run_id``); every status is a
    key, zeros included."""
    counts = dict.fromkeys(STATUSES, 0)
    stmt = select(images.c.status, func.count()).group_by(images.c.status)
    if run_id is not None:
        stmt = stmt.where(images.c.run_id == run_id)
    with engine.connect() as conn:
        for status, n in conn.execute(stmt):
            counts[status] = n
    return counts


def served_variants(engine: Engine) -> list[str]:
    """The engine/precision values (``onnx/int8``) that the ledger's predictions record, sorted."""
    with engine.connect() as conn:
        found = {
            str(timings["engine"])
            for (timings,) in conn.execute(select(_p.c.timings))
            if isinstance(timings, dict) and "engine" in timings
        }
    return sorted(found)


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
    image_id: int | None = None,
    path_glob: str | None = None,
    bundle: str | None = None,
    finished_after: datetime | None = None,
    run_id: int | None = None,
) -> list[dict[str, object]]:
    """One dict per image with its latest prediction (if any), filtered, ordered by image id.

    ``part`` and ``label`` and the score range match the latest prediction; ``status``,
    ``since`` (on ``created_at``), ``run_id``, ``image_id`` and ``path_glob`` (``*`` and ``?``
    as in a shell; ``*`` also crosses ``/``) match the image. Timestamps come back as ISO 8601
    strings.
    """
    latest_query = select(
        prediction_table.c.image_id,
        func.max(prediction_table.c.id).label("prediction_id"),
    ).group_by(prediction_table.c.image_id)
    if bundle is not None:  # that bundle's latest prediction, and only images it scored
        latest_query = latest_query.where(prediction_table.c.bundle_name == bundle)
    latest = latest_query.subquery("latest")
    p = prediction_table
    stmt = (
        select(*_RESULT_COLUMNS)
        .select_from(
            images.outerjoin(latest, latest.c.image_id == images.c.id).outerjoin(
                p, p.c.id == latest.c.prediction_id
            )
        )
        .order_by(images.c.id)
    )
    stmt = _by_study_part_label(
        stmt, (images.c.study_uid, p.c.body_part, p.c.label), study=study, part=part, label=label
    )
    if status is not None:
        stmt = stmt.where(images.c.status == status)
    if since is not None:
        stmt = stmt.where(images.c.created_at >= since)
    if min_p is not None:
        stmt = stmt.where(p.c.p_fracture >= min_p)
    if max_p is not None:
        stmt = stmt.where(p.c.p_fracture <= max_p)
    if image_id is not None:
        stmt = stmt.where(images.c.id == image_id)
    if run_id is not None:
        stmt = stmt.where(images.c.run_id == run_id)
    if finished_after is not None:
        stmt = stmt.where(images.c.finished_at > finished_after)
    if bundle is not None:
        stmt = stmt.where(latest.c.prediction_id.is_not(None))
    if path_glob is not None:
        stmt = stmt.where(images.c.path.like(glob_to_like(path_glob), escape="\\"))
    if limit is not None:
        stmt = stmt.limit(limit)
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    return [_plain(row) for row in rows]


def glob_to_like(pattern: str) -> str:
    """A shell-style pattern as a LIKE pattern with ``\\`` as its escape character."""
    out = []
    for char in pattern:
        if char in "%_\\":
            out.append("\\" + char)
        elif char == "*":
            out.append("%")
        elif char == "?":
            out.append("_")
        else:
            out.append(char)
    return "".join(out)


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
    stmt = select(*_STUDY_COLUMNS).order_by(s.c.study_uid, s.c.bundle_name, s.c.bundle_version)
    stmt = _by_study_part_label(
        stmt, (s.c.study_uid, s.c.body_part, s.c.label), study=study, part=part, label=label
    )
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    return [_plain(row) for row in rows]
