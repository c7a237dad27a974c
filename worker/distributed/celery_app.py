"""The Celery app of distributed mode: configuration only, built by a factory.

Nothing is built at import time. Every crash-safety property is one of Celery's own settings;
the task is registered by :func:`bonewatch.worker.distributed.tasks.register_tasks`, and only on
the app a worker runs. Publishers send by task name and need no registration.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from bonewatch.worker.settings import Settings

TASK_PROCESS = "bonewatch.process_images"
# Results back to PACS, on a queue of their own so that a slow PACS never holds up inference.
TASK_SEND = "bonewatch.send_results"
SEND_QUEUE = "send"
# Consumption order matters: with both queues, a worker takes ``live`` whenever it has messages.
QUEUE_ORDER = ("live", "bulk")
# How long a new pool child may take to start: it imports TensorFlow and loads the bundle.
CHILD_START_SECONDS = 180.0


class DistributedError(RuntimeError):
    """Distributed mode cannot run as configured (no broker, ledger not migrated, ...)."""


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
        # ``send`` is declared where it is used (a worker's -Q, the publisher), not here.
        "task_routes": {TASK_SEND: {"queue": SEND_QUEUE, "routing_key": SEND_QUEUE}},
        "task_default_queue": "bulk",
        "task_publish_retry": True,
        "task_publish_retry_policy": {
            "max_retries": 5,
            "interval_start": 0.5,
            "interval_step": 1.0,
            "interval_max": 5.0,
        },
        "worker_proc_alive_timeout": CHILD_START_SECONDS,
        # Anyone who can reach the broker could stop the workers with `celery control shutdown`.
        "worker_enable_remote_control": settings.remote_control,
    }


def create_app(settings: Settings) -> Celery:
    """A Celery app configured from ``settings`` (no tasks registered)."""
    if not settings.broker_url:
        raise DistributedError("BONEWATCH_BROKER_URL is not set")
    app = Celery("bonewatch", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


@cache
def _app_for(settings_json: str) -> Celery:
    return create_app(Settings.model_validate_json(settings_json))


def get_app(settings: Settings) -> Celery:
    """The publishing app for these settings (one per distinct configuration in a process)."""
    if not settings.broker_url:
        raise DistributedError("BONEWATCH_BROKER_URL is not set")
    return _app_for(settings.model_dump_json())
