"""``bonewatch worker``: starts Celery's prefork pool with the launcher's resolved settings."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from celery import signals

from bonewatch.db import QUEUES
from bonewatch.models.engines import InferenceThreads, default_streams
from bonewatch.worker.distributed.celery_app import (
    QUEUE_ORDER,
    SEND_QUEUE,
    DistributedError,
    create_app,
)
from bonewatch.worker.distributed.child import connect_lifecycle
from bonewatch.worker.distributed.reconcile import PeriodicReconcile
from bonewatch.worker.distributed.shared import open_shared_ledger
from bonewatch.worker.distributed.tasks import register_tasks
from bonewatch.worker.pipeline import release_dead_local_leases
from bonewatch.worker.settings import Settings

log = logging.getLogger(__name__)


def parse_queues(text: str) -> list[str]:
    """``live,bulk`` -> ``["live", "bulk"]`` in the order given; unknown names are an error.
    ``send`` (results back to PACS) comes last."""
    order = (*QUEUE_ORDER, SEND_QUEUE)
    names = [q.strip() for q in text.split(",") if q.strip()]
    unknown = [q for q in names if q not in (*QUEUES, SEND_QUEUE)]
    if not names or unknown:
        raise DistributedError(f"queues must be among {', '.join(order)}; got {text!r}")
    # live first whatever order was typed: the watched folder must not wait behind a backlog
    return sorted(dict.fromkeys(names), key=order.index)


def worker_processes(settings: Settings, concurrency: int = 0) -> int:
    """Pool processes for ``bonewatch worker``: ``concurrency``, or for 0 as many as the embedded
    worker runs inference streams on the configured bundle's engine (a batch per core on ONNX
    Runtime, one process on Keras)."""
    from bonewatch.models.bundle import read_manifest, resolve_engine

    manifest = read_manifest(settings.bundle)
    return concurrency or default_streams(resolve_engine(manifest, settings.engine))


def child_threads(settings: Settings, concurrency: int) -> int:
    """Inference threads of each of ``concurrency`` pool children on this host: the configured
    number, or else the host's cores shared between them (not all of them each)."""
    return InferenceThreads(settings.intra_op_threads, streams=concurrency).resolved_intra_op()


def run_worker(
    settings: Settings,
    *,
    queues: Sequence[str],
    concurrency: int,
    loglevel: str = "INFO",
    hostname: str | None = None,
) -> None:
    """Run a Celery worker in this process until it is stopped (SIGTERM / Ctrl-C)."""
    concurrency = worker_processes(settings, concurrency)  # a bad bundle fails here, clearly
    log.info("starting %d worker process(es)", concurrency)
    engine = open_shared_ledger(settings)
    try:
        released = release_dead_local_leases(engine, settings)
        if released:
            log.warning("released %d images left leased by dead workers on this host", released)
    finally:
        engine.dispose()
    # The children get these settings, resolved here, with the host's cores shared among them.
    child_settings = settings.replace(intra_op_threads=child_threads(settings, concurrency))
    app = create_app(child_settings)
    register_tasks(app, child_settings)
    connect_lifecycle(child_settings)
    if settings.bulk_window and "bulk" in queues:
        from bonewatch.worker.distributed.window import install_window_gate
        from bonewatch.worker.window import BulkWindow

        install_window_gate(app, BulkWindow.parse(settings.bulk_window))
    ticker = PeriodicReconcile(settings, settings.reconcile_interval)

    def start_ticker(**_: Any) -> None:
        # After the pool's first forks, so the children never inherit a running thread's state.
        if settings.reconcile_interval > 0 and not ticker.is_alive():
            ticker.start()

    signals.worker_ready.connect(start_ticker, weak=False)
    argv = [
        "worker",
        f"--queues={','.join(queues)}",
        f"--concurrency={concurrency}",
        "--pool=prefork",
        f"--loglevel={loglevel}",
        "--task-events",
        "--without-mingle",
        "--without-gossip",
    ]
    if hostname:
        argv.append(f"--hostname={hostname}")
    try:
        app.worker_main(argv)
    finally:
        ticker.stop.set()
        signals.worker_ready.disconnect(start_ticker)
