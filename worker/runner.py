"""Embedded mode: the in-process runner behind ``bonewatch process`` and ``bonewatch watch``.

Decoding of the next batch runs in a thread pool while the current batch is in the models, so the
cores are busy with inference rather than waiting on file reads. Claiming and recording go through
the same ledger functions as distributed mode.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine

from db import (
    claim_batch,
    count_by_status,
    lease_holders,
    make_engine,
    next_retry_at,
    reclaim_expired,
    release_leases,
    upgrade,
)
from ingest import InboxWatcher, iter_candidate_files
from models.bundle import Bundle, load_bundle
from worker.pipeline import (
    DecodedBatch,
    RegisterSummary,
    dead_local_workers,
    decode_claimed,
    infer_and_record,
    register_paths,
    worker_id,
)
from worker.settings import Settings

log = logging.getLogger(__name__)

IDLE_SWEEP_SECONDS = 10.0


def open_ledger(settings: Settings) -> Engine:
    """An engine on the configured database; SQLite is migrated on the spot (embedded default)."""
    url = settings.resolved_database_url
    if url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        upgrade(url)
    return make_engine(url)


def recover_leases(engine: Engine, settings: Settings) -> int:
    """Queue again what crashed workers left ``processing``: leases that expired, and at once
    those held by a process of this host that no longer exists (a killed ``process`` run)."""
    released = release_leases(
        engine, dead_local_workers(lease_holders(engine)), max_attempts=settings.max_attempts
    )
    return released + reclaim_expired(engine, max_attempts=settings.max_attempts)


@dataclass
class DrainSummary:
    finished: int = 0
    batches: int = 0


def _drain_pass(
    engine: Engine,
    bundle: Bundle,
    settings: Settings,
    pool: ThreadPoolExecutor,
    *,
    on_finished: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
) -> DrainSummary:
    """One pass: claim and process until nothing is claimable (or ``stop`` is set)."""
    me = worker_id()
    ready: queue.Queue[DecodedBatch | BaseException | None] = queue.Queue(maxsize=2)
    halt = threading.Event()  # ours: ends the producer when the consumer leaves early

    def stopping() -> bool:
        return halt.is_set() or (stop is not None and stop.is_set())

    def produce() -> None:
        try:
            while not stopping():
                claimed = claim_batch(
                    engine,
                    limit=settings.batch_size,
                    lease_seconds=settings.lease_seconds,
                    worker_id=me,
                    max_attempts=settings.max_attempts,
                )
                if not claimed:
                    break
                ready.put(decode_claimed(claimed, settings, pool))
            ready.put(None)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            ready.put(exc)

    producer = threading.Thread(target=produce, name="bonewatch-decode", daemon=True)
    producer.start()
    summary = DrainSummary()
    try:
        while (item := ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            done = infer_and_record(engine, bundle, item, settings)
            summary.finished += done
            summary.batches += 1
            if on_finished is not None:
                on_finished(done)
    finally:
        halt.set()
        while producer.is_alive():
            try:
                ready.get(timeout=0.1)
            except queue.Empty:
                pass
        producer.join()
    return summary


def drain(
    engine: Engine,
    bundle: Bundle,
    settings: Settings,
    pool: ThreadPoolExecutor,
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
    total = DrainSummary()
    while True:
        done = _drain_pass(engine, bundle, settings, pool, on_finished=on_finished, stop=stop)
        total.finished += done.finished
        total.batches += done.batches
        when = next_retry_at(engine) if wait_for_retries else None
        if when is None or (stop is not None and stop.is_set()):
            return total
        (stop or threading.Event()).wait(max((when - datetime.now(UTC)).total_seconds(), 0.0))


def process_paths(
    paths: Iterable[Path],
    settings: Settings,
    *,
    on_registered: Callable[[int], None] | None = None,
    on_queued: Callable[[int], None] | None = None,
    on_finished: Callable[[int], None] | None = None,
) -> tuple[RegisterSummary, DrainSummary]:
    """Register every file under ``paths`` on the bulk queue, then process all queued work."""
    engine = open_ledger(settings)
    bundle = load_bundle(settings.bundle)
    recover_leases(engine, settings)
    with ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="bonewatch-io") as pool:

        def chunk_done(queued_ids: list[int]) -> None:
            if on_queued is not None:
                on_queued(len(queued_ids))

        files: Iterable[Path] = iter_candidate_files(
            paths, follow_symlinks=settings.follow_symlinks
        )
        if on_registered is not None:
            files = _counting(files, on_registered)
        registered = register_paths(
            engine, files, settings, queue="bulk", pool=pool, on_chunk=chunk_done
        )
        drained = drain(engine, bundle, settings, pool, on_finished=on_finished)
    return registered, drained


def _counting(items: Iterable[Path], tick: Callable[[int], None]) -> Iterable[Path]:
    for item in items:
        tick(1)
        yield item


def watch_inbox(
    inbox: Path,
    settings: Settings,
    *,
    stop: threading.Event,
    on_event: Callable[[str], None] = log.info,
) -> None:
    """Follow ``inbox`` until ``stop`` is set: register complete files and process them."""
    engine = open_ledger(settings)
    bundle = load_bundle(settings.bundle)
    recover_leases(engine, settings)
    with (
        ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="bonewatch-io") as pool,
        InboxWatcher(
            inbox,
            poll=settings.poll,
            poll_interval=settings.poll_interval,
            settle_seconds=settings.settle_seconds,
            follow_symlinks=settings.follow_symlinks,
        ) as watcher,
    ):
        on_event(f"watching {inbox} ({'polling' if settings.poll else 'file events'})")
        last_sweep = 0.0
        unreadable: set[Path] = set()  # I/O errors at registration; offered again each sweep
        while not stop.is_set():
            files = watcher.ready(timeout=0.5)
            if files:
                reg = register_paths(engine, files, settings, queue="live", pool=pool)
                unreadable.update(reg.skipped_paths)
                on_event(
                    f"registered {reg.new} new file(s): {reg.duplicates} duplicate(s), "
                    f"{reg.refused} refused"
                )
            # Drain after new files, and now and then for rows whose lease expired elsewhere.
            if not files and time.monotonic() - last_sweep < IDLE_SWEEP_SECONDS:
                continue
            last_sweep = time.monotonic()
            if unreadable:
                retry = sorted(p for p in unreadable if p.exists())
                unreadable.clear()
                unreadable.update(
                    register_paths(engine, retry, settings, queue="live", pool=pool).skipped_paths
                )
            summary = drain(engine, bundle, settings, pool, stop=stop, wait_for_retries=False)
            if summary.finished:
                counts = count_by_status(engine)
                on_event(
                    f"finished {summary.finished} image(s); ledger: "
                    + ", ".join(f"{k} {v}" for k, v in counts.items() if v)
                )
