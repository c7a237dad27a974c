"""The life of a Celery pool child: set up after the fork, from the launcher's settings.

Each child opens its own database engine (never one inherited over fork), its decode threads and
the bundle, once, so the first task does not pay for them. TensorFlow, where the engine needs
it, is imported here and never in the parent.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery import signals

from bonewatch.db import make_engine
from bonewatch.worker.pipeline import (
    BatchOutcome,
    Pipeline,
    release_dead_local_leases,
    serving_bundle,
    worker_id,
)
from bonewatch.worker.settings import Settings

log = logging.getLogger(__name__)

_pipeline: Pipeline | None = None


def start_child(settings: Settings) -> Pipeline:
    """Set up this process's pipeline from ``settings`` (the launcher's, resolved once)."""
    global _pipeline
    engine = make_engine(settings.resolved_database_url)
    pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="bonewatch-io")
    # The configured engine, on one stream: a child runs one task at a time, so its batch gets
    # all the threads it was given (several children on a host share the cores between them).
    bundle = serving_bundle(settings.replace(inference_streams=1))
    _pipeline = Pipeline.open(settings, engine, pool, bundle)
    log.info("worker child %s ready with bundle %s", worker_id(), settings.bundle)
    return _pipeline


def stop_child() -> None:
    global _pipeline
    if _pipeline is not None:
        _pipeline.pool.shutdown(wait=False)  # type: ignore[attr-defined]
        _pipeline.engine.dispose()
        _pipeline = None


def child_pipeline(settings: Settings) -> Pipeline:
    """This child's pipeline, started from ``settings`` on first use (a solo or threads pool
    sends no process-init signal)."""
    return _pipeline if _pipeline is not None else start_child(settings)


def connect_lifecycle(settings: Settings) -> None:
    """Start and stop every pool child with ``settings``: connected in the launcher before the
    pool forks, so each child holds the parent's resolved settings, not a fresh read of the
    environment."""

    def started(**_: Any) -> None:
        start_child(settings)

    def stopped(**_: Any) -> None:
        stop_child()

    signals.worker_process_init.connect(started, weak=False)
    signals.worker_process_shutdown.connect(stopped, weak=False)


def run_task(
    settings: Settings, image_ids: Sequence[int], *, taking_over_from: Sequence[str] = ()
) -> BatchOutcome:
    """The body of the ``process_images`` task: the pipeline's batch, for the given ids."""
    pipeline = child_pipeline(settings)
    # A pool child killed mid-batch leaves its rows leased; its message comes back at once
    # (reject on worker lost), so free that child's rows now rather than when the lease ends.
    release_dead_local_leases(pipeline.engine, pipeline.settings)
    return pipeline.run_batch(image_ids, taking_over_from=taking_over_from)
