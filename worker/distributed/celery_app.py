"""Distributed mode: the Celery app and its one thin task.

Messages carry image ids, never pixels; the ledger stays the source of truth. A message that is
delivered twice, or for an image that is already done, claims nothing and costs nothing, which is
what makes re-publishing lost messages (``bonewatch reconcile``) safe.

TensorFlow is never imported here: the worker's parent process only consumes messages. Each pool
child loads the bundle once, after the fork, in :func:`_start_child`.

``celery -A worker.celery_app ...`` (Flower, inspection) uses the module-level :data:`app`, built
from the same ``BONEWATCH_*`` settings as the ``bonewatch`` commands.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task, signals
from celery.utils.time import get_exponential_backoff_interval
from kombu import Exchange, Queue

from bonewatch.worker.pipeline import transient_errors
from bonewatch.worker.settings import Settings

log = logging.getLogger(__name__)

TASK_PROCESS = "bonewatch.process_images"
# Consumption order matters: with both queues, a worker takes ``live`` whenever it has messages.
QUEUE_ORDER = ("live", "bulk")
# How long a new pool child may take to start: it imports TensorFlow and loads the bundle.
CHILD_START_SECONDS = 180.0


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for bonewatch; every crash-safety property is one of Celery's own."""
    transport: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout}
    if (settings.broker_url or "").startswith(("redis://", "rediss://", "redis+socket://")):
        # BRPOP on the keys in the order the worker lists its queues: ``live`` before ``bulk``.
        transport["queue_order_strategy"] = "priority"
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        # A message is acknowledged only after its batch is recorded; a worker killed mid-batch
        # hands it back. One message per pool child at a time, so nothing waits behind a batch.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # The ledger holds the results.
        "task_ignore_result": True,
        "result_backend": None,
        # Flower shows the work.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_queues": [Queue(name, Exchange(name), routing_key=name) for name in QUEUE_ORDER],
        "task_default_queue": "bulk",
        "task_publish_retry": True,
        "task_publish_retry_policy": {
            "max_retries": 5,
            "interval_start": 0.5,
            "interval_step": 1.0,
            "interval_max": 5.0,
        },
        "worker_proc_alive_timeout": CHILD_START_SECONDS,
    }


def create_app(settings: Settings) -> Celery:
    """A Celery app configured from ``settings``, with the bonewatch task registered."""
    app = Celery("bonewatch", set_as_current=False)
    app.conf.update(celery_config(settings))

    @app.task(  # type: ignore[untyped-decorator]
        name=TASK_PROCESS,
        shared=False,  # each app (one per configuration) owns its own copy
        bind=True,
        max_retries=settings.transient_retries,
    )
    def process_images(
        self: Task, image_ids: list[int], handed_over_by: list[str] | None = None
    ) -> int:
        """Claim, decode, predict and record the given images (those still waiting)."""
        from bonewatch.worker.distributed import run_task
        from bonewatch.worker.pipeline import worker_id

        queue = (self.request.delivery_info or {}).get("routing_key") or "bulk"
        earlier = list(handed_over_by or [])
        try:
            return run_task(image_ids, queue=queue, taking_over_from=earlier)
        except transient_errors() as exc:
            # The retry may run in another process: it is told whose leases it may take over
            # (every process that tried this batch), so the batch never waits for them to expire.
            delay = get_exponential_backoff_interval(
                factor=max(1, round(settings.retry_backoff_seconds)),
                retries=self.request.retries,
                maximum=round(settings.retry_backoff_max),
                full_jitter=True,
            )
            raise self.retry(
                exc=exc,
                countdown=delay,
                args=[image_ids],
                kwargs={"handed_over_by": sorted({*earlier, worker_id()})},
            ) from exc

    return app


@signals.worker_process_init.connect(weak=False)
def _start_child(**_: Any) -> None:
    """In each pool child, after the fork: database engine, decode threads and the bundle."""
    from bonewatch.worker.distributed import start_child

    start_child(Settings())


@signals.worker_process_shutdown.connect(weak=False)
def _stop_child(**_: Any) -> None:
    from bonewatch.worker.distributed import stop_child

    stop_child()


app = create_app(Settings())
