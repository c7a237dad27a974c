"""A study's page (its images, the numbers, its reviews) and the review form's POST."""

from __future__ import annotations

from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from bonewatch.db.reviews import PARTS
from bonewatch.db.worklist import worklist_window
from bonewatch.web.auth import Context, CurrentUser, WebUser, check_csrf, current_user
from bonewatch.web.context import AppContext
from bonewatch.web.filters import BadQuery, WorklistQuery
from bonewatch.web.views import checked_uid, save_review, viewed_study

router = APIRouter(dependencies=[Depends(current_user)])
MAX_POSITION = 10_000_000


def _position(text: str | None) -> int | None:
    if text is None or text == "":
        return None
    if not text.isdigit() or int(text) > MAX_POSITION:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "pos must be a whole number")
    return int(text)


def study_link(uid: str | None, query: WorklistQuery, position: int | None) -> str | None:
    """The study page of ``uid`` on the worklist ``query`` at ``position``."""
    if uid is None:
        return None
    params = query.params(page=None)
    if position is not None:
        params["pos"] = str(position)
    encoded = urlencode(params)
    return f"/studies/{quote(uid, safe='/')}" + (f"?{encoded}" if encoded else "")


def _neighbours(
    ctx: AppContext, query: WorklistQuery, uid: str, position: int
) -> tuple[str | None, str | None]:
    """The study pages before and after ``uid`` at ``position`` on the worklist ``query``; where
    the list has moved (a filter no longer matches this study), those around the same place."""
    window = worklist_window(ctx.engine, query.resolve_bundle(ctx.bundles()).to_filter(), position)
    if window[1] == uid:
        return study_link(window[0], query, position - 1), study_link(
            window[2], query, position + 1
        )
    return study_link(window[0], query, max(position - 1, 0)), study_link(
        window[1], query, position
    )


def _query(params: dict[str, str]) -> WorklistQuery:
    try:
        return WorklistQuery.parse(params)
    except BadQuery as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None


@router.get("/studies/{study_uid:path}")
def study_page(request: Request, ctx: Context, user: CurrentUser, study_uid: str) -> Response:
    uid = checked_uid(study_uid)
    query = _query(dict(request.query_params))
    position = _position(request.query_params.get("pos"))
    detail = viewed_study(
        ctx, request, user, uid, bundle_name=query.bundle, bundle_version=query.version
    )
    saved = request.query_params.get("saved", "")
    previous = following = None
    if position is not None:
        previous, following = _neighbours(ctx, query, uid, position)
    return ctx.templates.TemplateResponse(
        request,
        "study.html",
        {
            "user": user,
            "detail": detail,
            "query": query,
            "position": position,
            "previous": previous,
            "following": following,
            "back": "/studies" + query.query_string(),
            "parts": PARTS,
            "saved": saved if saved.isdigit() else None,
        },
    )


@router.post("/review")
async def review(request: Request, ctx: Context, user: CurrentUser) -> Response:
    form = await request.form()
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    return await run_in_threadpool(_review, request, ctx, user, fields)


def _review(request: Request, ctx: AppContext, user: WebUser, fields: dict[str, str]) -> Response:
    """Save the form's verdict, then on to the next study of the same list."""
    check_csrf(user, fields.get("csrf_token"))
    uid = checked_uid(fields.get("study_uid", ""))
    query = _query({k: v for k, v in fields.items() if k not in ("page",)})
    position = _position(fields.get("pos"))
    saved = save_review(
        ctx,
        request,
        user,
        uid,
        verdict=fields.get("verdict", ""),
        label=fields.get("label") or None,
        part=fields.get("part") or None,
        comment=fields.get("comment") or None,
        # the result the page showed; a form without one is refused, not given the latest
        bundle_name=fields.get("result_bundle", ""),
        bundle_version=fields.get("result_version", ""),
    )
    following = None
    if position is not None:  # on to the next study of the same list
        _, following = _neighbours(ctx, query, uid, position)
    target = following or study_link(uid, query, position)
    separator = "&" if "?" in (target or "") else "?"
    return RedirectResponse(
        f"{target}{separator}saved={saved.id}", status_code=status.HTTP_303_SEE_OTHER
    )
