"""``/metrics`` for Prometheus: a bearer token (``BONEWATCH_METRICS_TOKEN``) or an admin."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import Response

from bonewatch.web.auth import api_user
from bonewatch.web.context import app_context
from bonewatch.web.metrics import CONTENT_TYPE, render_metrics
from bonewatch.web.sessions import tokens_match


def metrics_access(request: Request) -> None:
    """Let the scraper in with the configured token, else an admin account."""
    token = app_context(request).config.metrics_token
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if token and scheme.lower() == "bearer":
        if tokens_match(token, given.strip()):
            return
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "wrong metrics token")
    user = api_user(request)
    if not user.is_admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "metrics are for admins or the token")


router = APIRouter(dependencies=[Depends(metrics_access)])


@router.get("/metrics")
def metrics(request: Request) -> Response:
    data = render_metrics(app_context(request).metrics)
    return Response(data, media_type=CONTENT_TYPE, headers={"Cache-Control": "no-store"})
