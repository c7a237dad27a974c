"""Distributed mode: publishing ids, the task body, reconcile, queue depths and the worker.

The same pipeline functions as embedded mode do the work (:mod:`worker.pipeline`); this module
only adds the transport around them. The broker is never trusted to remember anything: a queued
row whose message is gone is published again by :func:`reconcile`, and a message whose row is
finished claims nothing.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

from celery import Celery, signals
from sqlalchemy import Engine

from bonewatch.db import (
    QUEUES,
    claim_images,
    current_revision,
    exclusive,
    make_engine,
    reclaim_expired,
    waiting_images,
)
from bonewatch.models.engines import InferenceThreads, default_streams
from bonewatch.worker.celery_app import QUEUE_ORDER, TASK_PROCESS, create_app
from bonewatch.worker.pipeline import (
    decode_claimed,
    infer_and_record,
    release_dead_local_leases,
    serving_bundle,
    worker_id,
)
from bonewatch.worker.settings import Settings

log = logging.getLogger(__name__)

RECONCILE_LOCK = "bonewatch.reconcile"


class DistributedError(RuntimeError):
    """Distributed mode cannot run as configured (no broker, ledger not migrated, ...)."""


@cache
def _app_for(settings_json: str) -> Celery:
    return create_app(Settings.model_validate_json(settings_json))


def get_app(settings: Settings) -> Celery:
    """The Celery app for these settings (one per distinct configuration in a process)."""
    if not settings.broker_url:
        raise DistributedError("BONEWATCH_BROKER_URL is not set")
    return _app_for(settings.model_dump_json())


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


# --------------------------------------------------------------------------- publishing


def _batches(ids: Sequence[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(ids), size):
        yield list(ids[start : start + size])


def publish(
    app: Celery,
    image_ids: Sequence[int],
    queue: str,
    *,
    batch_size: int,
    countdown: float | None = None,
) -> int:
    """Send ``image_ids`` as messages of at most ``batch_size`` ids each; returns the count."""
    if queue not in QUEUES:
        raise ValueError(f"unknown queue {queue!r}; expected one of {QUEUES}")
    sent = 0
    with app.producer_or_acquire() as producer:
        # Declared on every call, not once per connection: a broker that lost its memory
        # (Redis FLUSHALL, a restart without persistence) also lost the queue's binding, and
        # messages published without it would vanish.
        app.amqp.queues[queue](producer.channel).declare()
        for chunk in _batches(list(image_ids), batch_size):
            app.send_task(
                TASK_PROCESS,
                args=[chunk],
                queue=queue,
                routing_key=queue,
                countdown=countdown,
                producer=producer,
            )
            sent += 1
    return sent


class Publisher:
    """A callback for :func:`worker.pipeline.register_paths`: publishes each chunk's new rows."""

    def __init__(self, settings: Settings, queue: str) -> None:
        self.app = get_app(settings)
        self.queue = queue
        self.batch_size = settings.batch_size
        self.images = 0
        self.messages = 0

    def __call__(self, image_ids: list[int]) -> None:
        if image_ids:
            self.messages += publish(self.app, image_ids, self.queue, batch_size=self.batch_size)
            self.images += len(image_ids)


# --------------------------------------------------------------------------- what the broker holds


@dataclass
class BrokerView:
    """What the broker holds right now.

    ``ids`` are the image ids inside waiting or freshly delivered messages, or None where the
    transport cannot list messages (AMQP), in which case only ``depths`` are known.
    """

    depths: dict[str, int]
    ids: set[int] | None = None


def _task_ids(raw: bytes | str) -> list[int]:
    """The image ids inside one stored kombu message (JSON envelope, base64 body)."""
    try:
        envelope = json.loads(raw)
        if isinstance(envelope, list):  # the unacked hash stores [message, exchange, key]
            envelope = envelope[0]
        if (envelope.get("headers") or {}).get("task") != TASK_PROCESS:
            return []
        body = envelope["body"]
        if (envelope.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return [int(i) for i in args[0]]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return []


def inspect_broker(app: Celery, *, fresh_seconds: float) -> BrokerView:
    """Queue depths, and on Redis the ids in every waiting message and in messages delivered
    less than ``fresh_seconds`` ago (a worker is about to claim them). Older deliveries whose
    rows are still ``queued`` belong to a worker that died, and do not count."""
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        depths = {}
        for name in QUEUE_ORDER:
            # declared exactly as Celery declares it, so RabbitMQ sees no conflicting arguments
            _, count, _ = app.amqp.queues[name](channel).queue_declare()
            depths[name] = int(count)
        if conn.transport.driver_type != "redis":
            return BrokerView(depths)
        client = channel.client
        ids: set[int] = set()
        keys = [
            name if not pri else f"{name}{channel.sep}{pri}"
            for name in QUEUE_ORDER
            for pri in channel.priority_steps
        ]
        for key in keys:
            for raw in client.lrange(key, 0, -1):
                ids.update(_task_ids(raw))
        cutoff = time.time() - fresh_seconds
        fresh = {
            tag
            for tag, when in client.zrange(channel.unacked_index_key, 0, -1, withscores=True)
            if when >= cutoff
        }
        if fresh:
            for raw in client.hmget(channel.unacked_key, sorted(fresh)):
                if raw is not None:
                    ids.update(_task_ids(raw))
        return BrokerView(depths, ids)


# --------------------------------------------------------------------------- reconcile


@dataclass
class ReconcileSummary:
    released: int = 0  # leases of dead processes on this host
    reclaimed: int = 0  # expired leases queued again
    republished: int = 0  # queued rows whose message was lost, published again
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
    view = inspect_broker(app, fresh_seconds=settings.reconcile_grace_seconds)
    lost = lost_messages(engine, view, grace_seconds=settings.reconcile_grace_seconds)
    for queue in QUEUE_ORDER:
        ids = [image_id for image_id, q in lost if q == queue]
        if ids:
            publish(app, ids, queue, batch_size=settings.batch_size)
            summary.republished += len(ids)
    summary.queues = view.depths
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


# --------------------------------------------------------------------------- the worker side


@dataclass
class _Child:
    settings: Settings
    engine: Engine
    pool: ThreadPoolExecutor
    bundle: Any = None
    specs: list[Any] = field(default_factory=list)


_child: _Child | None = None


def start_child(settings: Settings) -> None:
    """Set up a pool child: its own engine (never one inherited over fork), decode threads and
    the bundle, loaded once here so that the first task does not pay for it."""
    global _child
    from bonewatch.models.cascade import input_specs

    engine = make_engine(settings.resolved_database_url)
    pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="bonewatch-io")
    _child = _Child(settings, engine, pool)
    # The configured engine, on one stream: a child runs one task at a time, so its batch gets
    # all the threads it was given (several children on a host share the cores between them).
    _child.bundle = serving_bundle(settings.model_copy(update={"inference_streams": 1}))
    _child.specs = list(input_specs(_child.bundle))
    log.info("worker child %s ready with bundle %s", worker_id(), settings.bundle)


def stop_child() -> None:
    global _child
    if _child is not None:
        _child.pool.shutdown(wait=False)
        _child.engine.dispose()
        _child = None


def run_task(image_ids: Sequence[int], *, queue: str, taking_over_from: Sequence[str] = ()) -> int:
    """The body of the ``process_images`` task: the same claim, decode, infer and record steps
    as embedded mode, for the given ids. Returns how many images it finished."""
    if _child is None:
        start_child(Settings())  # a solo or threads pool has no process-init signal
    assert _child is not None
    settings, engine = _child.settings, _child.engine
    me = worker_id()
    # A pool child killed mid-batch leaves its rows leased; its message comes back at once
    # (reject on worker lost), so free that child's rows now rather than when the lease ends.
    release_dead_local_leases(engine, settings)
    claimed = claim_images(
        engine,
        image_ids,
        lease_seconds=settings.lease_seconds,
        worker_id=me,
        max_attempts=settings.max_attempts,
        taking_over_from=taking_over_from,
    )
    if not claimed:
        return 0
    # preprocessing runs in the decode threads, overlapped with inference, as in embedded mode
    batch = decode_claimed(claimed, settings, _child.pool, specs=_child.specs)
    finished = infer_and_record(engine, _child.bundle, batch, settings)
    if batch.transient:
        # Files that could not be read for a passing reason wait out their backoff in the ledger;
        # a delayed message brings them back (reconcile would, too).
        attempts = max(claim.attempts for claim, _ in batch.transient)
        delay = settings.retry_backoff_seconds * 2 ** max(attempts - 1, 0)
        publish(
            get_app(settings),
            [c.image_id for c, _ in batch.transient],
            queue,
            batch_size=settings.batch_size,
            countdown=min(delay * 1.25, settings.retry_backoff_max) + 0.5,
        )
    return finished


def parse_queues(text: str) -> list[str]:
    """``live,bulk`` -> ``["live", "bulk"]`` in the order given; unknown names are an error."""
    names = [q.strip() for q in text.split(",") if q.strip()]
    unknown = [q for q in names if q not in QUEUES]
    if not names or unknown:
        raise DistributedError(f"queues must be among {', '.join(QUEUE_ORDER)}; got {text!r}")
    # live first whatever order was typed: the watched folder must not wait behind a backlog
    return sorted(dict.fromkeys(names), key=QUEUE_ORDER.index)


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
    # The children read their settings from the environment they inherit.
    os.environ["BONEWATCH_INTRA_OP_THREADS"] = str(child_threads(settings, concurrency))
    app = get_app(settings)
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
