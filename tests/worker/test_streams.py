"""Inference streams: the embedded worker runs several batches through the models at once."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import bonewatch.models.engines as engines
import bonewatch.worker.pipeline as pipeline
from bonewatch.db import count_by_status, query_results, release_leases
from bonewatch.ingest import write_png
from bonewatch.models.bundle import read_manifest, resolve_engine
from bonewatch.models.engines import InferenceThreads, default_streams
from bonewatch.worker.distributed import child_threads, worker_processes
from bonewatch.worker.pipeline import (
    inference_streams,
    limit_malloc_arenas,
    serving_threads,
    worker_id,
)
from bonewatch.worker.runner import open_ledger, process_paths
from bonewatch.worker.settings import DEMO_BUNDLE, Settings


def _inbox(root: Path, count: int) -> Path:
    root.mkdir(parents=True)
    for i in range(count):
        # bright images are ELBOW for the tiny bundle; each file distinct
        pixels = np.full((40, 40), 0.6 + 0.3 * i / count, np.float32)
        write_png(root / f"image{i:03d}.png", pixels)
    return root


def _outcomes(settings) -> dict[str, tuple[str, float | None]]:
    rows = query_results(open_ledger(settings))
    return {Path(str(r["path"])).name: (str(r["status"]), r["p_fracture"]) for r in rows}


def test_streams_run_batches_side_by_side_and_finish_each_image_once(
    tmp_path, settings, monkeypatch
):
    inbox = _inbox(tmp_path / "inbox", 24)
    threads_seen: set[str] = set()
    real = pipeline.infer_and_record

    def recording(*args, **kwargs):
        threads_seen.add(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "infer_and_record", recording)
    three = settings.model_copy(update={"inference_streams": 3, "batch_size": 2})
    registered, drained = process_paths([inbox], three)
    assert registered.new == 24 and drained.finished == 24 and drained.batches == 12
    assert len(threads_seen) > 1  # more than one stream took batches
    counts = count_by_status(open_ledger(three))
    assert counts["done"] == 24 and sum(counts.values()) == 24
    with_streams = _outcomes(three)

    one = settings.model_copy(
        update={"inference_streams": 1, "batch_size": 2, "data_dir": tmp_path / "one"}
    )
    process_paths([inbox], one)
    # The same predictions, whichever stream ran an image.
    expected = _outcomes(one)
    assert with_streams.keys() == expected.keys()
    for name, (status, p) in expected.items():
        assert with_streams[name][0] == status
        assert with_streams[name][1] == pytest.approx(p, abs=1e-6)


def test_a_failing_stream_ends_the_run_and_a_new_run_finishes_the_rest(
    tmp_path, settings, monkeypatch
):
    inbox = _inbox(tmp_path / "inbox", 16)
    real = pipeline.infer_and_record
    calls = {"n": 0}
    lock = threading.Lock()

    def failing_second(*args, **kwargs):
        with lock:
            calls["n"] += 1
            n = calls["n"]
        if n == 2:
            raise RuntimeError("the disk under the ledger is full")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "infer_and_record", failing_second)
    two = settings.model_copy(update={"inference_streams": 2, "batch_size": 2})
    with pytest.raises(RuntimeError, match="disk under the ledger"):
        process_paths([inbox], two)
    counts = count_by_status(open_ledger(two))
    assert 0 < counts["done"] < 16

    # Rows the failed run had claimed stay leased to it; once it is gone a new run takes them
    # back (here: released as a dead worker's are), and every image ends done exactly once.
    release_leases(open_ledger(two), [worker_id()], max_attempts=None)
    monkeypatch.setattr(pipeline, "infer_and_record", real)
    process_paths([inbox], two)
    rows = query_results(open_ledger(two))
    assert len(rows) == 16 and {r["status"] for r in rows} == {"done"}
    assert count_by_status(open_ledger(two))["done"] == 16


def test_onnx_runs_a_stream_per_core_and_keras_one(monkeypatch):
    monkeypatch.setattr(engines, "available_cores", lambda: 8)
    assert default_streams("onnx") == engines.MAX_AUTO_STREAMS == 4
    assert default_streams("keras") == 1
    monkeypatch.setattr(engines, "available_cores", lambda: 2)
    assert default_streams("onnx") == 2
    # The cores are divided among the streams unless the thread count is set.
    assert InferenceThreads(streams=2).resolved_intra_op() == 1
    assert InferenceThreads(streams=1).resolved_intra_op() == 2
    assert InferenceThreads(intra_op=3, streams=2).resolved_intra_op() == 3
    monkeypatch.setattr(engines, "available_cores", lambda: 1)
    assert default_streams("onnx") == 1
    assert InferenceThreads(streams=4).resolved_intra_op() == 1


def test_streams_follow_the_settings_and_the_engine(settings, monkeypatch):
    monkeypatch.setattr(engines, "available_cores", lambda: 2)
    assert inference_streams(settings, "onnx") == 2
    assert inference_streams(settings.model_copy(update={"inference_streams": 3}), "keras") == 3
    # the tiny bundle has Keras models only: one stream with both cores
    threads = serving_threads(settings).for_engine(
        resolve_engine(read_manifest(settings.bundle), settings.engine)
    )
    assert (threads.streams, threads.resolved_intra_op()) == (1, 2)


def test_forward_batch_setting_reaches_the_engine(settings, monkeypatch):
    monkeypatch.setenv("BONEWATCH_FORWARD_BATCH", "3")
    assert serving_threads(Settings()).forward_batch == 3
    assert serving_threads(settings).forward_batch == 0  # the engine's own choice


def test_worker_starts_a_process_per_core_on_onnx_and_one_on_keras(settings, monkeypatch):
    monkeypatch.setattr(engines, "available_cores", lambda: 2)
    demo = settings.model_copy(update={"bundle": DEMO_BUNDLE})  # ships ONNX models
    assert worker_processes(demo) == 2
    assert worker_processes(demo.model_copy(update={"engine": "keras"})) == 1
    assert worker_processes(settings) == 1  # Keras only
    assert worker_processes(demo, 3) == 3


def test_worker_children_share_the_host_cores(settings, monkeypatch):
    monkeypatch.setattr(engines, "available_cores", lambda: 8)
    assert child_threads(settings, 1) == 8
    assert child_threads(settings, 2) == 4
    assert child_threads(settings, 16) == 1
    assert child_threads(settings.model_copy(update={"intra_op_threads": 3}), 2) == 3


def test_serving_processes_cap_their_malloc_arenas():
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert limit_malloc_arenas(2) is glibc
    assert limit_malloc_arenas(0) is False  # 0 leaves glibc's own choice
    assert Settings().malloc_arenas == 2


def test_serving_processes_give_numpys_blas_one_thread(tmp_path):
    # In a process of its own: the cap holds for the whole process, as it does in a worker.
    code = (
        "import json\n"
        "import numpy\n"
        "from threadpoolctl import threadpool_info\n"
        "from bonewatch.worker.pipeline import serving_bundle\n"
        "from bonewatch.worker.settings import Settings\n"
        "def blas():\n"
        "    return [p['num_threads'] for p in threadpool_info() if p['user_api'] == 'blas']\n"
        "before = blas()\n"
        f"serving_bundle(Settings(data_dir={str(tmp_path)!r}, warm_up=False))\n"
        "print(json.dumps([before, blas()]))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BONEWATCH_", "OPENBLAS"))}
    env.pop("OMP_NUM_THREADS", None)
    env["BONEWATCH_PHI_SALT"] = "streams"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    before, after = json.loads(done.stdout.strip().splitlines()[-1])
    assert before and after == [1] * len(before), (before, after)
    assert Settings().blas_threads == 1
