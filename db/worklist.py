"""The review worklist and the study page's data: studies with one bundle version's results,
their images and predictions, and the reviews they have.

A worklist lists every study the ledger has seen (the ``studies`` table), each with the chosen
bundle version's study result where it has one, filtered, sorted and paged in SQL. Filters are
bound parameters, never text in the statement.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Engine,
    Select,
    and_,
    exists,
    false,
    func,
    select,
)

from bonewatch.db._sql import check_choice
from bonewatch.db.records import PREDICTION_OUTCOME_FIELDS, FromAttrs, PredictionOutcome
from bonewatch.db.schema import (
    LABELS,
    STATUSES,
    images,
    predictions,
    reviews,
    studies,
    study_results,
)

SORTS: tuple[str, ...] = ("score", "uncertain", "newest")
# The label filter: the model's label, or no result from the chosen bundle version.
LABEL_FILTERS: tuple[str, ...] = (*LABELS, "unscored")


@dataclass(frozen=True)
class WorklistFilter:
    """What the worklist shows, and in which order.

    ``bundle_name``/``bundle_version``: whose results (None: none, every study unscored).
    ``part``, ``label`` (or ``unscored``), ``min_p``/``max_p`` match that result; ``reviewed``
    whether the study has any review; ``since``/``until`` its last arrival; ``status`` that
    one of its images has that status. ``sort``: ``score`` (highest first), ``uncertain``
    (nearest the threshold first) or ``newest`` (last arrival first).
    """

    bundle_name: str | None = None
    bundle_version: str | None = None
    part: str | None = None
    label: str | None = None
    reviewed: bool | None = None
    min_p: float | None = None
    max_p: float | None = None
    since: datetime | None = None
    until: datetime | None = None
    status: str | None = None
    sort: str = "score"

    def __post_init__(self) -> None:
        check_choice(self.sort, SORTS, "sort")
        if self.label is not None:
            check_choice(self.label, LABEL_FILTERS, "label")
        if self.status is not None:
            check_choice(self.status, STATUSES, "status")
        if (self.bundle_name is None) != (self.bundle_version is None):
            raise ValueError("give both bundle_name and bundle_version, or neither")


@dataclass(frozen=True)
class ReviewSummary:
    """A review as a worklist row shows it."""

    id: int
    reviewer: str
    verdict: str
    label: str
    created_at: datetime


@dataclass(frozen=True)
class WorklistRow:
    """One study on the worklist; the result fields are None when it has no result."""

    study_uid: str
    received_at: datetime | None
    n_received: int
    body_part: str | None
    n_images: int | None
    mean_p_fracture: float | None
    threshold: float | None
    label: str | None
    bundle: str | None
    bundle_version: str | None
    statuses: dict[str, int] = field(default_factory=dict)
    reviews: tuple[ReviewSummary, ...] = ()


@dataclass(frozen=True)
class WorklistPage:
    """One page of the worklist and how many studies the filter matches in all."""

    total: int
    offset: int
    rows: tuple[WorklistRow, ...]


@dataclass(frozen=True)
class BundleVersion:
    """A bundle version that has study results, with how many and when it last wrote one."""

    name: str
    version: str
    n_studies: int
    updated_at: datetime


def bundle_versions(engine: Engine) -> list[BundleVersion]:
    """Every bundle version with study results, the most recently updated first."""
    r = study_results
    stmt = (
        select(
            r.c.bundle_name,
            r.c.bundle_version,
            func.count().label("n"),
            func.max(r.c.updated_at).label("updated_at"),
        )
        .group_by(r.c.bundle_name, r.c.bundle_version)
        .order_by(func.max(r.c.updated_at).desc(), r.c.bundle_name, r.c.bundle_version)
    )
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    out = []
    for row in rows:
        updated = row.updated_at
        if isinstance(updated, str):  # SQLite's MAX() hands back the stored text
            updated = datetime.fromisoformat(updated)
        if updated.tzinfo is None:
            from datetime import UTC

            updated = updated.replace(tzinfo=UTC)
        out.append(BundleVersion(row.bundle_name, row.bundle_version, int(row.n), updated))
    return out


def uncertainty() -> Any:
    """How far a study's score is from its threshold (the "most uncertain" sort, indexed)."""
    return func.abs(study_results.c.mean_p_fracture - study_results.c.threshold)


def _result_filters(f: WorklistFilter) -> list[Any]:
    """The conditions on the study's result row (``study_results``)."""
    r = study_results
    where = [r.c.bundle_name == f.bundle_name, r.c.bundle_version == f.bundle_version]
    if f.part is not None:
        where.append(r.c.body_part == f.part)
    if f.label is not None:
        where.append(r.c.label == f.label)
    if f.min_p is not None:
        where.append(r.c.mean_p_fracture >= f.min_p)
    if f.max_p is not None:
        where.append(r.c.mean_p_fracture <= f.max_p)
    return where


def _study_filters(f: WorklistFilter, uid: Any) -> list[Any]:
    """The conditions on the study's reviews and images, for the UID column ``uid``.

    ``IN`` lets the database start from the few reviewed studies or images of a status and
    look their results up, rather than test every result.
    """
    where = []
    if f.reviewed is True:
        where.append(uid.in_(select(reviews.c.study_uid)))
    elif f.reviewed is False:
        where.append(uid.not_in(select(reviews.c.study_uid)))
    if f.status is not None:
        where.append(
            uid.in_(
                select(images.c.study_uid).where(
                    images.c.status == f.status, images.c.study_uid.is_not(None)
                )
            )
        )
    return where


def _keys(f: WorklistFilter, *, counting: bool = False) -> Select[Any]:
    """The UIDs of the studies ``f`` matches in its order (``counting``: how many), as a
    statement that starts from the table the filter narrows most.

    - By score or uncertainty, with no dates: ``study_results``, read along its index.
    - By arrival, or within dates: ``studies`` along ``last_received_at``, each looked up in
      ``study_results``.
    - ``label="unscored"`` (or no bundle version at all): ``studies`` without a result.
    """
    s, r = studies, study_results
    dated = f.since is not None or f.until is not None
    arrival = []
    if f.since is not None:
        arrival.append(s.c.last_received_at >= f.since)
    if f.until is not None:
        arrival.append(s.c.last_received_at < f.until)
    newest = (s.c.last_received_at.desc(), s.c.study_uid.desc())
    count = (func.count(),)

    if f.bundle_name is None or f.label == "unscored":
        stmt = select(*(count if counting else (s.c.study_uid,))).where(*arrival)
        if f.bundle_name is not None:
            stmt = stmt.where(
                ~exists().where(
                    r.c.study_uid == s.c.study_uid,
                    r.c.bundle_name == f.bundle_name,
                    r.c.bundle_version == f.bundle_version,
                )
            )
        if f.part is not None or f.min_p is not None or f.max_p is not None:
            stmt = stmt.where(false())  # a study without a result has no part or score
        stmt = stmt.where(*_study_filters(f, s.c.study_uid)).select_from(s)
        if counting:
            return stmt
        return stmt.order_by(*(newest if f.sort == "newest" else (s.c.study_uid,)))

    if dated or (f.sort == "newest" and not counting):
        matching = exists().where(r.c.study_uid == s.c.study_uid, *_result_filters(f))
        stmt = (
            select(*(count if counting else (s.c.study_uid,)))
            .select_from(s)
            .where(*arrival, matching, *_study_filters(f, s.c.study_uid))
        )
        if counting:
            return stmt
        if f.sort == "newest":
            return stmt.order_by(*newest)
        key = r.c.mean_p_fracture if f.sort == "score" else uncertainty()
        score = (
            select(key).where(r.c.study_uid == s.c.study_uid, *_result_filters(f)).scalar_subquery()
        )
        if f.sort == "score":
            return stmt.order_by(score.desc(), s.c.study_uid.desc())
        return stmt.order_by(score, s.c.study_uid)

    uid = r.c.study_uid
    stmt = (
        select(*(count if counting else (uid,)))
        .select_from(r)
        .where(*_result_filters(f), *_study_filters(f, uid))
    )
    if counting:
        return stmt
    # Both keys in one direction, so one index scan (forwards or backwards) gives the order.
    if f.sort == "score":
        return stmt.order_by(r.c.mean_p_fracture.desc(), uid.desc())
    return stmt.order_by(uncertainty(), uid)


def count_worklist(engine: Engine, f: WorklistFilter) -> int:
    """How many studies ``f`` matches."""
    with engine.connect() as conn:
        return int(conn.execute(_keys(f, counting=True)).scalar_one())


def query_worklist(
    engine: Engine, f: WorklistFilter, *, offset: int = 0, limit: int = 50, count: bool = True
) -> WorklistPage:
    """One page of the worklist: ``limit`` studies from ``offset`` in the filter's order, each
    with its images' statuses and its reviews; ``total`` is every match (-1 without ``count``).
    """
    if offset < 0 or limit < 1:
        raise ValueError("offset must be >= 0 and limit >= 1")
    s, r = studies, study_results
    with engine.connect() as conn:
        uids = list(conn.scalars(_keys(f).offset(offset).limit(limit)))
        total = int(conn.execute(_keys(f, counting=True)).scalar_one()) if count else -1
        arrivals = {
            row.study_uid: row
            for row in conn.execute(
                select(s.c.study_uid, s.c.last_received_at, s.c.n_received).where(
                    s.c.study_uid.in_(uids)
                )
            )
        }
        found = {}
        if f.bundle_name is not None:
            found = {
                row.study_uid: row
                for row in conn.execute(
                    select(r).where(
                        r.c.study_uid.in_(uids),
                        r.c.bundle_name == f.bundle_name,
                        r.c.bundle_version == f.bundle_version,
                    )
                )
            }
        statuses = _statuses(conn, uids)
        summaries = _review_summaries(conn, uids)
    rows = []
    for uid in uids:
        arrival, result = arrivals.get(uid), found.get(uid)
        rows.append(
            WorklistRow(
                study_uid=uid,
                received_at=arrival.last_received_at if arrival is not None else None,
                n_received=int(arrival.n_received) if arrival is not None else 0,
                body_part=result.body_part if result is not None else None,
                n_images=result.n_images if result is not None else None,
                mean_p_fracture=result.mean_p_fracture if result is not None else None,
                threshold=result.threshold if result is not None else None,
                label=result.label if result is not None else None,
                bundle=result.bundle_name if result is not None else None,
                bundle_version=result.bundle_version if result is not None else None,
                statuses=statuses.get(uid, {}),
                reviews=tuple(summaries.get(uid, ())),
            )
        )
    return WorklistPage(total=total, offset=offset, rows=tuple(rows))


def worklist_window(engine: Engine, f: WorklistFilter, position: int) -> tuple[str | None, ...]:
    """The study UIDs at ``position - 1``, ``position`` and ``position + 1`` of the worklist
    (None past either end): the study page's previous and next."""
    start = max(position - 1, 0)
    with engine.connect() as conn:
        found: list[str | None] = list(
            conn.scalars(_keys(f).offset(start).limit(3 if position > 0 else 2))
        )
    if position == 0:
        found = [None, *found]
    found += [None] * (3 - len(found))
    return tuple(found[:3])


def _statuses(conn: Any, uids: Sequence[str]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = defaultdict(dict)
    if not uids:
        return out
    stmt = (
        select(images.c.study_uid, images.c.status, func.count().label("n"))
        .where(images.c.study_uid.in_(list(uids)))
        .group_by(images.c.study_uid, images.c.status)
    )
    for row in conn.execute(stmt):
        out[row.study_uid][row.status] = int(row.n)
    return out


def _review_summaries(conn: Any, uids: Sequence[str]) -> dict[str, list[ReviewSummary]]:
    out: dict[str, list[ReviewSummary]] = defaultdict(list)
    if not uids:
        return out
    rv = reviews
    stmt = (
        select(rv.c.id, rv.c.study_uid, rv.c.reviewer, rv.c.verdict, rv.c.label, rv.c.created_at)
        .where(rv.c.study_uid.in_(list(uids)))
        .order_by(rv.c.id)
    )
    for row in conn.execute(stmt):
        out[row.study_uid].append(
            ReviewSummary(row.id, row.reviewer, row.verdict, row.label, row.created_at)
        )
    return out


# --- the study page ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyResultView(FromAttrs):
    """One bundle version's result for a study."""

    bundle: str
    bundle_version: str
    body_part: str | None
    n_images: int
    mean_p_fracture: float | None
    threshold: float | None
    label: str | None
    updated_at: datetime


@dataclass(frozen=True, kw_only=True)
class PredictionView(PredictionOutcome):
    """One image's prediction by the chosen bundle version (the stages' outcome, as stored);
    ``prediction_id`` names its heatmap when ``has_heatmap``."""

    prediction_id: int
    bundle: str
    bundle_version: str
    timings: dict[str, Any]  # milliseconds per step, and the engine's name
    has_heatmap: bool


@dataclass(frozen=True)
class ImageView(FromAttrs):
    """One image of a study: its ledger row (no path) and its prediction, if any."""

    id: int
    status: str
    reason: str | None
    error_class: str | None
    format: str | None
    rows: int | None
    columns: int | None
    modality: str | None
    view_position: str | None
    body_part_examined: str | None
    series_uid: str | None
    sop_instance_uid: str | None
    duplicate_of: int | None
    created_at: datetime
    prediction: PredictionView | None


@dataclass(frozen=True)
class ReviewView(FromAttrs):
    """A review in full, as the study page and the API show it."""

    id: int
    study_uid: str
    image_id: int | None
    reviewer: str
    verdict: str
    label: str
    part: str | None
    comment: str | None
    bundle: str
    bundle_version: str
    model_label: str | None
    model_score: float | None
    created_at: datetime


@dataclass(frozen=True)
class StudyDetail:
    """Everything the study page shows; ``result`` is the chosen bundle version's (or None)."""

    study_uid: str
    received_at: datetime | None
    results: tuple[StudyResultView, ...]
    result: StudyResultView | None
    images: tuple[ImageView, ...]
    reviews: tuple[ReviewView, ...]


def review_view(row: Any) -> ReviewView:
    """A ``reviews`` row as a ReviewView."""
    return ReviewView.from_attrs(row, bundle=row.bundle_name)


def study_detail(
    engine: Engine,
    study_uid: str,
    *,
    bundle_name: str | None = None,
    bundle_version: str | None = None,
) -> StudyDetail | None:
    """The study's results, its images with the chosen bundle version's predictions, and its
    reviews, oldest first; None when the ledger knows no such study.

    The chosen version is ``bundle_name``/``bundle_version`` where the study has a result from
    it, else the one that updated its result last.
    """
    r, p = study_results, predictions
    with engine.connect() as conn:
        arrival = conn.execute(
            select(studies.c.last_received_at).where(studies.c.study_uid == study_uid)
        ).first()
        results = tuple(
            StudyResultView.from_attrs(row, bundle=row.bundle_name, n_images=int(row.n_images))
            for row in conn.execute(
                select(r)
                .where(r.c.study_uid == study_uid)
                .order_by(r.c.updated_at.desc(), r.c.bundle_name, r.c.bundle_version)
            )
        )
        chosen = next(
            (x for x in results if (x.bundle, x.bundle_version) == (bundle_name, bundle_version)),
            results[0] if results else None,
        )
        on = p.c.image_id == images.c.id
        if chosen is not None:
            on = and_(
                on, p.c.bundle_name == chosen.bundle, p.c.bundle_version == chosen.bundle_version
            )
        else:
            on = and_(on, false())
        image_rows = conn.execute(
            select(
                images.c.id,
                images.c.status,
                images.c.reason,
                images.c.error_class,
                images.c.format,
                images.c.rows,
                images.c.columns,
                images.c.modality,
                images.c.view_position,
                images.c.body_part_examined,
                images.c.series_uid,
                images.c.sop_instance_uid,
                images.c.duplicate_of,
                images.c.created_at,
                p.c.id.label("prediction_id"),
                p.c.bundle_name,
                p.c.bundle_version,
                # labelled: body_part_examined is an images column too
                *(p.c[name].label(f"p_{name}") for name in PREDICTION_OUTCOME_FIELDS),
                p.c.timings,
                p.c.heatmap_path,
            )
            .select_from(images.outerjoin(p, on))
            .where(images.c.study_uid == study_uid)
            .order_by(images.c.id)
        ).all()
        review_rows = conn.execute(
            select(reviews).where(reviews.c.study_uid == study_uid).order_by(reviews.c.id)
        ).all()
    if arrival is None and not image_rows and not results:
        return None
    return StudyDetail(
        study_uid=study_uid,
        received_at=arrival.last_received_at if arrival is not None else None,
        results=results,
        result=chosen,
        images=tuple(_image_view(row) for row in image_rows),
        reviews=tuple(review_view(row) for row in review_rows),
    )


def _image_view(row: Any) -> ImageView:
    prediction = None
    if row.prediction_id is not None:
        outcome = {name: row._mapping[f"p_{name}"] for name in PREDICTION_OUTCOME_FIELDS}
        prediction = PredictionView(
            **{
                **outcome,
                "body_part_probs": dict(outcome["body_part_probs"] or {}),
                "body_part_disagrees": bool(outcome["body_part_disagrees"]),
            },
            prediction_id=int(row.prediction_id),
            bundle=row.bundle_name,
            bundle_version=row.bundle_version,
            timings=dict(row.timings or {}),
            has_heatmap=bool(row.heatmap_path),
        )
    return ImageView.from_attrs(row, id=int(row.id), prediction=prediction)


# --- the files behind the image routes ---------------------------------------------------------


@dataclass(frozen=True)
class ImageSource:
    """Where an image's original file is, as the ledger stored it, and its registered digest."""

    image_id: int
    path: str
    sha256: str | None
    status: str


def image_source(engine: Engine, image_id: int) -> ImageSource | None:
    """The stored path and digest of image ``image_id``, or None."""
    with engine.connect() as conn:
        row = conn.execute(
            select(images.c.id, images.c.path, images.c.sha256, images.c.status).where(
                images.c.id == image_id
            )
        ).first()
    return None if row is None else ImageSource(int(row.id), row.path, row.sha256, row.status)


def heatmap_source(engine: Engine, prediction_id: int) -> tuple[int, str] | None:
    """``(image_id, heatmap_path)`` of prediction ``prediction_id``, or None without one."""
    with engine.connect() as conn:
        row = conn.execute(
            select(predictions.c.image_id, predictions.c.heatmap_path).where(
                predictions.c.id == prediction_id
            )
        ).first()
    if row is None or not row.heatmap_path:
        return None
    return int(row.image_id), str(row.heatmap_path)
