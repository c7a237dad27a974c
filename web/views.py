"""What the pages and the API share: reading a worklist request, and the JSON shapes."""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from datetime import date, datetime
from typing import Any

from fastapi import HTTPException, Request, status

from bonewatch.db.audit import record_audit_event
from bonewatch.db.reviews import NewReview, NoResultError, record_review
from bonewatch.db.worklist import (
    ImageView,
    ReviewView,
    StudyDetail,
    WorklistPage,
    WorklistRow,
    query_worklist,
    study_detail,
)
from bonewatch.web.auth import WebUser, client_address
from bonewatch.web.context import AppContext
from bonewatch.web.filters import BadQuery, WorklistQuery

MAX_UID = 128


def checked_uid(study_uid: str) -> str:
    """A study UID from a path, if it can be one (else 404: no study has it)."""
    if not study_uid or len(study_uid) > MAX_UID or not study_uid.isprintable():
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such study")
    return study_uid


def viewed_study(
    ctx: AppContext,
    request: Request,
    user: WebUser,
    study_uid: str,
    *,
    bundle_name: str | None = None,
    bundle_version: str | None = None,
) -> StudyDetail:
    """A study's page data, with the view recorded in the audit trail.

    Raises:
        HTTPException: 404 when the ledger knows no such study.
    """
    detail = study_detail(
        ctx.engine, study_uid, bundle_name=bundle_name, bundle_version=bundle_version
    )
    if detail is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such study")
    record_audit_event(
        ctx.engine,
        "view_study",
        user_id=user.id,
        username=user.username,
        study_uid=study_uid,
        client=client_address(request),
    )
    return detail


def save_review(
    ctx: AppContext,
    request: Request,
    user: WebUser,
    study_uid: str,
    *,
    verdict: str,
    bundle_name: str | None = None,
    bundle_version: str | None = None,
    label: str | None = None,
    part: str | None = None,
    comment: str | None = None,
    image_id: int | None = None,
) -> ReviewView:
    """Record ``user``'s verdict on a study's result (with the client's address in the audit
    trail): the result of ``bundle_name``/``bundle_version``, or where either is None, the
    study's latest.

    Raises:
        HTTPException: 404 when the ledger knows no such study (looked up for its latest
            result), 409 when the study has no such result to review, 422 for a value the
            ledger refuses (a verdict, label or part out of its choices, a label against the
            verdict).
    """
    if bundle_name is None or bundle_version is None:
        detail = study_detail(ctx.engine, study_uid)
        if detail is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such study")
        if detail.result is None:
            raise HTTPException(status.HTTP_409_CONFLICT, "the study has no result to review")
        bundle_name, bundle_version = detail.result.bundle, detail.result.bundle_version
    review = NewReview(
        study_uid=study_uid,
        reviewer=user.username,
        user_id=user.id,
        verdict=verdict,
        label=label,
        part=part,
        comment=comment,
        image_id=image_id,
        bundle_name=bundle_name,
        bundle_version=bundle_version,
    )
    try:
        return record_review(ctx.engine, review, client=client_address(request))
    except NoResultError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None


def worklist_query(request: Request, ctx: AppContext) -> WorklistQuery:
    """The request's worklist parameters with the bundle version resolved.

    Raises:
        HTTPException: 422 naming the parameter that is out of range.
    """
    try:
        return WorklistQuery.parse(request.query_params).resolve_bundle(ctx.bundles())
    except BadQuery as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None


def worklist_page(ctx: AppContext, query: WorklistQuery) -> WorklistPage:
    return query_worklist(ctx.engine, query.to_filter(), offset=query.offset, limit=query.per_page)


def plain(value: Any) -> Any:
    """A value as JSON: dataclasses as objects, datetimes and dates as ISO 8601 strings."""
    if is_dataclass(value) and not isinstance(value, type):
        return {k: plain(v) for k, v in asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


def row_json(row: WorklistRow) -> dict[str, Any]:
    """A worklist row as the API lists it."""
    return {
        "study_uid": row.study_uid,
        "body_part": row.body_part,
        "n_images": row.n_images,
        "n_received": row.n_received,
        "mean_p_fracture": row.mean_p_fracture,
        "threshold": row.threshold,
        "label": row.label,
        "bundle": row.bundle,
        "bundle_version": row.bundle_version,
        "received_at": row.received_at.isoformat() if row.received_at else None,
        "statuses": row.statuses,
        "reviews": [plain(r) for r in row.reviews],
    }


def image_json(image: ImageView) -> dict[str, Any]:
    """An image as the API shows it: no file path, and its pixels as links by ledger id."""
    data = plain(image)
    data["image_url"] = f"/images/{image.id}.png"
    data["heatmap_url"] = (
        f"/heatmaps/{image.prediction.prediction_id}.png"
        if image.prediction is not None and image.prediction.has_heatmap
        else None
    )
    return data


def review_json(review: ReviewView) -> dict[str, Any]:
    return plain(review)  # type: ignore[no-any-return]


def study_json(detail: StudyDetail) -> dict[str, Any]:
    return {
        "study_uid": detail.study_uid,
        "received_at": detail.received_at.isoformat() if detail.received_at else None,
        "result": plain(detail.result),
        "results": plain(detail.results),
        "images": [image_json(i) for i in detail.images],
        "reviews": [review_json(r) for r in detail.reviews],
    }
