"""Runs in distributed mode, against the real Redis and PostgreSQL on localhost: the bulk
window of ``bonewatch worker``, pause, resume and cancel of a run whose messages are already
in the broker, and the ETA.

Workers are real ``bonewatch worker`` processes (Celery prefork), started by the harness of
``test_distributed.py``; PostgreSQL is never restarted here. Redis database 12 is this module's
own, so its flushes touch no other test's queues.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
from sqlalchemy import Engine

from bonewatch.db import make_engine, upgrade
from bonewatch.db.runs import cancel_run, get_run, pause_run
from bonewatch.ingest import write_png
from bonewatch.worker.runs import run_report
from bonewatch.worker.settings import Settings
from tests.conftest import _empty_pg_database, flushed_redis
from tests.worker.test_distributed import Cluster, make_inbox

pytestmark = pytest.mark.services

REDIS_URL = "redis://127.0.0.1:6379/12"
T = TypeVar("T")


@pytest.fixture
def redis_db() -> Iterator[str]:
    """Redis database 12, flushed before and after."""
    yield from flushed_redis(REDIS_URL)


@pytest.fixture
def cluster(tmp_path: Path, pg_url: str, redis_db: str, tiny_bundle_dir: Path) -> Iterator[Cluster]:
    _empty_pg_database(pg_url)
    upgrade(pg_url)
    c = Cluster(tmp_path, pg_url, redis_db, tiny_bundle_dir)
    c.env["BONEWATCH_BATCH_SIZE"] = "2"
    try:
        yield c
    finally:
        c.stop_all()


def _window(start_hours: float, length_hours: float) -> str:
    start = datetime.now(UTC).astimezone() + timedelta(hours=start_hours)
    return f"{start:%H:%M}-{start + timedelta(hours=length_hours):%H:%M}"


def _claimed_when_stopped(cluster: Cluster) -> int:
    """Finished or in a claimed batch once a pause or cancel committed: the most that can
    finish until the run resumes (nothing is claimed after it)."""
    c = cluster.counts()
    return sum(v for k, v in c.items() if k in ("done", "failed", "unsupported", "processing"))


def _stop_mid_run(cluster: Cluster, n: int, stop: Callable[[Engine], T]) -> tuple[int, T]:
    """Start a run of ``n`` images on one worker, ``stop`` it (pause or cancel) once it is under
    way, and wait out the batch claimed then. Returns the most images that may finish (see
    :func:`_claimed_when_stopped`) and what ``stop`` returned."""
    archive = make_inbox(cluster.root, n, size=128)
    cluster.worker("w1")
    cluster.run("process", str(archive))
    cluster.wait_for(lambda: cluster.finished() >= 10, "the run to be under way")
    engine = make_engine(cluster.pg_url)
    try:
        outcome = stop(engine)
    finally:
        engine.dispose()
    bound = _claimed_when_stopped(cluster)
    cluster.wait_for(lambda: cluster.counts().get("processing", 0) == 0, "the claimed batch")
    time.sleep(5)  # the worker meets the rest of the messages: each is dropped, claiming nothing
    return bound, outcome


def _report(cluster: Cluster, run_id: int) -> dict[str, object]:
    return dict(json.loads(cluster.run("runs", "show", str(run_id), "--format", "json").stdout))


@pytest.mark.slow
def test_outside_the_window_workers_take_live_only_until_it_moves_to_now(cluster):
    archive = make_inbox(cluster.root, 20, size=96)
    inbox = cluster.root / "inbox"
    inbox.mkdir()
    cluster.worker("w1", BONEWATCH_BULK_WINDOW=_window(2, 1))
    assert "outside the bulk window" in cluster.log("w1.log")
    cluster.spawn("watch", str(inbox), log="watch.log")
    cluster.wait_for(lambda: "watching" in cluster.log("watch.log"), "the watcher")
    cluster.run("process", str(archive))
    write_png(cluster.root / "incoming.png", np.full((96, 96), 0.9, np.float32))
    (cluster.root / "incoming.png").rename(inbox / "urgent.png")
    cluster.wait_for(
        lambda: cluster.query("SELECT status FROM images WHERE queue = 'live'") == [("done",)],
        "the live file",
    )
    time.sleep(4)  # two reconcile intervals: bulk still waits
    assert cluster.query("SELECT count(*), max(attempts) FROM images WHERE queue = 'bulk'") == [
        (20, 0)
    ]
    runs = json.loads(cluster.run("runs", "--format", "json").stdout)
    assert {(r["kind"], r["state"]) for r in runs} == {("archive", "queued"), ("watch", "running")}
    # The window is moved to now: the worker restarts with it and takes the archive.
    for proc, _ in cluster.procs[:1]:
        proc.terminate()
        proc.wait(timeout=60)
    cluster.worker("w2", BONEWATCH_BULK_WINDOW=_window(-1, 2))
    cluster.wait_all_final(21)
    cluster.assert_exactly_once(21)
    archive_run = next(r for r in runs if r["kind"] == "archive")
    assert _report(cluster, int(archive_run["id"]))["state"] == "done"


@pytest.mark.slow
def test_pause_mid_run_then_resume_finishes_every_image_once(cluster):
    n = 300
    bound, _ = _stop_mid_run(cluster, n, lambda e: pause_run(e, 1, reason="PACS migration"))
    assert cluster.finished() <= bound < n, "images were claimed after the pause"
    assert cluster.query("SELECT count(*) FROM images WHERE status = 'queued'") == [
        (n - cluster.finished(),)
    ]
    assert _report(cluster, 1)["state"] == "paused"
    resumed = cluster.run("runs", "resume", "1").stdout
    assert "run 1 resumed" in resumed and "published on bulk" in resumed
    cluster.wait_all_final(n)
    cluster.assert_exactly_once(n)
    assert _report(cluster, 1)["state"] == "done"


@pytest.mark.slow
def test_cancel_mid_run_leaves_nothing_processed_after_it_but_the_claimed_batch(cluster):
    n = 300
    bound, outcome = _stop_mid_run(cluster, n, lambda e: cancel_run(e, 1, reason="wrong folder"))
    counts = cluster.counts()
    assert counts["done"] <= bound < n, "an image was processed after the cancel"
    assert counts["cancelled"] == outcome.cancelled == n - counts["done"]
    assert cluster.query("SELECT DISTINCT reason FROM images WHERE status = 'cancelled'") == [
        ("wrong folder",)
    ]
    # A cancelled run is started again with resume: everything left is published again.
    assert "queued again" in cluster.run("runs", "resume", "1").stdout
    cluster.wait_all_final(n)
    cluster.assert_exactly_once(n)


@pytest.mark.slow
def test_process_wait_follows_the_run_and_the_eta_is_within_a_quarter(cluster):
    n = 300
    # large enough images that the rest of the run takes seconds, not a fraction of one, so
    # the 25 % is measured on the estimate rather than on scheduling noise
    archive = make_inbox(cluster.root, n, size=768)
    proc = cluster.spawn("process", str(archive), "--wait", log="process.log")
    # A steady run: the worker starts once every message is in the broker, so registering and
    # publishing (CPU on the same two cores) do not slow the first third only.
    cluster.wait_for(lambda: "enqueued on bulk in" in cluster.log("process.log"), "the enqueue")
    cluster.worker("w1")
    cluster.wait_for(lambda: cluster.finished() >= n // 3, "a third of the run")
    # The report as `runs show --format json` gives it (test_runs_cli.py covers the command),
    # computed here so that starting a CLI does not take CPU from the run being timed.
    engine = make_engine(cluster.pg_url)
    try:
        report = run_report(get_run(engine, 1), Settings())
        told_at = datetime.now(UTC)
        assert report["state"] == "running" and report["images_per_second"]
        assert report["eta"] is not None
        eta = datetime.fromisoformat(str(report["eta"]))
        cluster.wait_all_final(n)
        assert proc.wait(timeout=60) == 0
        finished = get_run(engine, 1).last_finished_at
    finally:
        engine.dispose()
    log = cluster.log("process.log")
    # the bar (a file gets its last frame only) and the run's counts at the end
    assert "run 1 ━" in log and "300/300" in log and "run 1 done: done 300" in log
    assert finished is not None
    actual = (finished - told_at).total_seconds()
    told = (eta - told_at).total_seconds()
    print(f"ETA at a third of the run: {told:.2f} s told, {actual:.2f} s taken")
    assert abs(told - actual) <= 0.25 * actual, (told, actual)
    cluster.assert_exactly_once(n)
