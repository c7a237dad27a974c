"""No retry storms: a bad file is read once; a transient fault is retried, spaced, then recorded."""

from __future__ import annotations

import errno
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

import bonewatch.worker.pipeline as pipeline
from bonewatch.db import query_results
from bonewatch.ingest import write_png
from bonewatch.worker.runner import open_ledger, process_paths
from bonewatch.worker.settings import Settings


def _count_reads(monkeypatch, eio_for: set[str] = frozenset()) -> dict[str, list[float]]:
    """Record when ``read_image`` is called per file name; raise EIO for the names given."""
    calls: dict[str, list[float]] = defaultdict(list)
    real = pipeline.read_image

    def counted(path, **kwargs):
        name = Path(path).name
        calls[name].append(time.monotonic())
        if name in eio_for:
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real(path, **kwargs)

    monkeypatch.setattr(pipeline, "read_image", counted)
    return calls


def _flaky_share(tmp_path, monkeypatch) -> tuple[Path, dict[str, list[float]]]:
    """An inbox with one file, ``share.png``, whose every read fails with EIO."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    write_png(inbox / "share.png", np.full((32, 32), 0.9, np.float32))
    return inbox, _count_reads(monkeypatch, eio_for={"share.png"})


def test_a_bad_file_is_decoded_once_however_often_it_is_seen(tmp_path, settings, monkeypatch):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    write_png(inbox / "good.png", np.full((32, 32), 0.9, np.float32))
    # Registered (its header is fine), then refused while decoding: a truncated pixel stream.
    write_png(inbox / "cut.png", np.random.default_rng(3).random((64, 64)).astype(np.float32))
    cut = (inbox / "cut.png").read_bytes()
    (inbox / "cut.png").write_bytes(cut[: len(cut) // 2])
    calls = _count_reads(monkeypatch)

    for _ in range(3):  # the user runs the same folder again, and again
        process_paths([inbox], settings)

    (row,) = [r for r in query_results(open_ledger(settings)) if r["path"].endswith("cut.png")]
    assert row["status"] == "failed" and row["error_class"] == "TruncatedFileError"
    assert row["attempts"] == 1
    assert len(calls["cut.png"]) == 1
    assert len(calls["good.png"]) == 1


def test_a_transient_fault_is_retried_with_growing_waits_then_recorded(
    tmp_path, settings, monkeypatch
):
    inbox, calls = _flaky_share(tmp_path, monkeypatch)
    base = 0.4
    flaky = settings.model_copy(update={"retry_backoff_seconds": base, "max_attempts": 3})

    process_paths([inbox], flaky)

    (row,) = query_results(open_ledger(flaky))
    assert row["status"] == "failed" and row["attempts"] == 3
    assert row["error_class"] == "TransientIOError"
    assert "gave up after 3 attempts" in str(row["reason"])
    tries = calls["share.png"]
    assert len(tries) == 3  # capped: not one read more
    waits = [later - earlier for earlier, later in zip(tries, tries[1:], strict=False)]
    # Backoff doubles from the base, with up to 25 % jitter either way.
    assert waits[0] >= 0.75 * base
    assert waits[1] >= 0.75 * 2 * base


def test_the_configured_longest_backoff_bounds_the_ledgers_retry_wait(
    tmp_path, settings, monkeypatch
):
    # BONEWATCH_RETRY_BACKOFF_MAX=1 with a 100 s base: the ledger must schedule the retry
    # within about a second, not at its own 60 s default.
    inbox, calls = _flaky_share(tmp_path, monkeypatch)
    monkeypatch.setenv("BONEWATCH_RETRY_BACKOFF_SECONDS", "100")
    monkeypatch.setenv("BONEWATCH_RETRY_BACKOFF_MAX", "1")
    capped = Settings.resolve(
        data_dir=settings.data_dir, bundle=settings.bundle, phi_salt="test-salt", max_attempts=2
    )
    assert capped.retry_backoff_max == 1.0

    started = time.monotonic()
    process_paths([inbox], capped)

    (row,) = query_results(open_ledger(capped))
    assert row["status"] == "failed" and row["attempts"] == 2
    tries = calls["share.png"]
    assert len(tries) == 2
    assert tries[1] - tries[0] <= 1.25 + 1.0  # the cap with its jitter, and a poll's slack
    assert time.monotonic() - started < 30
