"""``bonewatch listen``: the DICOM listener wired to the ledger and, in embedded mode, to the
same runner as ``watch``.

The listener (``ingest.listener``) writes each instance and calls the registration callback
(:class:`Registrar`), which registers the file on the ``live`` queue through the watcher's own
:func:`register_paths` before the sender hears Success. Embedded mode then drains the queue
in-process (``runner.drain``, the watcher's loop); with a broker, new rows are published on
``live`` and ``bonewatch worker`` does the rest. Either way the loop also marks studies complete
once they have been quiet for ``BONEWATCH_STUDY_STABLE_SECONDS``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine

from bonewatch.db import count_by_status, mark_stable_studies
from bonewatch.ingest.listener import ListenerConfig, Received, StorageListener, TLSFiles
from bonewatch.worker.pipeline import (
    Pipeline,
    recover_leases,
    register_paths,
    serving_bundle,
    serving_pipeline,
)
from bonewatch.worker.runner import drain, enqueue_ledger, open_ledger
from bonewatch.worker.settings import Settings

log = logging.getLogger(__name__)

# How often the loop looks for studies that became complete, and for work it was not woken for.
SWEEP_SECONDS = 1.0
IDLE_DRAIN_SECONDS = 10.0
# Most received files registered in one ledger transaction.
REGISTER_BATCH = 64


def received_dir(settings: Settings) -> Path:
    """Where received instances go: ``DATA_DIR/received/<StudyUID>/<SOPUID>.dcm``."""
    return (settings.data_dir / "received").absolute()


def listener_config(settings: Settings, tls: TLSFiles | None = None) -> ListenerConfig:
    return ListenerConfig(
        received_dir=received_dir(settings),
        host=settings.dicom_host,
        port=settings.dicom_port,
        ae_title=settings.dicom_ae_title,
        peers=settings.dicom_peers,
        max_associations=settings.dicom_max_associations,
        network_timeout=settings.dicom_network_timeout,
        acse_timeout=settings.dicom_acse_timeout,
        dimse_timeout=settings.dicom_dimse_timeout,
        min_free_bytes=settings.min_free_mb << 20,
        tls=tls,
    )


class Registrar:
    """The listener's callback: registers received files on ``live``, as the watcher does.

    Associations call it side by side; one thread registers what they hand it together, in one
    ledger transaction (a group commit), so they do not queue for the ledger's write lock one
    by one. A call returns only once its row is in the ledger; a file that cannot be read back,
    or a ledger that is down, raises, and that sender gets a failure status.
    """

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        pool: Executor,
        *,
        on_queued: Callable[[list[int]], None],
        most: int = REGISTER_BATCH,
        run_id: int | None = None,
    ) -> None:
        self.engine, self.settings, self.pool = engine, settings, pool
        self.on_queued = on_queued
        self.run_id = run_id
        self.most = most
        self._waiting: queue.Queue[tuple[Path, Future[None]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="bonewatch-registrar", daemon=True)
        self._thread.start()

    def __call__(self, received: Received) -> None:
        done: Future[None] = Future()
        self._waiting.put((received.path, done))
        # Bounded: a ledger that hangs makes this instance a failure, never a stuck association.
        done.result(timeout=self.settings.dicom_dimse_timeout)

    def close(self) -> None:
        self._waiting.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            item = self._waiting.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < self.most:
                try:
                    more = self._waiting.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._waiting.put(None)  # stop after this batch
                    break
                batch.append(more)
            self._register(batch)

    def _register(self, batch: list[tuple[Path, Future[None]]]) -> None:
        try:
            summary = register_paths(
                self.engine,
                [path for path, _ in batch],
                self.settings,
                queue="live",
                pool=self.pool,
                on_chunk=self.on_queued,
                run_id=self.run_id,
            )
        except BaseException as exc:  # the ledger is down: every sender of the batch hears it
            for _, done in batch:
                done.set_exception(exc)
            return
        unread = set(summary.skipped_paths)
        for path, done in batch:
            if path in unread:
                done.set_exception(OSError(f"{path} could not be read back for registration"))
            else:
                done.set_result(None)


@dataclass
class ListenSummary:
    stored: int = 0
    refused: int = 0
    finished: int = 0


def listen(
    settings: Settings,
    *,
    stop: threading.Event,
    tls: TLSFiles | None = None,
    process: bool = True,
    enqueue: Callable[[list[int]], None] | None = None,
    on_event: Callable[[str], None] = log.info,
    on_ready: Callable[[StorageListener], None] | None = None,
) -> ListenSummary:
    """Receive until ``stop`` is set; in embedded mode with ``process``, process as well.

    Args:
        settings: DICOM, data directory, ledger and (embedded) serving settings.
        stop: Set to end the listener; associations still open are aborted.
        tls: Certificate, key and optional client CA for TLS.
        process: Embedded mode: run the models in this process. False receives and registers
            only (another ``watch``/``process`` run or a later one does the work).
        enqueue: Distributed mode: publishes new row ids on ``live``.
        on_event: Progress lines (received, finished).
        on_ready: Called with the started listener (its bound address), before serving.

    Raises:
        ListenerError: the listener cannot start (address in use, peers, TLS files).
    """
    engine = enqueue_ledger(settings) if enqueue else open_ledger(settings)
    bundle = serving_bundle(settings) if process and enqueue is None else None
    if bundle is not None:
        recover_leases(engine, settings)
    wake = threading.Event()
    publish_lock = threading.Lock()  # associations register side by side; one publisher

    def queued(ids: list[int]) -> None:
        if not ids:
            return
        if enqueue is not None:
            with publish_lock:
                enqueue(ids)
        wake.set()

    summary = ListenSummary()
    with (
        ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="bonewatch-io") as pool,
        ThreadPoolExecutor(
            settings.dicom_max_associations, thread_name_prefix="bonewatch-register"
        ) as registrar,
        serving_pipeline(settings, engine, pool, bundle) as pipeline,
    ):
        if pipeline is not None:  # results back to PACS, in a thread of their own
            from bonewatch.worker.delivery import start_sender

            start_sender(settings, stop)
        from bonewatch.worker.runs import listen_run

        run_id = listen_run(engine, settings, received_dir(settings))  # one run, for good
        register = Registrar(engine, settings, registrar, on_queued=queued, run_id=run_id)
        try:
            listener = StorageListener(listener_config(settings, tls), register).start()
        except BaseException:
            register.close()
            raise
        try:
            if on_ready is not None:
                on_ready(listener)
            host, port = listener.address
            mode = (
                "publishing on live"
                if enqueue is not None
                else "processing in-process"
                if pipeline is not None
                else "receive and register only"
            )
            on_event(
                f"listening on {host}:{port} as {settings.dicom_ae_title}"
                f"{' (TLS)' if tls else ''}, {mode}; peers: {listener.policy.describe()}"
            )
            summary.finished = _serve(listener, pipeline, engine, settings, stop, wake, on_event)
        finally:
            listener.stop()
            register.close()
            summary.stored = listener.counters.stored
            summary.refused = listener.counters.refused
    return summary


def _serve(
    listener: StorageListener,
    pipeline: Pipeline | None,
    engine: Engine,
    settings: Settings,
    stop: threading.Event,
    wake: threading.Event,
    on_event: Callable[[str], None],
) -> int:
    """The loop: drain when woken (or now and then), mark quiet studies complete, report."""
    from bonewatch.worker.pipeline import transient_errors

    finished = 0
    reported = 0
    last_drain = 0.0
    while not stop.is_set():
        woken = wake.wait(timeout=SWEEP_SECONDS)
        wake.clear()
        stored = listener.counters.stored
        if stored != reported:
            on_event(f"received {stored - reported} instance(s) ({stored} in all)")
            reported = stored
        try:
            mark_stable_studies(engine, settings.study_stable_seconds)
            due = woken or time.monotonic() - last_drain >= IDLE_DRAIN_SECONDS
            if pipeline is not None and due:
                last_drain = time.monotonic()
                done = drain(pipeline, stop=stop, wait_for_retries=False).finished
                finished += done
                if done:
                    counts = count_by_status(engine)
                    on_event(
                        f"finished {done} image(s); ledger: "
                        + ", ".join(f"{k} {v}" for k, v in counts.items() if v)
                    )
        except transient_errors() as exc:
            # The listener keeps answering (with failures while the ledger is down).
            log.error("ledger unavailable (%s); trying again shortly", exc)
            stop.wait(SWEEP_SECONDS)
    return finished
