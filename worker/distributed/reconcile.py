"""Reconcile: reclaim expired leases and re-publish queued rows whose message was lost.

The broker is never trusted to remember anything: a queued row whose message is gone is
published again, and a message whose row is finished claims nothing.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Celery
from sqlalchemy import Engine

from bonewatch.db import (
    exclusive,
    make_engine,
    mark_stable_studies,
    reclaim_expired,
    waiting_images,
)
from bonewatch.worker.distributed.broker import BrokerView, inspect_broker
from bonewatch.worker.distributed.celery_app import QUEUE_ORDER, get_app
from bonewatch.worker.distributed.publishing import publish, publish_send
from bonewatch.worker.pipeline import release_dead_local_leases
from bonewatch.worker.settings import Settings

log = logging.getLogger(__name__)

RECONCILE_LOCK = "bonewatch.reconcile"


@dataclass
class ReconcileSummary:
    released: int = 0  # leases of dead processes on this host
    reclaimed: int = 0  # expired leases queued again
    republished: int = 0  # queued rows whose message was lost, published again
    stable: int = 0  # studies that became complete (quiet for BONEWATCH_STUDY_STABLE_SECONDS)
    queues: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def lost_messages(
    engine: Engine, view: BrokerView, *, grace_seconds: float
) -> list[tuple[int, str]]:
    """``(id, queue)`` of queued rows that no message will ever deliver.

    On Redis a row is lost when its id is in no message. Where messages cannot be listed
    (AMQP), rows are counted lost only once their queue is empty.
    """
    settled = datetime.now(UTC) - timedelta(seconds=grace_seconds)
    lost: list[tuple[int, str]] = []
    after = 0
    while page := waiting_images(engine, settled_before=settled, after_id=after):
        after = page[-1][0]
        if view.ids is not None:
            lost.extend(row for row in page if row[0] not in view.ids)
        else:
            lost.extend(row for row in page if view.depths.get(row[1], 0) == 0)
    return lost


def reconcile(engine: Engine, settings: Settings, app: Celery | None = None) -> ReconcileSummary:
    """Reclaim expired leases and re-publish ``queued`` rows that have no live message.

    Safe to run at any time and from any host: a message published twice claims its rows once.
    """
    app = app or get_app(settings)
    summary = ReconcileSummary()
    summary.released = release_dead_local_leases(engine, settings)
    summary.reclaimed = reclaim_expired(engine, max_attempts=settings.max_attempts)
    summary.stable = mark_stable_studies(engine, settings.study_stable_seconds)
    view = inspect_broker(app, fresh_seconds=settings.reconcile_grace_seconds)
    lost = lost_messages(engine, view, grace_seconds=settings.reconcile_grace_seconds)
    for queue in QUEUE_ORDER:
        ids = [image_id for image_id, q in lost if q == queue]
        if ids:
            publish(app, ids, queue, batch_size=settings.batch_size)
            summary.republished += len(ids)
    summary.queues = view.depths
    if settings.dicom_destinations or settings.dicomweb_url:
        publish_send(app)  # studies gone quiet, retries come due: a pass over the outbox
    if summary.released or summary.reclaimed or summary.republished:
        log.warning("reconcile: %s", summary.as_dict())
    return summary


class PeriodicReconcile(threading.Thread):
    """Runs :func:`reconcile` every ``interval`` seconds, on one host at a time (the ledger's
    advisory lock picks which), until stopped. Errors are logged and tried again next time."""

    def __init__(self, settings: Settings, interval: float) -> None:
        super().__init__(name="bonewatch-reconcile", daemon=True)
        self.settings = settings
        self.interval = interval
        self.stop = threading.Event()
        self.runs = 0

    def run(self) -> None:
        engine = make_engine(self.settings.resolved_database_url)
        app = get_app(self.settings)
        try:
            while not self.stop.wait(self.interval):
                try:
                    with exclusive(engine, RECONCILE_LOCK) as mine:
                        if mine:
                            reconcile(engine, self.settings, app)
                            self.runs += 1
                except Exception as exc:
                    log.warning("periodic reconcile failed (tried again later): %s", exc)
        finally:
            engine.dispose()
