"""The model against its reviewers: the stats page and its ROC plot."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import Response

from bonewatch.db.reviews import ReviewedStudy, latest_reviews
from bonewatch.web.auth import Context, CurrentUser, current_user
from bonewatch.web.context import AppContext
from bonewatch.web.filters import BadQuery, text_param
from bonewatch.web.stats import METRICS, review_stats, roc_png

router = APIRouter(dependencies=[Depends(current_user)])


def _reviewed(
    request: Request, ctx: AppContext
) -> tuple[str | None, str | None, list[ReviewedStudy]]:
    """The reviews the page measures: of the bundle version asked for, else of the one reviewed
    last; ``bundle=all`` takes every version's."""
    try:
        name = text_param(request.query_params, "bundle")
        version = text_param(request.query_params, "version")
    except BadQuery as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    if name == "all":
        return None, None, latest_reviews(ctx.engine)
    if name is None or version is None:
        everything = latest_reviews(ctx.engine)
        if not everything:
            return None, None, []
        newest = max(everything, key=lambda r: r.reviewed_at)
        name, version = newest.bundle_name, newest.bundle_version
    return name, version, latest_reviews(ctx.engine, bundle_name=name, bundle_version=version)


@router.get("/stats")
def stats_page(request: Request, ctx: Context, user: CurrentUser) -> Response:
    name, version, reviewed = _reviewed(request, ctx)
    versions = sorted({(r.bundle_name, r.bundle_version) for r in latest_reviews(ctx.engine)})
    return ctx.templates.TemplateResponse(
        request,
        "stats.html",
        {
            "user": user,
            "bundle": name,
            "version": version,
            "versions": versions,
            "stats": review_stats(reviewed),
            "metrics": METRICS,
            "roc_query": request.url.query,
        },
    )


@router.get("/stats/roc.png")
def roc_plot(request: Request, ctx: Context) -> Response:
    name, version, reviewed = _reviewed(request, ctx)
    title = f"{name} {version}: study scores against the reviewers" if name else ""
    return Response(
        roc_png(reviewed, title=title),
        media_type="image/png",
        headers={"Cache-Control": "private, no-store"},
    )
