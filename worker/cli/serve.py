"""The review web app: ``serve``."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any

import typer

from bonewatch.worker.cli._common import err, fail, settings_from
from bonewatch.worker.settings import Settings, _data_dir_salt

SESSION_KEY_FILE = "session-key"


def is_loopback(host: str) -> bool:
    """Whether ``host`` is an address only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def session_secret(settings: Settings) -> str:
    """The configured session key, else a random one created once in the data directory (so
    logins survive a restart), readable by its owner only."""
    if settings.session_secret:
        return settings.session_secret
    return _data_dir_salt(settings.data_dir / SESSION_KEY_FILE)


def web_config(settings: Settings) -> Any:
    """The app's configuration from the settings."""
    from bonewatch.web import WebConfig

    return WebConfig(
        database_url=settings.resolved_database_url,
        session_secret=session_secret(settings),
        heatmap_dir=settings.resolved_heatmap_dir.absolute(),
        path_root=settings.path_root_for_storage,
        session_seconds=settings.session_hours * 3600,
        max_pixels=settings.max_pixels,
        max_file_bytes=settings.max_file_bytes,
        metrics_token=settings.metrics_token,
        login_attempts=settings.login_attempts,
        login_lockout_seconds=settings.login_lockout_seconds,
        secure_cookies=settings.web_secure_cookies,
    )


def _check_revision(url: str) -> None:
    from alembic.script import ScriptDirectory

    from bonewatch.db import current_revision
    from bonewatch.db.engine import alembic_config

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    found = current_revision(url)
    if found != head:
        fail(f"the ledger is at revision {found}, not {head}: run `bonewatch db upgrade` first", 1)


def serve(
    host: Annotated[
        str | None,
        typer.Option(help="Address to bind (BONEWATCH_WEB_HOST); 127.0.0.1 unless set."),
    ] = None,
    port: Annotated[
        int | None, typer.Option(min=0, max=65535, help="Port (BONEWATCH_WEB_PORT); 8000.")
    ] = None,
) -> None:
    """Run the review web app.

    Worklist, study pages, verdicts, stats and a JSON API.

    It binds 127.0.0.1 unless told otherwise, and refuses any other address while no user
    exists (`bonewatch user add NAME`). For TLS, put it behind a reverse proxy."""
    import uvicorn

    from bonewatch.db.users import count_users
    from bonewatch.web import create_app
    from bonewatch.worker.runner import open_ledger

    settings = settings_from(web_host=host, web_port=port)
    url = settings.resolved_database_url
    engine = open_ledger(settings)
    if not url.startswith("sqlite"):
        _check_revision(url)
    users = count_users(engine)
    if not is_loopback(settings.web_host) and users == 0:
        fail(
            f"refusing to serve on {settings.web_host} while no user exists: anyone who reaches "
            "it could try to log in to nothing. Add one first: `bonewatch user add NAME "
            "--role admin`, or serve on 127.0.0.1"
        )
    queue_depths = None
    if settings.distributed:
        from bonewatch.worker.distributed import get_app, inspect_broker

        def queue_depths() -> dict[str, int]:
            view = inspect_broker(get_app(settings), fresh_seconds=settings.reconcile_grace_seconds)
            return view.depths

    app = create_app(web_config(settings), engine=engine, queue_depths=queue_depths)
    if users == 0:
        err.print("[bold yellow]note:[/] no user yet; add one with `bonewatch user add NAME`")
    trusted = ",".join(p.strip() for p in settings.web_trusted_proxies.split(",") if p.strip())
    err.print(f"bonewatch review on http://{settings.web_host}:{settings.web_port}/")
    uvicorn.run(
        app,
        host=settings.web_host,
        port=settings.web_port,
        proxy_headers=bool(trusted),
        forwarded_allow_ips=trusted or None,
        server_header=False,
        # Request lines name studies; who saw what goes to the audit table instead.
        access_log=False,
        log_level="warning",
    )


__all__ = ["is_loopback", "serve", "session_secret", "web_config"]
