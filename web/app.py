"""The review app: ``create_app`` wires the routers, the security headers and the error pages.

Every route needs a login except ``/login`` and ``/healthz``; each router declares its
authentication once (:mod:`bonewatch.web.auth`). There are no OpenAPI or docs routes.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from urllib.parse import quote

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from sqlalchemy import Engine
from starlette.exceptions import HTTPException as StarletteHTTPException

from bonewatch.db.engine import make_engine
from bonewatch.web.auth import LoginRequired
from bonewatch.web.config import WebConfig
from bonewatch.web.context import AppContext, make_templates
from bonewatch.web.metrics import metrics_registry
from bonewatch.web.ratelimit import LoginLimiter
from bonewatch.web.routes import api, audit, images, login, metrics, static, stats, study, worklist
from bonewatch.web.sessions import CookieSigner

# Answers in JSON (scripts, scrapers, image tags); everything else is a page.
MACHINE_PREFIXES = ("/api/", "/metrics", "/images/", "/heatmaps/", "/healthz", "/stats/roc.png")


def _security_headers(response: Response, nonce: str) -> None:
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; script-src 'self'; "
        f"style-src 'self' 'nonce-{nonce}'; img-src 'self' data:; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cross-Origin-Opener-Policy"] = "same-origin"
    response.headers["Cross-Origin-Resource-Policy"] = "same-origin"
    response.headers.setdefault("Cache-Control", "no-store")


def create_app(
    config: WebConfig,
    *,
    engine: Engine | None = None,
    queue_depths: Callable[[], dict[str, int]] | None = None,
) -> FastAPI:
    """The app for ``config``; ``engine`` (else one made from the URL) is the ledger, and
    ``queue_depths`` (the broker's, in distributed mode) feeds ``/metrics``."""
    engine = engine or make_engine(config.database_url)
    app = FastAPI(
        title="bonewatch review",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        swagger_ui_oauth2_redirect_url=None,
    )
    app.state.ctx = AppContext(
        config=config,
        engine=engine,
        templates=make_templates(),
        signer=CookieSigner(
            config.session_secret, config.session_seconds, always_secure=config.secure_cookies
        ),
        limiter=LoginLimiter(config.login_attempts, config.login_lockout_seconds),
        metrics=metrics_registry(engine, queue_depths),
        queue_depths=queue_depths,
    )

    @app.middleware("http")
    async def security_headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        request.state.csp_nonce = secrets.token_urlsafe(16)
        response = await call_next(request)
        _security_headers(response, request.state.csp_nonce)
        return response

    def _machine(request: Request) -> bool:
        return request.url.path.startswith(MACHINE_PREFIXES)

    def _page_error(request: Request, code: int, detail: str) -> Response:
        return app.state.ctx.templates.TemplateResponse(
            request,
            "error.html",
            {"user": getattr(request.state, "user", None), "code": code, "detail": detail},
            status_code=code,
        )

    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, exc: LoginRequired) -> Response:
        if _machine(request):
            return JSONResponse(
                {"detail": "log in first"},
                status.HTTP_401_UNAUTHORIZED,
                headers={"WWW-Authenticate": 'Basic realm="bonewatch", charset="UTF-8"'},
            )
        target = (
            "/login"
            if exc.next_path in ("/", "/studies")
            else (f"/login?next={quote(exc.next_path, safe='')}")
        )
        return RedirectResponse(target, status.HTTP_303_SEE_OTHER)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if _machine(request):
            return JSONResponse(
                {"detail": exc.detail}, exc.status_code, headers=getattr(exc, "headers", None)
            )
        return _page_error(request, exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: {e.get('msg')}"
            for e in exc.errors()
        )
        if _machine(request):
            return JSONResponse({"detail": problems}, status.HTTP_422_UNPROCESSABLE_CONTENT)
        return _page_error(request, status.HTTP_422_UNPROCESSABLE_CONTENT, problems)

    for module in (login, worklist, study, images, stats, api, metrics, audit, static):
        app.include_router(module.router)
    return app


__all__ = ["create_app"]
