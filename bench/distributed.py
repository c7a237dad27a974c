"""The distributed figure: the bench's folder through Redis, PostgreSQL and Celery workers."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from bonewatch.bench.child import CHILD_TIMEOUT_S, bonewatch_command, child_env, run_child
from bonewatch.bench.config import BenchConfig, BenchError, Report
from bonewatch.bench.figures import median, ratio, rounded
from bonewatch.bench.inputs import write_phantoms
from bonewatch.bench.ledger import LedgerRun, check_all_done, span_s
from bonewatch.db import (
    FINAL_STATUSES,
    count_by_status,
    create_database,
    make_engine,
    query_results,
)

DISTRIBUTED_START_TIMEOUT_S = 300.0


def distributed_unavailable(config: BenchConfig) -> str | None:
    """Why the distributed figure cannot be measured here, or None when it can."""
    if config.distributed_workers == 0:
        return "skipped (--distributed-workers 0)"
    for module in ("bonewatch.worker.distributed", "bonewatch.worker.distributed.celery_app"):
        if _missing(module):
            return f"distributed mode is not installed ({module} is missing)"
    try:
        import redis

        redis.Redis.from_url(config.broker_url, socket_connect_timeout=2).ping()
    except Exception as exc:
        return f"Redis at {config.broker_url} is not reachable: {exc}"
    try:
        ensure_database(config.distributed_database_url)
    except Exception as exc:
        return f"PostgreSQL at {config.distributed_database_url} is not reachable ({exc})"
    return None


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ImportError:  # a parent package that cannot be imported (Celery is not installed)
        return True


def ensure_database(url: str) -> None:
    """Connect to the bench's PostgreSQL database, creating it first if the server lacks it.

    Raises:
        sqlalchemy.exc.OperationalError: the server does not answer, or refuses the creation.
    """
    create_database(url)
    engine = make_engine(url)
    try:
        with engine.connect():
            pass
    finally:
        engine.dispose()


def _final(counts: dict[str, int]) -> int:
    return sum(n for status, n in counts.items() if status in FINAL_STATUSES)


def _wait_settled(engine: Engine, target_final: int, deadline: float, what: str) -> None:
    """Poll the ledger until ``target_final`` rows are final and nothing is queued or leased."""
    while True:
        counts = count_by_status(engine)
        if _final(counts) >= target_final and not counts["queued"] and not counts["processing"]:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: the ledger did not settle in time: {counts}")
        time.sleep(0.2)


@contextlib.contextmanager
def _celery_workers(
    work: Path, env: dict[str, str], workers: int
) -> Iterator[subprocess.Popen[bytes]]:
    log_file = (work / "distributed-worker.log").open("wb")
    proc = subprocess.Popen(
        bonewatch_command("worker", "--queues", "live,bulk", "--concurrency", str(workers)),
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the pool children stop with it
    )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log_file.close()


def measure_distributed(
    work: Path, count: int, bundle: Path, config: BenchConfig, report: Report
) -> LedgerRun:
    """The same folder through ``process`` (enqueue only) and ``bonewatch worker`` children.

    A warm-up set goes through first, so the workers' start-up (TensorFlow, the bundle) is not
    counted; then throughput runs from the first registration of the timed set to its last
    result, as for the embedded figure.
    """
    processes = config.distributed_workers
    if not processes:
        raise ValueError("the distributed figure needs at least one worker process")
    env = child_env(
        config,
        bundle,
        broker_url=config.broker_url,
        database_url=config.distributed_database_url,
        data_dir=str(work / "distributed-data"),
    )
    upgrade = run_child(bonewatch_command("db", "upgrade"), env, work / "distributed-db.log")
    if upgrade.returncode != 0:
        raise BenchError(f"bonewatch db upgrade exited {upgrade.returncode}:\n{upgrade.tail()}")
    # Fresh content on every run: the shared ledger would take repeats as duplicates.
    run_seed = secrets.randbits(48)
    warmup = work / "distributed-warmup"
    write_phantoms(warmup, 4, px=config.image_px, seed=run_seed, input_format=config.input_format)
    images = work / "distributed-images"
    report(f"distributed: writing {count} phantoms ({config.input_format})")
    write_phantoms(
        images, count, px=config.image_px, seed=run_seed + 1, input_format=config.input_format
    )
    engine = make_engine(config.distributed_database_url)
    try:
        with _celery_workers(work, env, processes) as workers:
            before = _final(count_by_status(engine))
            report(f"distributed: starting {processes} worker process(es)")
            enqueue = run_child(
                bonewatch_command("process", str(warmup)), env, work / "distributed-warmup.log"
            )
            if enqueue.returncode != 0:
                raise BenchError(f"bonewatch process exited {enqueue.returncode}")
            _wait_settled(
                engine, before + 4, time.monotonic() + DISTRIBUTED_START_TIMEOUT_S, "warm-up"
            )
            if workers.poll() is not None:
                raise BenchError(f"bonewatch worker exited {workers.returncode}")
            report(f"distributed: {count} images")
            since = datetime.now().astimezone()
            before = _final(count_by_status(engine))
            start = time.perf_counter()
            enqueue = run_child(
                bonewatch_command("process", str(images)), env, work / "distributed-process.log"
            )
            if enqueue.returncode != 0:
                raise BenchError(
                    f"bonewatch process exited {enqueue.returncode}:\n{enqueue.tail()}"
                )
            _wait_settled(engine, before + count, time.monotonic() + CHILD_TIMEOUT_S, "timed set")
            wall = time.perf_counter() - start
        rows = [
            r
            for r in query_results(engine, since=since)
            if str(r["path"]).startswith(str(images.resolve()))
        ]
    finally:
        engine.dispose()
    check_all_done(rows, count, "distributed", "")
    return LedgerRun(count / span_s(rows), wall, None)


def measure_scaling(
    work: Path, bundle: Path, config: BenchConfig, report: Report
) -> dict[int, list[float]]:
    """The distributed figure for each of ``config.scale_workers``, counts taking turns.

    Returns:
        Images per second of every run by worker-process count (empty without counts).
    """
    runs: dict[int, list[float]] = {n: [] for n in config.scale_workers}
    for rep in range(config.repeats if runs else 0):
        for n in runs:
            report(f"distributed {rep + 1}/{config.repeats}: {n} worker process(es)")
            run = measure_distributed(
                work, config.images, bundle, replace(config, distributed_workers=n), report
            )
            runs[n].append(run.img_s)
    return runs


def scaling_report(
    scaling: dict[int, list[float]], bare_img_s: float | None
) -> list[dict[str, Any]]:
    """One row per worker-process count: its median, runs, and ratios to bare and the first."""
    if not scaling:
        return []
    first = median(next(iter(scaling.values())))
    rows = []
    for n, runs in scaling.items():
        img_s = median(runs)
        rows.append(
            {
                "workers": n,
                "img_s": rounded(img_s),
                "runs_img_s": [rounded(r) for r in runs],
                "vs_bare": ratio(img_s, bare_img_s),
                "vs_first": ratio(img_s, first),
            }
        )
    return rows
