"""The worklist: every study with the chosen bundle version's result, filtered and sorted."""

from __future__ import annotations

import math

from fastapi import APIRouter, Depends, Request, status
from fastapi.responses import RedirectResponse, Response

from bonewatch.db.reviews import PARTS
from bonewatch.db.schema import STATUSES
from bonewatch.db.worklist import LABEL_FILTERS, SORTS
from bonewatch.web.auth import Context, CurrentUser, current_user
from bonewatch.web.filters import PER_PAGE
from bonewatch.web.views import worklist_page, worklist_query

router = APIRouter(dependencies=[Depends(current_user)])

SORT_NAMES = {
    "score": "highest score first",
    "uncertain": "most uncertain first",
    "newest": "newest first",
}


@router.get("/")
def home() -> Response:
    return RedirectResponse("/studies", status.HTTP_303_SEE_OTHER)


@router.get("/studies")
def worklist(request: Request, ctx: Context, user: CurrentUser) -> Response:
    query = worklist_query(request, ctx)
    page = worklist_page(ctx, query)
    return ctx.templates.TemplateResponse(
        request,
        "worklist.html",
        {
            "user": user,
            "query": query,
            "page": page,
            "pages": max(1, math.ceil(page.total / query.per_page)),
            "bundles": ctx.bundles(),
            "parts": PARTS,
            "labels": LABEL_FILTERS,
            "statuses": STATUSES,
            "sorts": [(s, SORT_NAMES[s]) for s in SORTS],
            "per_page_choices": PER_PAGE,
        },
    )
