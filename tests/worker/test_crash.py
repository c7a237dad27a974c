"""Embedded mode survives a `kill -9` mid-run: a re-run finishes every image exactly once."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bonewatch.ingest import write_png
from bonewatch.worker.runner import process_paths
from bonewatch.worker.settings import Settings

N_FILES = 240


def _counts(db_file: Path) -> dict[str, int]:
    if not db_file.exists():
        return {}
    with sqlite3.connect(db_file, timeout=30) as conn:
        try:
            rows = conn.execute("SELECT status, count(*) FROM images GROUP BY status").fetchall()
        except sqlite3.OperationalError:  # schema not created yet
            return {}
    return dict(rows)


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_records_every_image_once(tmp_path, tiny_bundle_dir):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N_FILES):
        # large enough that decoding takes a while, so the kill lands mid-run
        pixels = (0.6 + 0.4 * rng.random((900, 900))).astype(np.float32)
        write_png(inbox / f"image{i:04d}.png", pixels)
    data_dir = tmp_path / "data"
    env = {
        **os.environ,
        "BONEWATCH_DATA_DIR": str(data_dir),
        "BONEWATCH_BUNDLE": str(tiny_bundle_dir),
        "BONEWATCH_PHI_SALT": "crash-test",
        "BONEWATCH_BATCH_SIZE": "4",
        "BONEWATCH_DECODE_WORKERS": "1",
    }
    db_file = data_dir / "bonewatch.sqlite"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bonewatch", "process", str(inbox)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while _counts(db_file).get("done", 0) < 20:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    at_kill = _counts(db_file)
    assert at_kill.get("done", 0) < N_FILES, "nothing was left to recover"

    settings = Settings(
        data_dir=data_dir, bundle=tiny_bundle_dir, phi_salt="crash-test", batch_size=4
    )
    process_paths([inbox], settings)

    assert _counts(db_file) == {"done": N_FILES}
    with sqlite3.connect(db_file) as conn:
        n_rows, n_images = conn.execute(
            "SELECT count(*), count(DISTINCT image_id) FROM predictions"
        ).fetchone()
        n_registered = conn.execute("SELECT count(*) FROM images").fetchone()[0]
    assert n_registered == N_FILES
    assert n_rows == n_images == N_FILES
