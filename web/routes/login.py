"""Logging in and out, and the health check: the only routes open without a login."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request, status
from fastapi.responses import JSONResponse, RedirectResponse, Response

from bonewatch.db.audit import record_audit_event
from bonewatch.db.monitoring import ping
from bonewatch.web.auth import (
    Context,
    TooManyAttempts,
    authenticate,
    check_csrf,
    client_address,
    current_user,
    session_user,
)
from bonewatch.web.sessions import new_token, tokens_match

router = APIRouter()
HOME = "/studies"


def safe_next(target: str | None) -> str:
    """``target`` if it is a path on this site, else the worklist: never a redirect away."""
    if (
        not target
        or len(target) > 2000
        or not target.startswith("/")
        or target.startswith(("//", "/\\"))
        or any(c in target for c in "\\\r\n\t")
        or target.startswith("/login")
    ):
        return HOME
    return target


def _login_page(
    request: Request, ctx: Context, *, next_path: str, error: str | None, code: int
) -> Response:
    token = new_token()
    response = ctx.templates.TemplateResponse(
        request,
        "login.html",
        {"next_path": next_path, "csrf_token": token, "error": error},
        status_code=code,
    )
    ctx.signer.issue_login_token(response, request, token)
    return response


@router.get("/login")
def login_form(request: Request, ctx: Context, next: str | None = None) -> Response:
    if session_user(request) is not None:
        return RedirectResponse(safe_next(next), status.HTTP_303_SEE_OTHER)
    return _login_page(request, ctx, next_path=safe_next(next), error=None, code=200)


@router.post("/login")
def login(
    request: Request,
    ctx: Context,
    username: Annotated[str, Form(max_length=256)] = "",
    password: Annotated[str, Form(max_length=1024)] = "",
    csrf_token: Annotated[str, Form(max_length=256)] = "",
    next: Annotated[str, Form(max_length=2000)] = HOME,
) -> Response:
    next_path = safe_next(next)
    if not tokens_match(ctx.signer.login_token(request), csrf_token):
        return _login_page(
            request,
            ctx,
            next_path=next_path,
            error="The login form expired or did not come from this site; try again.",
            code=status.HTTP_403_FORBIDDEN,
        )
    client = client_address(request)
    try:
        user = authenticate(ctx, username, password, client)
    except TooManyAttempts as exc:
        response = _login_page(
            request, ctx, next_path=next_path, error=str(exc).capitalize() + ".", code=429
        )
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    if user is None:
        return _login_page(
            request,
            ctx,
            next_path=next_path,
            error="Wrong user name or password.",
            code=status.HTTP_401_UNAUTHORIZED,
        )
    record_audit_event(ctx.engine, "login", user_id=user.id, username=user.username, client=client)
    response = RedirectResponse(next_path, status.HTTP_303_SEE_OTHER)
    ctx.signer.start_session(response, request, user.id, user.password_hash)
    return response


@router.post("/logout")
def logout(
    request: Request, ctx: Context, csrf_token: Annotated[str, Form(max_length=256)] = ""
) -> Response:
    user = current_user(request)
    check_csrf(user, csrf_token)
    record_audit_event(
        ctx.engine,
        "logout",
        user_id=user.id,
        username=user.username,
        client=client_address(request),
    )
    response = RedirectResponse("/login", status.HTTP_303_SEE_OTHER)
    ctx.signer.end_session(response)
    return response


@router.get("/healthz")
def healthz(ctx: Context) -> Response:
    """200 while the ledger answers, 503 otherwise; says nothing else."""
    try:
        ping(ctx.engine)
    except Exception:
        return JSONResponse({"status": "unavailable"}, status.HTTP_503_SERVICE_UNAVAILABLE)
    return JSONResponse({"status": "ok"})
