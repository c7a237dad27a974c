"""Who is asking: the login check, and the dependencies each router declares once.

Pages take a session cookie (:func:`current_user`); without one they lead to ``/login``. The
API also takes HTTP Basic credentials (:func:`api_user`), checked and rate-limited like the
login form. A state-changing request on a session carries its CSRF token: a form field on the
pages, the ``X-CSRF-Token`` header on the API.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

from bonewatch.db.audit import record_audit_event
from bonewatch.db.users import UserRecord, get_user
from bonewatch.web.context import AppContext, app_context
from bonewatch.web.passwords import verify_password
from bonewatch.web.sessions import CSRF_HEADER, password_fingerprint, tokens_match

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
MAX_USERNAME = 64


@dataclass(frozen=True)
class WebUser:
    """The account behind a request; ``csrf`` is its session's token (None on Basic auth)."""

    id: int
    username: str
    role: str
    csrf: str | None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class LoginRequired(Exception):
    """A page was asked for without a session; the app answers with the login page."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


class TooManyAttempts(Exception):
    """Logins for this account or address are paused after wrong passwords."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"too many wrong passwords; try again in {math.ceil(retry_after)} s")
        self.retry_after = math.ceil(retry_after)


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def authenticate(ctx: AppContext, username: str, password: str, client: str) -> UserRecord | None:
    """The account if ``password`` is its password, else None; every failure is counted and
    audited.

    Raises:
        TooManyAttempts: the account or the address has too many recent failures; the password
            was not checked.
    """
    username = username.strip()[:MAX_USERNAME]
    keys = [f"user:{username.lower()}", f"addr:{client}"]
    wait = ctx.limiter.retry_after(keys)
    if wait > 0:
        raise TooManyAttempts(wait)
    user = get_user(ctx.engine, username=username) if username else None
    if not verify_password(user.password_hash if user else None, password) or user is None:
        ctx.limiter.failed(keys)
        record_audit_event(
            ctx.engine,
            "login_failed",
            user_id=user.id if user else None,
            username=username or None,
            client=client,
        )
        return None
    ctx.limiter.succeeded(keys[0])
    return user


def session_user(request: Request) -> WebUser | None:
    """The account of the request's session cookie, if the cookie is valid, unexpired and its
    account still has the password it was issued under."""
    ctx = app_context(request)
    session = ctx.signer.read_session(request)
    if session is None:
        return None
    user = get_user(ctx.engine, user_id=session.user_id)
    if user is None or password_fingerprint(user.password_hash) != session.password_fingerprint:
        return None
    return WebUser(user.id, user.username, user.role, session.csrf)


def _next_path(request: Request) -> str:
    path = request.url.path
    return f"{path}?{request.url.query}" if request.url.query else path


def current_user(request: Request) -> WebUser:
    """Dependency of every page: the logged-in account, or the login page."""
    user = session_user(request)
    if user is None:
        raise LoginRequired(_next_path(request) if request.method in SAFE_METHODS else "/")
    request.state.user = user
    return user


def admin_user(user: Annotated[WebUser, Depends(current_user)]) -> WebUser:
    """Dependency of the admin pages."""
    if not user.is_admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this page is for admins")
    return user


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED,
        detail,
        headers={"WWW-Authenticate": 'Basic realm="bonewatch", charset="UTF-8"'},
    )


def basic_credentials(request: Request) -> tuple[str, str] | None:
    """``(username, password)`` of an ``Authorization: Basic`` header, or None without one.

    Raises:
        HTTPException: 401 for a malformed header.
    """
    header = request.headers.get("authorization", "")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise _unauthorized("malformed Basic credentials") from None
    username, colon, password = decoded.partition(":")
    if not colon:
        raise _unauthorized("malformed Basic credentials")
    return username, password


def basic_user(request: Request) -> WebUser | None:
    """The account of the request's Basic credentials; None when it has none.

    Raises:
        HTTPException: 401 for wrong credentials, 429 while they are rate-limited.
    """
    credentials = basic_credentials(request)
    if credentials is None:
        return None
    ctx = app_context(request)
    try:
        user = authenticate(ctx, *credentials, client_address(request))
    except TooManyAttempts as exc:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            str(exc),
            headers={"Retry-After": str(exc.retry_after)},
        ) from None
    if user is None:
        raise _unauthorized("wrong user name or password")
    return WebUser(user.id, user.username, user.role, None)


def api_user(request: Request) -> WebUser:
    """Dependency of the API: Basic credentials, else a session (whose state-changing requests
    must carry the ``X-CSRF-Token`` header)."""
    user = basic_user(request)
    if user is None:
        user = session_user(request)
        if user is None:
            raise _unauthorized("log in, or send HTTP Basic credentials")
        if request.method not in SAFE_METHODS and not tokens_match(
            user.csrf, request.headers.get(CSRF_HEADER)
        ):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "missing or wrong X-CSRF-Token")
    request.state.user = user
    return user


def check_csrf(user: WebUser, token: str | None) -> None:
    """Refuse a page's form unless it carries its session's CSRF token."""
    if not tokens_match(user.csrf, token):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "missing or wrong CSRF token; reload")


CurrentUser = Annotated[WebUser, Depends(current_user)]
ApiUser = Annotated[WebUser, Depends(api_user)]
AdminUser = Annotated[WebUser, Depends(admin_user)]
Context = Annotated[AppContext, Depends(app_context)]
