"""Figures counted in a ledger: registration's rate and ``bonewatch process`` end to end."""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from bonewatch.bench.child import bonewatch_command, child_env, run_child
from bonewatch.bench.config import BENCH_SALT, BenchConfig, BenchError
from bonewatch.bench.inputs import write_small_files
from bonewatch.db import make_engine, query_results
from bonewatch.ingest import iter_candidate_files
from bonewatch.worker.pipeline import register_paths
from bonewatch.worker.runner import open_ledger
from bonewatch.worker.settings import Settings


@dataclass
class LedgerRun:
    """One run through the ledger: images per second, its wall time and peak memory."""

    img_s: float
    wall_s: float
    peak_rss_mb: float | None


def peak(runs: Sequence[LedgerRun]) -> float | None:
    """The highest resident-memory mark over ``runs`` (None where none could be read)."""
    return max((r.peak_rss_mb for r in runs if r.peak_rss_mb is not None), default=None)


def span_s(rows: list[dict[str, Any]]) -> float:
    """Seconds from the first row's registration to the last row's result."""
    created = [datetime.fromisoformat(str(r["created_at"])) for r in rows]
    finished = [datetime.fromisoformat(str(r["finished_at"])) for r in rows if r["finished_at"]]
    if not finished:
        raise BenchError("no row has a finished_at time")
    return max((max(finished) - min(created)).total_seconds(), 1e-6)


def check_all_done(rows: list[dict[str, Any]], expected: int, what: str, log: str) -> None:
    """Raise :class:`BenchError` unless ``rows`` are ``expected`` rows, all done."""
    done = sum(1 for r in rows if r["status"] == "done")
    if len(rows) != expected or done != expected:
        counts: dict[str, int] = {}
        for r in rows:
            counts[str(r["status"])] = counts.get(str(r["status"]), 0) + 1
        raise BenchError(
            f"{what}: expected {expected} done rows, the ledger has {counts}; the run's log "
            f"ends with:\n{log}"
        )


def measure_registration(work: Path, count: int, config: BenchConfig) -> float:
    """Files per second through ``process``'s registration (walk, header, sha256, insert)."""
    folder = work / "small-files"
    write_small_files(folder, count, seed=config.seed)
    settings = Settings(
        data_dir=work / "register-ledger",
        phi_salt=BENCH_SALT,
        decode_workers=config.decode_workers,
        database_url=None,
    )
    engine = open_ledger(settings)
    try:
        with ThreadPoolExecutor(settings.decode_workers) as pool:
            start = time.perf_counter()
            summary = register_paths(
                engine, iter_candidate_files([folder]), settings, queue="bulk", pool=pool
            )
            elapsed = time.perf_counter() - start
    finally:
        engine.dispose()
    if summary.new != count:
        raise BenchError(f"registration: {summary.new} of {count} files got a new row")
    return count / elapsed


def measure_embedded(
    work: Path, images: Path, count: int, bundle: Path, config: BenchConfig, *, tag: str = ""
) -> LedgerRun:
    """``bonewatch process`` on the folder, in a subprocess, into a fresh SQLite ledger."""
    data_dir = work / f"embedded-data{tag}"
    shutil.rmtree(data_dir, ignore_errors=True)
    run = run_child(
        bonewatch_command("process", str(images)),
        child_env(config, bundle, data_dir=str(data_dir)),
        work / f"embedded{tag}.log",
    )
    if run.returncode != 0:
        raise BenchError(f"bonewatch process exited {run.returncode}:\n{run.tail()}")
    engine = make_engine(f"sqlite:///{(data_dir / 'bonewatch.sqlite').resolve()}")
    try:
        rows = query_results(engine)
    finally:
        engine.dispose()
    check_all_done(rows, count, "embedded", run.tail())
    return LedgerRun(count / span_s(rows), run.wall_s, run.max_rss_mb)
