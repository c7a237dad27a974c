"""Embedded mode: the in-process runner behind ``bonewatch process`` and ``bonewatch watch``.

Decoding of the next batch runs in a thread pool while the current batch is in the models, so the
cores are busy with inference rather than waiting on file reads. Claiming and recording go through
the same ledger functions as distributed mode.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from bonewatch.db import (
    count_by_status,
    ledger_health,
    make_engine,
    next_retry_at,
    query_results,
    release_leases,
    retry_delay,
    upgrade,
)
from bonewatch.ingest import InboxWatcher, iter_candidate_files
from bonewatch.worker.pipeline import (
    DecodedBatch,
    Pipeline,
    RegisterSummary,
    inference_streams,
    recover_leases,
    register_paths,
    serving_bundle,
    serving_pipeline,
    transient_errors,
    worker_id,
)
from bonewatch.worker.settings import Settings
from bonewatch.worker.window import parse_window

log = logging.getLogger(__name__)
_jitter = random.Random()

IDLE_SWEEP_SECONDS = 10.0


def open_ledger(settings: Settings) -> Engine:
    """An engine on the configured database; SQLite is migrated on the spot (embedded default)."""
    url = settings.resolved_database_url
    if url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        upgrade(url)
    return make_engine(url)


class NoLedgerError(RuntimeError):
    """A read-only command found no ledger to read."""


def read_ledger(settings: Settings) -> Engine:
    """The configured ledger, for commands that only read it: nothing is created or migrated.

    Raises:
        NoLedgerError: embedded mode, and no ledger file exists yet.
    """
    url = settings.resolved_database_url
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:" and not Path(database).is_file():
            raise NoLedgerError(
                f"no ledger at {Path(database).absolute()} yet: `bonewatch process` or `watch` "
                "creates it (BONEWATCH_DATA_DIR names another folder)"
            )
        return make_engine(url, read_only=True)
    return make_engine(url)


def preflight(settings: Settings) -> None:
    """Check, before any work starts, what an embedded run needs: the bundle's manifest (and its
    pinned digest) and a ledger that opens. Raises the error that names what is wrong."""
    from bonewatch.models.bundle import BundleError, bundle_digest, read_manifest

    read_manifest(settings.bundle)
    if settings.bundle_sha256 and bundle_digest(settings.bundle) != settings.bundle_sha256:
        raise BundleError(
            f"bundle {settings.bundle} does not have the digest BONEWATCH_BUNDLE_SHA256 pins"
        )
    open_ledger(settings).dispose()


@dataclass
class DrainSummary:
    finished: int = 0
    batches: int = 0


def _drain_pass(
    pipeline: Pipeline,
    *,
    on_finished: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
) -> DrainSummary:
    """One pass: claim and process until nothing is claimable (or ``stop`` is set).

    These are the two halves of :meth:`Pipeline.run_batch`, on different threads: one producer
    claims and decodes batches; ``inference_streams`` consumers run them through the cascade and
    record them, each its own batch (one consumer runs here, on the calling thread).
    """
    streams = inference_streams(pipeline.settings, pipeline.bundle.engine)
    ready: queue.Queue[DecodedBatch | BaseException | None] = queue.Queue(maxsize=streams + 1)
    halt = threading.Event()  # ours: ends the producer and the consumers when one fails
    errors: list[BaseException] = []
    lock = threading.Lock()

    def stopping() -> bool:
        return halt.is_set() or (stop is not None and stop.is_set())

    def produce() -> None:
        try:
            while not stopping():
                batch = pipeline.claim_and_decode()
                if batch is None:
                    break
                ready.put(batch)
            ready.put(None)
        except BaseException as exc:  # handed to a consumer, which ends the pass with it
            ready.put(exc)

    summary = DrainSummary()

    def consume() -> None:
        try:
            while not halt.is_set():
                item = ready.get()
                if item is None:
                    _wake(ready)  # the end, for the other consumers too
                    return
                if isinstance(item, BaseException):
                    raise item
                done = pipeline.infer_and_record(item)
                with lock:
                    summary.finished += done
                    summary.batches += 1
                if on_finished is not None:
                    on_finished(done)
        except BaseException as exc:
            with lock:
                errors.append(exc)
            halt.set()
            _wake(ready)  # a consumer waiting for a batch wakes, and passes the end on

    producer = threading.Thread(target=produce, name="bonewatch-decode", daemon=True)
    producer.start()
    others = [
        threading.Thread(target=consume, name=f"bonewatch-infer-{k}", daemon=True)
        for k in range(1, streams)
    ]
    try:
        for thread in others:
            thread.start()
        consume()
        for thread in others:
            thread.join()
    finally:
        halt.set()
        while producer.is_alive() or any(t.is_alive() for t in others):
            try:
                ready.get(timeout=0.1)  # unblocks the producer
            except queue.Empty:
                _wake(ready)  # and a consumer still waiting for a batch
        producer.join()
    if errors:
        raise errors[0]
    return summary


def _wake(ready: queue.Queue[Any]) -> None:
    """Put the end-of-work mark in ``ready`` unless it is full (then nobody is waiting on it)."""
    with contextlib.suppress(queue.Full):
        ready.put_nowait(None)


def drain(
    pipeline: Pipeline,
    *,
    on_finished: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
    wait_for_retries: bool = True,
) -> DrainSummary:
    """Process queued images until none are left, or until ``stop`` is set.

    Rows already claimed when ``stop`` arrives are finished first, so nothing is left leased.
    With ``wait_for_retries``, images waiting out a retry backoff are waited for; without it
    (the watcher, which must stay responsive) they are left to a later drain.
    """
    settings, engine = pipeline.settings, pipeline.engine
    total = DrainSummary()
    outages = 0
    while True:
        try:
            done = _drain_pass(pipeline, on_finished=on_finished, stop=stop)
        except transient_errors() as exc:
            # The database went away (a PostgreSQL restart, SQLite locked past its timeout):
            # wait with backoff and carry on, up to the configured number of tries.
            outages += 1
            if outages > settings.transient_retries:
                raise
            delay = retry_delay(
                outages,
                base=settings.retry_backoff_seconds,
                cap=settings.retry_backoff_max,
                rng=_jitter,
            )
            log.warning("ledger unavailable (%s); trying again in %.1f s", exc, delay)
            (stop or threading.Event()).wait(delay)
            _take_back_own_leases(engine)
            continue
        outages = 0
        total.finished += done.finished
        total.batches += done.batches
        when = (
            next_retry_at(engine, bulk_open=pipeline.bulk_open(), held_runs=pipeline.held_runs())
            if wait_for_retries
            else None
        )
        if when is None or (stop is not None and stop.is_set()):
            return total
        (stop or threading.Event()).wait(max((when - datetime.now(UTC)).total_seconds(), 0.0))


# How often a run's `process` looks at its run again while it waits (paused, window closed).
RUN_POLL_SECONDS = 1.0


def drain_run(
    pipeline: Pipeline,
    run_id: int,
    *,
    on_finished: Callable[[int], None] | None = None,
    on_wait: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
    poll_seconds: float = RUN_POLL_SECONDS,
) -> DrainSummary:
    """``process``: drain until the run is done or cancelled (or ``stop`` is set).

    The run's row is read again between passes: while it is paused, or outside its bulk window
    (the one it was started with, which ``bonewatch runs window`` moves), nothing new is claimed
    and ``on_wait`` hears why, and when the window opens, once per change. Claims stop as the
    window closes; a batch already claimed finishes. Each pass takes whatever is claimable, as
    a plain :func:`drain` does, so rows an interrupted earlier run left are taken too.
    """
    from bonewatch.db.runs import get_run

    stop = stop or threading.Event()
    total = DrainSummary()
    said = ""
    while not stop.is_set():
        run = get_run(pipeline.engine, run_id)
        window = parse_window(run.bulk_window)
        message = ""
        if run.control == "paused":
            message = f"run {run_id} is paused; waiting for `bonewatch runs resume {run_id}`"
        elif window is not None and not window.is_open(datetime.now(UTC)):
            opens = window.opens_at(datetime.now(UTC)).astimezone()
            message = (
                f"run {run_id} is outside its bulk window {window}; waiting until it opens at "
                f"{opens:%Y-%m-%d %H:%M} local time"
            )
        if message:
            if message != said and on_wait is not None:
                on_wait(message)
            said = message
            stop.wait(poll_seconds)
            continue
        said = ""
        if run.control == "active":
            done = drain(replace(pipeline, window=window), on_finished=on_finished, stop=stop)
            total.finished += done.finished
            total.batches += done.batches
        if get_run(pipeline.engine, run_id).state in ("done", "cancelled"):
            break
        stop.wait(poll_seconds)  # the rest is leased elsewhere, or waits out a backoff
    return total


def _take_back_own_leases(engine: Engine) -> None:
    """After an outage, queue again what this process had claimed but not recorded (nothing of
    it is in flight any more); attempts are kept and not held against the images."""
    try:
        release_leases(engine, [worker_id()], max_attempts=None)
    except transient_errors() as exc:
        # still down: the next pass fails the same way and waits again
        log.debug("could not release this process's leases yet: %s", exc)


def process_paths(
    paths: Iterable[Path],
    settings: Settings,
    *,
    on_registered: Callable[[int], None] | None = None,
    on_queued: Callable[[int], None] | None = None,
    on_finished: Callable[[int], None] | None = None,
    enqueue: Callable[[list[int]], None] | None = None,
    run_id: int | None = None,
    on_wait: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
) -> tuple[RegisterSummary, DrainSummary]:
    """Register every file under ``paths`` on the bulk queue, then process all queued work.

    With ``enqueue`` (distributed mode) each chunk's newly queued ids are handed to it instead,
    and nothing is processed here: workers do that. With ``run_id`` the new rows belong to that
    run, and processing goes on until the run is done or cancelled (:func:`drain_run`).
    """
    engine = enqueue_ledger(settings) if enqueue else open_ledger(settings)
    bundle = None if enqueue else serving_bundle(settings)
    if bundle is not None:
        recover_leases(engine, settings)
    with (
        ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="bonewatch-io") as pool,
        serving_pipeline(settings, engine, pool, bundle) as pipeline,
    ):

        def chunk_done(queued_ids: list[int]) -> None:
            if enqueue is not None:
                enqueue(queued_ids)
            if on_queued is not None:
                on_queued(len(queued_ids))

        files: Iterable[Path] = iter_candidate_files(
            paths, follow_symlinks=settings.follow_symlinks
        )
        if on_registered is not None:
            files = _counting(files, on_registered)
        registered = register_paths(
            engine, files, settings, queue="bulk", pool=pool, on_chunk=chunk_done, run_id=run_id
        )
        if run_id is not None:
            from bonewatch.db.runs import seal_run

            seal_run(engine, run_id)
        if pipeline is None:
            return registered, DrainSummary()
        if run_id is None:
            drained = drain(pipeline, on_finished=on_finished, stop=stop)
        else:
            drained = drain_run(
                pipeline, run_id, on_finished=on_finished, on_wait=on_wait, stop=stop
            )
    return registered, drained


def enqueue_ledger(settings: Settings) -> Engine:
    """The ledger for a process that only registers and enqueues (distributed mode)."""
    from bonewatch.worker.distributed import open_shared_ledger

    return open_shared_ledger(settings)


def ledger_status(settings: Settings, *, run_id: int | None = None) -> dict[str, Any]:
    """``bonewatch status``: counts by status, loss and double-count checks, queue depths.
    With ``run_id``, the counts are that run's images only (the checks stay ledger-wide).

    ``lost`` counts rows that nothing will finish without help: expired leases and, in
    distributed mode, queued rows whose message is gone (``bonewatch reconcile`` repairs both).
    """
    engine = enqueue_ledger(settings) if settings.distributed else read_ledger(settings)
    try:
        if run_id is not None:
            from bonewatch.db.runs import get_run

            get_run(engine, run_id)  # RunNotFoundError names the run
        counts = count_by_status(engine, run_id=run_id)
        from bonewatch.db import count_deliveries

        deliveries = count_deliveries(engine)
        health: dict[str, Any] = dict(ledger_health(engine))
        queues = None
        health["unpublished"] = None
        if settings.distributed:
            from bonewatch.worker.distributed import get_app, inspect_broker, lost_messages

            view = inspect_broker(get_app(settings), fresh_seconds=settings.reconcile_grace_seconds)
            queues = view.depths
            health["unpublished"] = len(
                lost_messages(engine, view, grace_seconds=settings.reconcile_grace_seconds)
            )
    finally:
        engine.dispose()
    return {
        "ledger": make_url(settings.resolved_database_url).render_as_string(hide_password=True),
        "run_id": run_id,
        "counts": counts,
        "total": sum(counts.values()),
        "lost": health["expired_leases"] + (health["unpublished"] or 0),
        "health": health,
        "queues": queues,
        "deliveries": deliveries,
    }


def _counting(items: Iterable[Path], tick: Callable[[int], None]) -> Iterable[Path]:
    for item in items:
        tick(1)
        yield item


class FinishedFiles:
    """What ``watch`` says at its default level: one line per file that reached a final status
    (its time, name, status and label), each time once."""

    OVERLAP = timedelta(seconds=1)  # rows that finished in the same instant are not missed

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.since = datetime.now(UTC)
        self.shown: dict[int, datetime] = {}

    def show(self, say: Callable[[str], None]) -> None:
        rows = query_results(self.engine, finished_after=self.since - self.OVERLAP)
        for row in sorted(rows, key=lambda r: str(r["finished_at"])):
            image_id = int(str(row["id"]))
            when = datetime.fromisoformat(str(row["finished_at"]))
            if self.shown.get(image_id) == when:
                continue  # a row taken again (its file changed) finishes again: said again
            what = " ".join(str(v) for v in (row["status"], row.get("label")) if v)
            say(f"{when.astimezone():%H:%M:%S}  {Path(str(row['path'])).name}  {what}")
            self.shown[image_id] = when
            self.since = max(self.since, when)
        horizon = self.since - self.OVERLAP
        self.shown = {i: t for i, t in self.shown.items() if t >= horizon}


def watch_inbox(
    inbox: Path,
    settings: Settings,
    *,
    stop: threading.Event,
    on_event: Callable[[str], None] = log.info,
    enqueue: Callable[[list[int]], None] | None = None,
) -> None:
    """Follow ``inbox`` until ``stop`` is set: register complete files and process them.

    With ``enqueue`` (distributed mode) new rows are handed to it on the ``live`` queue instead
    of being processed here.

    Raises:
        InboxWatcherError: The watcher cannot follow the inbox any more (its observer died, and
            so did the polling one that replaced it): the caller exits, a supervisor restarts.
    """
    # The inbox is where quarantine moves go (done/, failed/ under it), when they are on.
    settings = settings.replace(inbox=settings.inbox or inbox)
    engine = enqueue_ledger(settings) if enqueue else open_ledger(settings)
    from bonewatch.worker.runs import watch_run

    run_id = watch_run(engine, inbox, settings)  # the folder's one run, across restarts
    bundle = None if enqueue else serving_bundle(settings)
    if bundle is not None:
        recover_leases(engine, settings)
    with (
        ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="bonewatch-io") as pool,
        serving_pipeline(settings, engine, pool, bundle) as pipeline,
        InboxWatcher(
            inbox,
            poll=settings.poll,
            poll_interval=settings.poll_interval,
            settle_seconds=settings.settle_seconds,
            follow_symlinks=settings.follow_symlinks,
        ) as watcher,
    ):
        if pipeline is not None:  # results back to PACS, in a thread of their own
            from bonewatch.worker.delivery import start_sender

            start_sender(settings, stop)
        on_event(f"watching {inbox} ({'polling' if settings.poll else 'file events'})")
        reported = FinishedFiles(engine)
        last_sweep = 0.0
        # I/O errors at registration, and files with new bytes whose row was being processed:
        # offered again each sweep.
        unreadable: set[Path] = set()
        while not stop.is_set():
            files = watcher.ready(timeout=0.5)
            if files:
                reg = register_paths(
                    engine, files, settings, queue="live", pool=pool, on_chunk=enqueue,
                    run_id=run_id,
                )  # fmt: skip
                unreadable.update(reg.skipped_paths, reg.deferred_paths)
                log.info(
                    "registered %d new file(s): %d duplicate(s), %d refused",
                    reg.new, reg.duplicates, reg.refused,
                )  # fmt: skip
                reported.show(on_event)
            # Drain after new files, and now and then for rows whose lease expired elsewhere.
            if not files and time.monotonic() - last_sweep < IDLE_SWEEP_SECONDS:
                continue
            last_sweep = time.monotonic()
            if unreadable:
                # os.path.exists: Path.exists raises on some errors (a name too long, EACCES)
                retry = sorted(p for p in unreadable if os.path.exists(p))
                unreadable.clear()
                again = register_paths(
                    engine, retry, settings, queue="live", pool=pool, on_chunk=enqueue,
                    run_id=run_id,
                )  # fmt: skip
                unreadable.update(again.skipped_paths, again.deferred_paths)
            if pipeline is None:
                continue
            summary = drain(pipeline, stop=stop, wait_for_retries=False)
            if summary.finished:
                counts = count_by_status(engine)
                log.info(
                    "finished %d image(s); ledger: %s",
                    summary.finished,
                    ", ".join(f"{k} {v}" for k, v in counts.items() if v),
                )
                reported.show(on_event)
