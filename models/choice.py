"""``auto`` precision: which engine and precision serve a bundle here, by measuring them.

The fastest way to run a model depends on the CPU: with the same DenseNet121 on two 2-core
machines, OpenVINO bf16 was the fastest bare on one (an Intel Xeon with AMX) and OpenVINO int8
on the other (an AMD EPYC with VNNI and no AMX; docs/throughput.md has the figures). A rule
written on one machine is wrong on the next, so ``BONEWATCH_PRECISION=auto`` measures instead:

1. The candidates are every engine the request allows (``BONEWATCH_ENGINE``; ``auto`` is ONNX
   Runtime and OpenVINO where each is installed) in every precision the bundle and the CPU have:
   fp32, int8 where ``bundle quantize`` added int8 models, bf16 on OpenVINO where the CPU has
   native bfloat16.
2. Each candidate loads the stage-1 model and passes its parity check first (the same check the
   whole bundle passes at load: int8 against fp32 within the slack of the gap recorded when it was
   quantized, OpenVINO against ONNX Runtime within :data:`~bonewatch.models.bundle.LOAD_PARITY`);
   one that fails is never chosen.
3. The rest each run stage 1 for :data:`TRIAL_SECONDS` on the serving streams, and are ranked by
   images per second. :func:`~bonewatch.models.bundle.load_bundle` loads the first; if one of
   its other models fails the check, the next.

The ranking is kept in a small JSON file (``BONEWATCH_CACHE_DIR``), keyed by the bundle's
digest, the CPU, the serving threads and the engines' versions, so the processes of one host
agree and later starts skip the measurement. The choice is logged, and each prediction records
it (``engine``: ``openvino/int8``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import platform
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bonewatch.models.engines import (
    AUTO,
    InferenceThreads,
    Predictor,
    cpu_supports_bf16,
    onnxruntime_available,
    openvino_available,
)
from bonewatch.models.extras import installed_versions

log = logging.getLogger(__name__)

# How long each candidate runs stage 1 once warm; at least MIN_TRIAL_CALLS calls per stream.
TRIAL_SECONDS = 0.3
MIN_TRIAL_CALLS = 3
# Untimed calls per stream first: OpenVINO bf16 ran its second and third calls slower than later
# ones (43 against 53-54 images/s over the first 0.3 s after one call).
WARM_UP_CALLS = 3
CACHE_FILE = "serving-choice.json"
# Entries the cache file keeps (the newest): one per bundle, host and thread layout.
CACHE_ENTRIES = 64


@dataclass(frozen=True)
class Trial:
    """One candidate's measurement: stage 1's images per second here, or why it was refused."""

    engine: str
    precision: str
    img_s: float | None
    refused: str | None = None

    @property
    def served_as(self) -> str:
        return f"{self.engine}/{self.precision}"


def candidates(manifest: Any, engine: str) -> list[tuple[str, str]]:
    """The (engine, precision) pairs ``auto`` precision chooses among for ``engine``."""
    from bonewatch.models.bundle import resolve_engine

    if engine == AUTO and manifest.has_onnx():
        engines = [
            name
            for name, present in (
                ("onnx", onnxruntime_available()),
                ("openvino", openvino_available()),
            )
            if present
        ]
        if not engines:
            engines = [resolve_engine(manifest, AUTO)]
    else:
        engines = [resolve_engine(manifest, engine)]
    out = []
    for name in engines:
        out.append((name, "fp32"))
        if name in ("onnx", "openvino") and manifest.has_int8():
            out.append((name, "int8"))
        if name == "openvino" and cpu_supports_bf16():
            out.append((name, "bf16"))
    return out


def _cpu_identity() -> str:
    """The CPU model and its flags (what decides which kernels run), or the platform's name."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "flags", "Features", "CPU part") and key not in fields:
            fields[key] = value.strip()
        if not line.strip() and fields:
            break
    return json.dumps(fields, sort_keys=True) or platform.machine()


def cache_key(
    digest: str, pairs: list[tuple[str, str]], threads: Callable[[str], InferenceThreads]
) -> str:
    """What a kept ranking is valid for: the bundle, the candidates, the threads, CPU, versions."""
    layout = {e: asdict(threads(e)) for e, _ in pairs}
    text = json.dumps(
        {
            "bundle": digest,
            "candidates": pairs,
            "threads": layout,
            "cpu": _cpu_identity(),
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0,
            "versions": installed_versions("onnxruntime", "openvino"),
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


_file_lock = threading.Lock()


def _read_cache(cache_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((cache_dir / CACHE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.info("engine choice cache %s unreadable, measuring again: %s", cache_dir, exc)
        return {}
    return data if isinstance(data, dict) else {}


def kept_trials(cache_dir: Path | None, key: str) -> list[Trial] | None:
    """The ranking kept for ``key``, or None."""
    if cache_dir is None:
        return None
    with _file_lock:
        entry = _read_cache(cache_dir).get(key)
    if not isinstance(entry, dict):
        return None
    try:
        return [Trial(**t) for t in entry["trials"]]
    except (KeyError, TypeError):
        return None


def keep_trials(cache_dir: Path | None, key: str, trials: list[Trial]) -> None:
    """Keep ``trials`` for ``key`` (one rename: readers see the old file or the new one)."""
    if cache_dir is None:
        return
    with _file_lock:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            data = _read_cache(cache_dir)
            data[key] = {
                "measured": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "trials": [asdict(t) for t in trials],
            }
            newest = sorted(data, key=lambda k: str(data[k].get("measured", "")))[-CACHE_ENTRIES:]
            tmp = cache_dir / f".{CACHE_FILE}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps({k: data[k] for k in newest}, indent=1), encoding="utf-8")
            os.replace(tmp, cache_dir / CACHE_FILE)
        except OSError as exc:
            log.info("engine choice not kept in %s: %s", cache_dir, exc)


def stage1_rate(predictor: Predictor, spec: Any, streams: int) -> float:
    """Images per second of ``predictor`` on ``streams`` threads, each calling it with its pass
    size for :data:`TRIAL_SECONDS` after :data:`WARM_UP_CALLS` untimed ones (OpenVINO makes a
    thread's infer request on its first call, and ONNX Runtime its kernels)."""
    n = max(1, predictor.forward_batch or 1)
    rng = np.random.default_rng(0)
    x = rng.random((n, spec.input_size, spec.input_size, spec.channels), dtype=np.float32)
    streams = max(1, streams)
    barrier = threading.Barrier(streams)
    clock = threading.Lock()
    window: list[float] = []  # start, deadline: set by the first thread past the barrier

    def run(_: int) -> int:
        for _warm in range(WARM_UP_CALLS):
            predictor(x)
        barrier.wait()
        with clock:
            if not window:
                now = time.perf_counter()
                window.extend((now, now + TRIAL_SECONDS))
        calls = 0
        while calls < MIN_TRIAL_CALLS or time.perf_counter() < window[1]:
            predictor(x)
            calls += 1
        return calls

    with ThreadPoolExecutor(streams, thread_name_prefix="engine-trial") as pool:
        calls = sum(pool.map(run, range(streams)))
    elapsed = time.perf_counter() - window[0]
    return calls * n / elapsed


def measure(
    root: Path,
    manifest: Any,
    pairs: list[tuple[str, str]],
    threads: Callable[[str], InferenceThreads],
    fastest: dict[tuple[str, str], Any] | None = None,
) -> list[Trial]:
    """Every candidate's stage-1 parity check and images per second, fastest first; refused
    ones last, with the reason.

    With ``fastest``, the fastest candidate's stage-1 predictor is left in it under its
    (engine, precision), so that serving it does not load and compile the model again.
    """
    from bonewatch.models.bundle import BundleError, _load_onnx, role_check

    entry = manifest.body_part
    trials = []
    best = 0.0
    for engine, precision in pairs:
        try:
            predictor = _load_onnx(root, entry, threads(engine), engine, precision)
            _gap, refused = role_check(root, "body_part", entry, predictor, precision)
        except BundleError as exc:
            refused = str(exc)
        if refused is not None:
            trials.append(Trial(engine, precision, None, refused))
            continue
        rate = round(stage1_rate(predictor, entry.spec, threads(engine).streams), 2)
        trials.append(Trial(engine, precision, rate))
        if fastest is not None and rate > best:
            best = rate
            fastest.clear()  # the slower one's model is freed
            fastest[(engine, precision)] = predictor
        del predictor
    return ranked(trials)


def ranked(trials: list[Trial]) -> list[Trial]:
    """Served candidates fastest first, then the refused ones."""
    return sorted(trials, key=lambda t: (t.img_s is None, -(t.img_s or 0.0)))


def describe(trials: list[Trial]) -> str:
    """One line: each candidate's images per second, or why it was refused."""
    return ", ".join(
        f"{t.served_as} {t.img_s:.1f}" if t.img_s is not None else f"{t.served_as} refused"
        for t in trials
    )


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/bonewatch``, else ``~/.cache/bonewatch``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bonewatch"


__all__ = [
    "Trial",
    "cache_key",
    "candidates",
    "default_cache_dir",
    "describe",
    "keep_trials",
    "kept_trials",
    "measure",
    "ranked",
    "stage1_rate",
]
