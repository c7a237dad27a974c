"""The JSON API for scripts: the worklist, a study, and reviewing it. HTTP Basic or a session."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Request, status
from pydantic import BaseModel, ConfigDict, Field

from bonewatch.db.reviews import MAX_COMMENT
from bonewatch.web.auth import ApiUser, Context, api_user
from bonewatch.web.views import (
    checked_uid,
    review_json,
    row_json,
    save_review,
    study_json,
    viewed_study,
    worklist_page,
    worklist_query,
)

router = APIRouter(prefix="/api", dependencies=[Depends(api_user)])
Part = Literal["ELBOW", "FINGER", "FOREARM", "HAND", "HUMERUS", "SHOULDER", "WRIST"]


class ReviewIn(BaseModel):
    """A verdict on the study's result (of ``bundle``/``bundle_version``, else its latest)."""

    model_config = ConfigDict(extra="forbid")

    verdict: Literal["agree", "disagree"]
    label: Literal["positive", "negative"] | None = None
    comment: str | None = Field(None, max_length=MAX_COMMENT)
    part: Part | None = None
    image_id: int | None = Field(None, ge=1)
    bundle: str | None = Field(None, max_length=128)
    bundle_version: str | None = Field(None, max_length=64)


@router.get("/studies")
def list_studies(request: Request, ctx: Context) -> dict[str, Any]:
    """The worklist, with the page's filters as query parameters."""
    query = worklist_query(request, ctx)
    page = worklist_page(ctx, query)
    return {
        "bundle": query.bundle,
        "bundle_version": query.version,
        "total": page.total,
        "page": query.page,
        "per_page": query.per_page,
        "items": [row_json(row) for row in page.rows],
    }


@router.post("/studies/{study_uid:path}/review", status_code=status.HTTP_201_CREATED)
def review_study(
    request: Request,
    ctx: Context,
    user: ApiUser,
    study_uid: str,
    body: Annotated[ReviewIn, Body()],
) -> dict[str, Any]:
    saved = save_review(
        ctx,
        request,
        user,
        checked_uid(study_uid),
        verdict=body.verdict,
        label=body.label,
        part=body.part,
        comment=body.comment,
        image_id=body.image_id,
        bundle_name=body.bundle,
        bundle_version=body.bundle_version,
    )
    return review_json(saved)


@router.get("/studies/{study_uid:path}")
def get_study(request: Request, ctx: Context, user: ApiUser, study_uid: str) -> dict[str, Any]:
    """A study's results, its images (links to their pixels by id) and its reviews."""
    return study_json(viewed_study(ctx, request, user, checked_uid(study_uid)))
