"""Distributed mode: Celery workers on any number of hosts, Redis or RabbitMQ as transport, and
the shared ledger as the only truth.

One module per concern, none importing another in a cycle:

- :mod:`.celery_app`: the Celery configuration and the app factory;
- :mod:`.tasks`: the thin tasks (processing images; sending results, on `send`);
- :mod:`.child`: a pool child's life, from the launcher's settings;
- :mod:`.publishing`: image ids onto the queues;
- :mod:`.broker`: what the broker holds;
- :mod:`.reconcile`: reclaiming leases and re-publishing lost messages;
- :mod:`.launcher`: ``bonewatch worker``;
- :mod:`.shared`: opening the shared ledger.

The work itself is :class:`bonewatch.worker.pipeline.Pipeline`, as in embedded mode.
"""

from bonewatch.worker.distributed.broker import BrokerView, inspect_broker
from bonewatch.worker.distributed.celery_app import (
    QUEUE_ORDER,
    TASK_PROCESS,
    DistributedError,
    celery_config,
    create_app,
    get_app,
)
from bonewatch.worker.distributed.child import start_child, stop_child
from bonewatch.worker.distributed.launcher import (
    child_threads,
    parse_queues,
    run_worker,
    worker_processes,
)
from bonewatch.worker.distributed.publishing import Publisher, publish
from bonewatch.worker.distributed.reconcile import (
    PeriodicReconcile,
    ReconcileSummary,
    lost_messages,
    reconcile,
)
from bonewatch.worker.distributed.shared import open_shared_ledger

__all__ = [
    "QUEUE_ORDER",
    "TASK_PROCESS",
    "BrokerView",
    "DistributedError",
    "PeriodicReconcile",
    "Publisher",
    "ReconcileSummary",
    "celery_config",
    "child_threads",
    "create_app",
    "get_app",
    "inspect_broker",
    "lost_messages",
    "open_shared_ledger",
    "parse_queues",
    "publish",
    "reconcile",
    "run_worker",
    "start_child",
    "stop_child",
    "worker_processes",
]
