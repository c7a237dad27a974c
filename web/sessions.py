"""Signed session cookies and CSRF tokens.

A session cookie holds the account id, a fingerprint of its password hash (a new password ends
every session of the account) and the session's CSRF token, signed with itsdangerous and
stamped with its issue time: it expires ``session_seconds`` after login. The login form gets its
own short-lived signed cookie carrying the CSRF token the form must echo. Cookies are HttpOnly,
SameSite=Lax, and Secure over https.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.requests import Request
from starlette.responses import Response

SESSION_COOKIE = "bonewatch_session"
LOGIN_COOKIE = "bonewatch_login"
LOGIN_FORM_SECONDS = 3600
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"


@dataclass(frozen=True)
class SessionData:
    """What a valid session cookie says."""

    user_id: int
    password_fingerprint: str
    csrf: str


def password_fingerprint(password_hash: str) -> str:
    """A short digest of an account's password hash, to tie sessions to the password."""
    return hashlib.sha256(password_hash.encode()).hexdigest()[:16]


def new_token() -> str:
    """A fresh random CSRF token."""
    return secrets.token_urlsafe(32)


def tokens_match(expected: str | None, given: str | None) -> bool:
    """Constant-time comparison of two CSRF tokens; False when either is missing."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


class CookieSigner:
    """Signs and reads the app's two cookies with one secret."""

    def __init__(self, secret: str, session_seconds: float, *, always_secure: bool) -> None:
        self._session = URLSafeTimedSerializer(secret, salt="bonewatch.session")
        self._login = URLSafeTimedSerializer(secret, salt="bonewatch.login-form")
        self.session_seconds = session_seconds
        self.always_secure = always_secure

    def _secure(self, request: Request) -> bool:
        return self.always_secure or request.url.scheme == "https"

    def _set(self, response: Response, request: Request, name: str, value: str, age: int) -> None:
        response.set_cookie(
            name,
            value,
            max_age=age,
            path="/",
            httponly=True,
            samesite="lax",
            secure=self._secure(request),
        )

    def read_session(self, request: Request) -> SessionData | None:
        raw = request.cookies.get(SESSION_COOKIE)
        if not raw:
            return None
        try:
            data: Any = self._session.loads(raw, max_age=int(self.session_seconds))
            return SessionData(int(data["u"]), str(data["p"]), str(data["c"]))
        except (BadSignature, KeyError, TypeError, ValueError):
            return None

    def start_session(
        self, response: Response, request: Request, user_id: int, password_hash: str
    ) -> None:
        value = self._session.dumps(
            {"u": user_id, "p": password_fingerprint(password_hash), "c": new_token()}
        )
        self._set(response, request, SESSION_COOKIE, value, int(self.session_seconds))
        response.delete_cookie(LOGIN_COOKIE, path="/")

    def end_session(self, response: Response) -> None:
        response.delete_cookie(SESSION_COOKIE, path="/")

    def login_token(self, request: Request) -> str | None:
        """The CSRF token of the login form this browser was given, if still valid."""
        raw = request.cookies.get(LOGIN_COOKIE)
        if not raw:
            return None
        try:
            data: Any = self._login.loads(raw, max_age=LOGIN_FORM_SECONDS)
            return str(data["c"])
        except (BadSignature, KeyError, TypeError, ValueError):
            return None

    def issue_login_token(self, response: Response, request: Request, token: str) -> None:
        self._set(response, request, LOGIN_COOKIE, self._login.dumps({"c": token}), 3600)
