"""The ledger as distributed mode shares it: it must exist and be migrated already."""

from __future__ import annotations

import logging

from sqlalchemy import Engine

from bonewatch.db import current_revision, make_engine
from bonewatch.worker.distributed.celery_app import DistributedError
from bonewatch.worker.settings import Settings

log = logging.getLogger(__name__)


def open_shared_ledger(settings: Settings) -> Engine:
    """The ledger of a distributed set-up: it must exist and be migrated already.

    Several hosts share it, so none migrates it on its own (``bonewatch db upgrade`` does).
    """
    url = settings.resolved_database_url
    if url.startswith("sqlite"):
        log.warning("distributed mode on SQLite (%s) only works for workers on this host", url)
    try:
        revision = current_revision(url)
    except Exception as exc:  # connection refused, unknown database, ...
        raise DistributedError(f"cannot open the ledger at {_redact(url)}: {exc}") from exc
    if revision is None:
        raise DistributedError(
            f"the ledger at {_redact(url)} has no schema; run `bonewatch db upgrade` first"
        )
    return make_engine(url)


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<database url>"
