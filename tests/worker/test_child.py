"""A Celery pool child serves with the settings its launcher resolved, never a fresh read of the
environment (``worker/distributed/child.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from celery import signals

from bonewatch.worker.distributed import child
from bonewatch.worker.settings import Settings


@pytest.fixture
def lifecycle():
    before = (
        list(signals.worker_process_init.receivers),
        list(signals.worker_process_shutdown.receivers),
    )
    yield
    signals.worker_process_init.receivers[:] = before[0]
    signals.worker_process_shutdown.receivers[:] = before[1]
    child.stop_child()


def test_a_pool_child_gets_every_setting_of_its_parent(
    tmp_path: Path, tiny_bundle_dir: Path, monkeypatch, lifecycle
):
    # The parent's settings: every field that a child uses, off its default.
    parent = Settings.resolve(
        data_dir=tmp_path / "parent-data",
        bundle=tiny_bundle_dir,
        batch_size=3,
        decode_workers=1,
        lease_seconds=77.0,
        max_attempts=5,
        retry_backoff_seconds=0.3,
        retry_backoff_max=7.0,
        max_pixels=12_345_678,
        max_file_bytes=9_876_543,
        phi_salt="parent-salt",
        engine="keras",
        intra_op_threads=1,
        forward_batch=2,
        malloc_arenas=0,
        warm_up=False,
        heatmaps=True,
        heatmap_dir=tmp_path / "parent-heatmaps",
        transient_retries=4,
    )
    child.connect_lifecycle(parent)
    # The child's environment says otherwise about all of them.
    other = {
        "DATA_DIR": str(tmp_path / "env-data"),
        "BUNDLE": str(tmp_path / "no-such-bundle"),
        "BATCH_SIZE": "64",
        "DECODE_WORKERS": "4",
        "LEASE_SECONDS": "5",
        "MAX_ATTEMPTS": "1",
        "RETRY_BACKOFF_SECONDS": "9",
        "RETRY_BACKOFF_MAX": "60",
        "MAX_PIXELS": "1",
        "MAX_FILE_BYTES": "1",
        "PHI_SALT": "env-salt",
        "ENGINE": "onnx",
        "INTRA_OP_THREADS": "3",
        "FORWARD_BATCH": "0",
        "HEATMAPS": "false",
        "TRANSIENT_RETRIES": "0",
    }
    for key, value in other.items():
        monkeypatch.setenv(f"BONEWATCH_{key}", value)

    signals.worker_process_init.send(sender=None)  # what the pool sends after each fork

    pipeline = child._pipeline
    assert pipeline is not None
    assert pipeline.settings == parent
    assert pipeline.bundle.name == "tiny"
    assert pipeline.bundle.engine == "keras"
    signals.worker_process_shutdown.send(sender=None)
    assert child._pipeline is None
