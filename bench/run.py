"""``bonewatch bench``: throughput against the engine's limit and against seed-style serving.

One run builds a random two-stage bundle (``models.benchmark``), writes phantom PNGs of about
512 px like MURA's, and measures on the same machine:

- ``bare``: both stages' batched forward passes on preprocessed tensors, for every engine the
  bundle has (the limit);
- ``seed_style``: read each file, then ``model.predict`` on a batch of one per stage;
- ``embedded``: files in a folder to rows in SQLite through a ``bonewatch process`` subprocess,
  for every engine the bundle has (``--one-engine``: the chosen one only);
- ``distributed``: the same through Redis, PostgreSQL and ``bonewatch worker`` subprocesses,
  when distributed mode is installed and both servers answer (null otherwise, with the reason);
- ``register_files_s``: how fast ``process`` registers files, on many small files.

Throughput through the ledger is counted from the first image's registration to the last one's
result (``created_at`` and ``finished_at`` in the ledger), so the interpreter's start-up and the
bundle load are left out; they are reported apart as ``embedded_wall_s``.

Bare, seed-style and embedded figures are medians of ``--repeats`` runs. Within each repetition
every engine's embedded run is followed by its bare pass, and the engines take turns, so that a
machine whose speed drifts (shared hosts do) slows every figure alike.

``--rss-track`` is a separate mode: one long ``process`` run whose resident memory is sampled
against the number of images finished, to show that it stays flat.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine

from bonewatch.db import FINAL_STATUSES, count_by_status, make_engine, query_results
from bonewatch.ingest import iter_candidate_files, read_image, write_png
from bonewatch.models.benchmark import SeedStyleServer, build_random_bundle, forward_two_stage
from bonewatch.models.bundle import Bundle, load_bundle, read_manifest, resolve_engine, servable_engines
from bonewatch.models.engines import (
    InferenceThreads,
    available_cores,
    configure_tensorflow_threads,
    default_streams,
    onnxruntime_available,
)
from bonewatch.models.phantoms import PARTS, draw_phantom
from bonewatch.models.preprocess import preprocess_batch
from bonewatch.worker.pipeline import register_paths
from bonewatch.worker.runner import open_ledger
from bonewatch.worker.settings import Settings

log = logging.getLogger(__name__)

Report = Callable[[str], None]

BENCH_SALT = "bonewatch-bench"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/14"
DEFAULT_DISTRIBUTED_DB = "postgresql+psycopg://postgres@127.0.0.1:5432/bonewatch_bench"
# Bare passes run on at most this many preprocessed images (224 px RGB: 600 KB each).
BARE_MAX_IMAGES = 512
RSS_CHECKPOINT = 1000
RSS_FLAT_TOLERANCE = 0.10
CHILD_TIMEOUT_S = 3600.0
DISTRIBUTED_START_TIMEOUT_S = 300.0
# The keys every bench report has; tests check them.
REPORT_KEYS = (
    "engine",
    "bare_img_s",
    "seed_style_img_s",
    "embedded_img_s",
    "distributed_img_s",
    "embedded_vs_bare",
    "embedded_vs_seed_style",
    "peak_rss_mb",
    "register_files_s",
)


class BenchError(RuntimeError):
    """A bench step did not do what it measures (a run failed, rows are missing)."""


@dataclass(frozen=True)
class BenchConfig:
    """What to measure, and the worker settings it runs with."""

    images: int = 200
    backbone: str = "densenet121"
    input_size: int = 224
    engine: str = "auto"
    batch_size: int = 16
    decode_workers: int = 2
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    inference_streams: int = 0  # 0: the engine's default (models.engines.default_streams)
    forward_batch: int = 0  # 0: the engine's default (models.engines.cpu_pass_size on a CPU)
    image_px: int = 512
    seed_style_images: int = 32
    register_files: int = 2000
    distributed_workers: int | None = None  # None: as `bonewatch worker` starts; 0: skipped
    scale_workers: tuple[int, ...] = ()  # worker-process counts whose distributed figures scale
    broker_url: str = DEFAULT_BROKER_URL
    distributed_database_url: str = DEFAULT_DISTRIBUTED_DB
    seed: int = 0
    repeats: int = 3  # bare, seed-style and embedded runs per engine; medians are reported
    compare_engines: bool = True  # embedded runs on every engine the bundle has, not just one

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> BenchConfig:
        """A config that runs the worker with ``settings``' batch, decode and thread values."""
        base: dict[str, Any] = {
            "engine": settings.engine,
            "batch_size": settings.batch_size,
            "decode_workers": settings.decode_workers,
            "intra_op_threads": settings.intra_op_threads,
            "inter_op_threads": settings.inter_op_threads,
            "inference_streams": settings.inference_streams,
            "forward_batch": settings.forward_batch,
        }
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def threads_for(self, engine: str) -> InferenceThreads:
        """The framework threads the embedded worker gets on ``engine``."""
        threads = InferenceThreads(
            self.intra_op_threads, self.inter_op_threads, self.inference_streams, self.forward_batch
        )
        return threads.for_engine(engine)


# ------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------


def _phantom_path(folder: Path, index: int) -> Path:
    """MURA layout, three images per study, parts in runs as an archive walk meets them."""
    study = index // 3
    part = PARTS[(study // 4) % len(PARTS)]
    return (
        folder
        / f"XR_{part}"
        / f"patient{study:05d}"
        / "study1_negative"
        / f"image{index % 3 + 1}.png"
    )


def _stamp(pixels: np.ndarray, index: int) -> np.ndarray:
    """A copy of ``pixels`` whose first pixels spell ``index``, so every file is distinct."""
    out = pixels.copy()
    for k in range(4):
        out[0, k] = ((index >> (8 * k)) & 0xFF) / 255.0
    return out


def write_phantoms(
    folder: Path,
    count: int,
    *,
    px: int = 512,
    seed: int = 0,
    distinct: int | None = None,
    workers: int = 2,
) -> list[Path]:
    """Write ``count`` phantom PNGs of the seven parts under ``folder`` in MURA layout.

    With ``distinct``, only that many phantoms are drawn and the rest are stamped copies of them
    (distinct bytes, so none is a duplicate): drawing is the slow part of writing 10,000 files.

    Returns:
        The paths in walk order.
    """
    pool_size = count if distinct is None else min(distinct, count)

    def draw(i: int) -> np.ndarray:
        rng = np.random.default_rng([seed, i])
        part = PARTS[(i // 3 // 4) % len(PARTS)]
        return draw_phantom(part, fractured=bool(rng.random() < 0.5), rng=rng, size=px).pixels

    base: list[np.ndarray] = []
    if distinct is not None:
        with ThreadPoolExecutor(workers) as pool:
            base = list(pool.map(draw, range(pool_size)))

    def write(i: int) -> Path:
        path = _phantom_path(folder, i)
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = draw(i) if distinct is None else _stamp(base[i % pool_size], i)
        write_png(path, pixels)
        return path

    with ThreadPoolExecutor(workers) as pool:
        paths = list(pool.map(write, range(count)))
    return sorted(paths)


def write_small_files(folder: Path, count: int, *, seed: int = 0) -> None:
    """``count`` distinct 16x16 PNGs: registration's cost is per file, not per pixel."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        sub = folder / f"batch{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        write_png(sub / f"file{i:06d}.png", _stamp(rng.random((16, 16), np.float32), i))


# ------------------------------------------------------------------------------------------
# Child processes
# ------------------------------------------------------------------------------------------


@dataclass
class ChildRun:
    returncode: int
    wall_s: float
    max_rss_mb: float | None
    log_path: Path

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def bonewatch_command(*args: str) -> list[str]:
    """The ``bonewatch`` command line run with this interpreter."""
    return [sys.executable, "-m", "bonewatch", *args]


def child_env(config: BenchConfig, bundle: Path, **settings: str) -> dict[str, str]:
    """The environment of a bench child: the caller's, with bonewatch's settings replaced."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BONEWATCH_")}
    env.update(
        {
            "BONEWATCH_BUNDLE": str(bundle),
            "BONEWATCH_ENGINE": config.engine,
            "BONEWATCH_BATCH_SIZE": str(config.batch_size),
            "BONEWATCH_DECODE_WORKERS": str(config.decode_workers),
            "BONEWATCH_INTRA_OP_THREADS": str(config.intra_op_threads),
            "BONEWATCH_INTER_OP_THREADS": str(config.inter_op_threads),
            "BONEWATCH_INFERENCE_STREAMS": str(config.inference_streams),
            "BONEWATCH_FORWARD_BATCH": str(config.forward_batch),
            "BONEWATCH_PHI_SALT": BENCH_SALT,
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
    )
    env.update({f"BONEWATCH_{k.upper()}": v for k, v in settings.items()})
    return env


def run_child(
    command: list[str],
    env: dict[str, str],
    log_path: Path,
    *,
    on_tick: Callable[[int], None] | None = None,
    tick_s: float = 0.25,
    timeout_s: float = CHILD_TIMEOUT_S,
) -> ChildRun:
    """Run a command to its end; returns its exit code, wall time and peak resident memory.

    ``on_tick(pid)`` is called every ``tick_s`` while it runs ``command``. The peak is the
    child's own high-water mark (``VmHWM``), read while it runs: the kernel's figure for a
    reaped child also counts the pages it shared with this process between fork and exec.
    """
    start = time.perf_counter()
    peak: float | None = None
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                if time.perf_counter() - start > timeout_s:
                    raise BenchError(f"{' '.join(command)} ran past {timeout_s:.0f} s")
                hwm = _own_peak_rss_mb(proc.pid, command)
                if hwm is not None:
                    peak = max(peak or 0.0, hwm)
                    if on_tick is not None:
                        on_tick(proc.pid)
                time.sleep(tick_s)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    return ChildRun(proc.returncode, time.perf_counter() - start, peak, log_path)


def _proc_status_mb(pid: int, field: str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


def _own_peak_rss_mb(pid: int, command: list[str]) -> float | None:
    """The child's peak RSS once it runs ``command`` (before exec it is still a copy of us)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if [part.decode(errors="replace") for part in cmdline if part] != command:
        return None
    return _proc_status_mb(pid, "VmHWM")


def rss_mb(pid: int) -> float | None:
    """Resident memory of a live process, from /proc (Linux); None where it cannot be read."""
    return _proc_status_mb(pid, "VmRSS")


# ------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------


def _span_s(rows: list[dict[str, Any]]) -> float:
    """Seconds from the first row's registration to the last row's result."""
    created = [datetime.fromisoformat(str(r["created_at"])) for r in rows]
    finished = [datetime.fromisoformat(str(r["finished_at"])) for r in rows if r["finished_at"]]
    if not finished:
        raise BenchError("no row has a finished_at time")
    return max((max(finished) - min(created)).total_seconds(), 1e-6)


def _check_all_done(rows: list[dict[str, Any]], expected: int, what: str, log: str) -> None:
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


@dataclass
class LedgerRun:
    img_s: float
    wall_s: float
    peak_rss_mb: float | None


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
    _check_all_done(rows, count, "embedded", run.tail())
    return LedgerRun(count / _span_s(rows), run.wall_s, run.max_rss_mb)


def distributed_unavailable(config: BenchConfig) -> str | None:
    """Why the distributed figure cannot be measured here, or None when it can."""
    if config.distributed_workers == 0:
        return "skipped (--distributed-workers 0)"
    for module in ("bonewatch.worker.celery_app", "bonewatch.worker.distributed"):
        if importlib.util.find_spec(module) is None:
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


def ensure_database(url: str) -> None:
    """Connect to the bench's PostgreSQL database, creating it first if the server lacks it.

    Raises:
        sqlalchemy.exc.OperationalError: the server does not answer, or refuses the creation.
    """
    from sqlalchemy import create_engine, make_url, text
    from sqlalchemy.exc import OperationalError

    try:
        _connect_once(url)
        return
    except OperationalError as exc:
        database = make_url(url).database
        if not database or "does not exist" not in str(exc):
            raise
    admin = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            quoted = conn.dialect.identifier_preparer.quote(database)
            conn.execute(text(f"CREATE DATABASE {quoted}"))
        log.info("created the bench database %s", database)
    finally:
        admin.dispose()
    _connect_once(url)


def _connect_once(url: str) -> None:
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
    write_phantoms(warmup, 4, px=config.image_px, seed=run_seed)
    images = work / "distributed-images"
    report(f"distributed: writing {count} phantom PNGs")
    write_phantoms(images, count, px=config.image_px, seed=run_seed + 1)
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
    _check_all_done(rows, count, "distributed", "")
    return LedgerRun(count / _span_s(rows), wall, None)


def bare_pass(
    bundle: Bundle, x: np.ndarray, batch_size: int, streams: int = 1
) -> tuple[float, float]:
    """One timed pass over ``x``: images per second, and stage-2 groups per batch.

    With ``streams`` above 1, that many threads take the batches in turn, as the embedded
    worker's inference streams do.
    """
    starts = range(0, len(x), batch_size)
    start = time.perf_counter()
    with ThreadPoolExecutor(streams, thread_name_prefix="bench-bare") as pool:
        groups = sum(
            pool.map(lambda i: forward_two_stage(bundle, x[i : i + batch_size], batch_size), starts)
        )
    elapsed = time.perf_counter() - start
    return len(x) / elapsed, groups / len(starts)


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


def _scaling_report(
    scaling: dict[int, list[float]], bare_img_s: float | None
) -> list[dict[str, Any]]:
    if not scaling:
        return []
    first = _median(next(iter(scaling.values())))
    rows = []
    for n, runs in scaling.items():
        img_s = _median(runs)
        rows.append(
            {
                "workers": n,
                "img_s": _round(img_s),
                "runs_img_s": [_round(r) for r in runs],
                "vs_bare": _ratio(img_s, bare_img_s),
                "vs_first": _ratio(img_s, first),
            }
        )
    return rows


def bare_bundles(
    bundle_dir: Path, engines: Sequence[str], config: BenchConfig
) -> dict[str, Bundle]:
    """The bundle loaded here on each engine and warmed up, as the worker warms it up."""
    bundles = {
        name: load_bundle(bundle_dir, engine=name, threads=config.threads_for(name))
        for name in engines
    }
    for bundle in bundles.values():
        bundle.warm_up()
    return bundles


def measure_seed_style(bundle_dir: Path, files: list[Path], repeats: int = 1) -> list[float]:
    """Images per second reading each file and calling ``model.predict`` once per stage.

    Returns:
        One figure per pass over ``files``.
    """
    server = SeedStyleServer(bundle_dir)
    server.predict(read_image(files[0], salt=BENCH_SALT).pixels)  # builds predict's function
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for path in files:
            server.predict(read_image(path, salt=BENCH_SALT).pixels)
        runs.append(len(files) / (time.perf_counter() - start))
    return runs


def machine_description() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gb = round(int(line.split()[1]) / 1024**2, 1)
    return {
        "cores": available_cores(),
        "cpu": cpu,
        "memory_gb": memory_gb,
        "python": platform.python_version(),
    }


def _threads_report(threads: InferenceThreads, forward_batch: int) -> dict[str, int]:
    return {
        "intra_op": threads.resolved_intra_op(),
        "inter_op": threads.inter_op,
        "streams": threads.streams,
        "forward_batch": forward_batch,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


@dataclass
class _Work:
    root: Path
    keep: bool

    @classmethod
    def open(cls, root: Path | None) -> _Work:
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)
            return cls(root.resolve(), keep=True)
        return cls(Path(tempfile.mkdtemp(prefix="bonewatch-bench-")), keep=False)

    def close(self) -> None:
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)


def _phantom_set(folder: Path, config: BenchConfig, *, distinct: int | None) -> list[Path]:
    """The run's phantoms; a kept work folder that already holds the same set reuses it."""
    recipe = json.dumps(
        {"count": config.images, "px": config.image_px, "seed": config.seed, "distinct": distinct}
    )
    marker = folder / ".bench-phantoms"  # hidden: never registered as an input
    if marker.is_file() and marker.read_text() == recipe:
        return sorted(iter_candidate_files([folder]))
    shutil.rmtree(folder, ignore_errors=True)
    files = write_phantoms(
        folder, config.images, px=config.image_px, seed=config.seed, distinct=distinct
    )
    marker.write_text(recipe)
    return files


def _bundle(work: Path, config: BenchConfig, report: Report) -> Path:
    folder = work / f"bundle-{config.backbone}-{config.input_size}-seed{config.seed}"
    if (folder / "manifest.json").is_file():
        manifest = read_manifest(folder)
        if manifest.has_onnx() or not onnxruntime_available():
            return folder
    return build_random_bundle(
        folder,
        backbone=config.backbone,
        input_size=config.input_size,
        seed=config.seed,
        onnx=onnxruntime_available(),
        report=report,
    )


def _peak(runs: Sequence[LedgerRun]) -> float | None:
    """The highest resident-memory mark over ``runs`` (None where none could be read)."""
    return max((r.peak_rss_mb for r in runs if r.peak_rss_mb is not None), default=None)


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def run_bench(
    config: BenchConfig, *, work_dir: Path | None = None, report: Report = log.info
) -> dict[str, Any]:
    """Measure every figure in one run; returns the report (see :data:`REPORT_KEYS`).

    Bare, seed-style and embedded figures are medians of ``config.repeats`` runs; where several
    engines are measured they take turns, so a slow spell of the machine falls on all of them.
    """
    if config.images < 1:
        raise ValueError("images must be at least 1")
    if config.repeats < 1:
        raise ValueError("repeats must be at least 1")
    # Before anything runs TensorFlow here: bare passes get the worker's thread pools.
    configure_tensorflow_threads(config.threads_for("keras"))
    work = _Work.open(work_dir)
    try:
        load_before = os.getloadavg()[0]
        bundle_dir = _bundle(work.root, config, report)
        manifest = read_manifest(bundle_dir)
        engine = resolve_engine(manifest, config.engine)
        engines = servable_engines(manifest)
        workers = config.distributed_workers
        if workers is None:  # as many as `bonewatch worker` starts
            workers = default_streams(engine)
            config = replace(config, distributed_workers=workers)
        images = work.root / "images"
        report(f"phantoms: {config.images} PNGs of {config.image_px} px")
        files = _phantom_set(images, config, distinct=None)

        report(f"registration: {config.register_files} small files")
        shutil.rmtree(work.root / "small-files", ignore_errors=True)
        shutil.rmtree(work.root / "register-ledger", ignore_errors=True)
        register_s = measure_registration(work.root, config.register_files, config)

        spec = manifest.body_part.spec
        bare_files = files[:BARE_MAX_IMAGES]
        x = preprocess_batch([read_image(p, salt=BENCH_SALT).pixels for p in bare_files], spec)
        loaded = bare_bundles(bundle_dir, engines, config)
        embedded_engines = engines if config.compare_engines else [engine]
        embedded: dict[str, list[LedgerRun]] = {name: [] for name in embedded_engines}
        bare: dict[str, list[float]] = {name: [] for name in engines}
        groups = 0.0
        # Each engine's embedded run and its bare pass follow each other, and the engines take
        # turns: the machine's speed drifts (other tenants, clocks), and every figure should
        # meet the same drift.
        for rep in range(config.repeats):
            step = f"{rep + 1}/{config.repeats}"
            for name in engines:
                if name in embedded:
                    report(f"embedded {step}: bonewatch process on {config.images} images ({name})")
                    embedded[name].append(
                        measure_embedded(
                            work.root,
                            images,
                            config.images,
                            bundle_dir,
                            replace(config, engine=name),
                            tag=f"-{name}-{rep + 1}",
                        )
                    )
                report(f"bare {step}: {len(x)} preprocessed images ({name})")
                img_s, groups = bare_pass(
                    loaded[name], x, config.batch_size, config.threads_for(name).streams
                )
                bare[name].append(img_s)
        # Images per forward pass, as each engine settled it (0: the whole batch)
        per_pass = {name: bundle.body_part_model.forward_batch for name, bundle in loaded.items()}
        del x, loaded

        distributed_img_s: float | None = None
        scaling: dict[int, list[float]] = {}
        distributed_runs: list[float] = []
        why_not = distributed_unavailable(config)
        if why_not is None:
            # The figure's own worker count and any asked for take turns, --repeats times.
            counts = tuple(dict.fromkeys((*config.scale_workers, workers)))
            runs = measure_scaling(
                work.root, bundle_dir, replace(config, scale_workers=counts), report
            )
            distributed_runs = runs[workers]
            distributed_img_s = _median(distributed_runs)
            scaling = {n: runs[n] for n in config.scale_workers}
        else:
            report(f"distributed: not measured: {why_not}")

        seed_files = files[: max(1, min(config.seed_style_images, len(files)))]
        report(
            f"seed-style: model.predict per image per stage, {len(seed_files)} images, "
            f"{config.repeats} time(s)"
        )
        seed_runs = measure_seed_style(bundle_dir, seed_files, config.repeats)
        load_after = os.getloadavg()[0]
    finally:
        work.close()

    bare_by_engine = {name: _median(runs) for name, runs in bare.items()}
    embedded_by_engine = {name: _median([r.img_s for r in runs]) for name, runs in embedded.items()}
    bare_img_s = bare_by_engine.get(engine)
    embedded_img_s = embedded_by_engine[engine]
    seed_style = _median(seed_runs)
    chosen_runs = embedded[engine]
    peak_by_engine = {k: _peak(runs) for k, runs in embedded.items()}
    return {
        "engine": engine,
        "backbone": config.backbone,
        "input_size": config.input_size,
        "images": config.images,
        "image_px": config.image_px,
        "batch_size": config.batch_size,
        "decode_workers": config.decode_workers,
        "threads": _threads_report(config.threads_for(engine), per_pass[engine]),
        "threads_by_engine": {k: _threads_report(config.threads_for(k), per_pass[k]) for k in bare},
        "repeats": config.repeats,
        "bare_img_s": _round(bare_img_s),
        "bare_img_s_by_engine": {k: _round(v) for k, v in bare_by_engine.items()},
        "bare_runs_img_s": {k: [_round(v) for v in runs] for k, runs in bare.items()},
        "bare_images": min(config.images, BARE_MAX_IMAGES),
        "stage2_groups_per_batch": round(groups, 2),
        "seed_style_img_s": _round(seed_style),
        "seed_style_runs_img_s": [_round(v) for v in seed_runs],
        "seed_style_images": len(seed_files),
        "embedded_img_s": _round(embedded_img_s),
        "embedded_img_s_by_engine": {k: _round(v) for k, v in embedded_by_engine.items()},
        "embedded_runs_img_s": {k: [_round(r.img_s) for r in runs] for k, runs in embedded.items()},
        "embedded_wall_s": _round(_median([r.wall_s for r in chosen_runs])),
        "distributed_img_s": _round(distributed_img_s),
        "distributed_runs_img_s": [_round(r) for r in distributed_runs],
        "distributed_workers": config.distributed_workers
        if distributed_img_s is not None
        else None,
        "distributed_note": why_not,
        "embedded_vs_bare": _ratio(embedded_img_s, bare_img_s),
        "embedded_vs_seed_style": _ratio(embedded_img_s, seed_style),
        "distributed_vs_bare": _ratio(distributed_img_s, bare_img_s),
        "distributed_scaling": _scaling_report(scaling, bare_img_s),
        "onnx_vs_keras_bare": _ratio(bare_by_engine.get("onnx"), bare_by_engine.get("keras")),
        "onnx_vs_keras_embedded": _ratio(
            embedded_by_engine.get("onnx"), embedded_by_engine.get("keras")
        ),
        "peak_rss_mb": _round(peak_by_engine[engine]),
        "peak_rss_mb_by_engine": {k: _round(v) for k, v in peak_by_engine.items()},
        "register_files_s": _round(register_s),
        "register_files": config.register_files,
        "machine": machine_description(),
        "load_avg_1m": {"before": round(load_before, 2), "after": round(load_after, 2)},
    }


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(float(value), digits)


def run_rss_track(
    config: BenchConfig, *, work_dir: Path | None = None, report: Report = log.info
) -> dict[str, Any]:
    """One long ``process`` run; resident memory sampled against images finished.

    Returns:
        ``rss_mb_after_checkpoint`` (after 1,000 images), ``rss_mb_end``, the highest sample
        after the checkpoint, ``peak_rss_mb`` (the whole run's high-water mark), ``rss_growth``
        (end over checkpoint, minus one), ``rss_flat`` (end and highest within 10 % of the
        checkpoint) and the samples.
    """
    if config.images <= RSS_CHECKPOINT:
        raise ValueError(f"the RSS track needs more than {RSS_CHECKPOINT} images")
    work = _Work.open(work_dir)
    samples: list[tuple[int, float]] = []
    try:
        bundle_dir = _bundle(work.root, config, report)
        engine_name = resolve_engine(read_manifest(bundle_dir), config.engine)
        images = work.root / "rss-images"
        report(f"phantoms: {config.images} PNGs of {config.image_px} px")
        _phantom_set(images, config, distinct=64)
        data_dir = work.root / "rss-data"
        shutil.rmtree(data_dir, ignore_errors=True)
        ledger: Engine | None = None

        def sample(pid: int) -> None:
            nonlocal ledger
            rss = rss_mb(pid)
            db_file = data_dir / "bonewatch.sqlite"
            if rss is None or not db_file.is_file():
                return
            if ledger is None:
                ledger = make_engine(f"sqlite:///{db_file.resolve()}")
            try:
                counts = count_by_status(ledger)
            except Exception:  # the schema is still being created
                return
            samples.append((counts["done"] + counts["failed"] + counts["unsupported"], rss))

        report(f"processing {config.images} images ({engine_name}), sampling RSS")
        run = run_child(
            bonewatch_command("process", str(images)),
            child_env(config, bundle_dir, data_dir=str(data_dir)),
            work.root / "rss.log",
            on_tick=sample,
        )
        if ledger is not None:
            ledger.dispose()
        if run.returncode != 0:
            raise BenchError(f"bonewatch process exited {run.returncode}:\n{run.tail()}")
    finally:
        work.close()
    # The end is the last sample while images were still being processed: once the last one is
    # recorded the worker tears down and its memory falls, which says nothing about growth.
    after = [rss for finished, rss in samples if RSS_CHECKPOINT <= finished < config.images]
    if not after:
        raise BenchError("no memory sample was taken after the checkpoint; the run was too short")
    at_checkpoint, end, highest = after[0], after[-1], max(after)
    growth = end / at_checkpoint - 1.0
    growth_highest = highest / at_checkpoint - 1.0
    step = max(1, len(samples) // 25)
    return {
        "mode": "rss",
        "engine": engine_name,
        "backbone": config.backbone,
        "input_size": config.input_size,
        "images": config.images,
        "image_px": config.image_px,
        "checkpoint": RSS_CHECKPOINT,
        "rss_mb_after_checkpoint": round(at_checkpoint, 1),
        "rss_mb_end": round(end, 1),
        "peak_rss_mb": _round(run.max_rss_mb, 1),
        "rss_mb_highest_after_checkpoint": round(highest, 1),
        "rss_growth": round(growth, 4),
        "rss_growth_highest": round(growth_highest, 4),
        "rss_flat": abs(growth) <= RSS_FLAT_TOLERANCE and growth_highest <= RSS_FLAT_TOLERANCE,
        "wall_s": round(run.wall_s, 1),
        "samples": [[n, round(r, 1)] for n, r in samples[::step]],
        "machine": machine_description(),
    }
