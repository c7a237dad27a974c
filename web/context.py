"""What every request handler reaches through ``request.app.state``: one object per app."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from fastapi import Request
from fastapi.templating import Jinja2Templates
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine

from bonewatch.db.worklist import BundleVersion, bundle_versions
from bonewatch.web.config import WebConfig
from bonewatch.web.imaging import RenderCache
from bonewatch.web.ratelimit import LoginLimiter
from bonewatch.web.sessions import CookieSigner

PACKAGE_DIR = Path(__file__).resolve().parent
# How long the list of bundle versions is reused (it is a GROUP BY over every study result).
BUNDLES_TTL_SECONDS = 10.0


def make_templates() -> Jinja2Templates:
    """The page templates, every value HTML-escaped unless a template says otherwise (none do
    for anything a user typed)."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(PACKAGE_DIR / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return Jinja2Templates(env=env)


@dataclass
class AppContext:
    config: WebConfig
    engine: Engine
    templates: Jinja2Templates
    signer: CookieSigner
    limiter: LoginLimiter
    metrics: CollectorRegistry
    renders: RenderCache = field(default_factory=RenderCache)
    queue_depths: Callable[[], dict[str, int]] | None = None
    _bundles: tuple[float, list[BundleVersion]] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def bundles(self) -> list[BundleVersion]:
        """The bundle versions with results, newest first (reused for a few seconds)."""
        now = time.monotonic()
        with self._lock:
            if self._bundles is not None and now - self._bundles[0] < BUNDLES_TTL_SECONDS:
                return self._bundles[1]
        found = bundle_versions(self.engine)
        with self._lock:
            self._bundles = (now, found)
        return found


def app_context(request: Request) -> AppContext:
    ctx: Any = request.app.state.ctx
    return ctx  # type: ignore[no-any-return]
