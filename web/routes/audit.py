"""The audit trail, for admins: who logged in, viewed and reviewed which study."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import Response

from bonewatch.db.audit import ACTIONS, query_audit
from bonewatch.web.auth import AdminUser, Context, admin_user
from bonewatch.web.filters import BadQuery, text_param

router = APIRouter(dependencies=[Depends(admin_user)])


@router.get("/audit")
def audit_page(request: Request, ctx: Context, user: AdminUser) -> Response:
    try:
        study = text_param(request.query_params, "study")
        username = text_param(request.query_params, "user")
        action = text_param(request.query_params, "action")
    except BadQuery as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    if action is not None and action not in ACTIONS:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "no such action")
    events = query_audit(ctx.engine, study_uid=study, username=username, action=action)
    return ctx.templates.TemplateResponse(
        request,
        "audit.html",
        {
            "user": user,
            "events": events,
            "actions": ACTIONS,
            "study": study,
            "username": username,
            "action": action,
        },
    )
