"""Runs in the ledger (db/runs.py) and what they change in claims, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, select, update

from bonewatch.db import (
    NewImage,
    PredictionRecord,
    claim_batch,
    claim_images,
    count_by_status,
    next_retry_at,
    query_results,
    record_results,
    register_images,
    waiting_images,
)
from bonewatch.db.leases import claim_queues
from bonewatch.db.records import NewRun
from bonewatch.db.runs import (
    RunNotFoundError,
    RunStateError,
    cancel_run,
    create_run,
    get_run,
    list_runs,
    open_long_lived_run,
    pause_run,
    resume_run,
    seal_run,
    set_run_window,
    windowed_runs,
)
from bonewatch.db.schema import images, utcnow
from bonewatch.worker.runs import run_eta, run_rate
from bonewatch.worker.window import BulkWindow


def _run(engine: Engine, queue: str = "bulk", **kw: object) -> int:
    return create_run(
        engine,
        NewRun(kind="archive", queue=queue, paths=("/archive/2024",), started_by="ann@host", **kw),  # type: ignore[arg-type]
    )


def _images(
    engine: Engine, n: int, *, run_id: int | None, queue: str = "bulk", start: int = 0
) -> list[int]:
    rows = [
        NewImage(
            path=f"/archive/{queue}/{run_id}/{start + i}.dcm",
            sha256=hashlib.sha256(f"{queue}/{run_id}/{start + i}".encode()).hexdigest(),
            size_bytes=10,
            format="dicom",
            queue=queue,
            run_id=run_id,
        )
        for i in range(n)
    ]
    return [r.image_id for r in register_images(engine, rows)]


def _prediction(image_id: int) -> PredictionRecord:
    return PredictionRecord(
        image_id=image_id,
        bundle_name="tiny",
        bundle_version="1",
        status="done",
        reason=None,
        body_part_probs={"ELBOW": 0.9},
        body_part="ELBOW",
        body_part_confidence=0.9,
        body_part_examined=None,
        body_part_disagrees=False,
        p_fracture=0.2,
        label="negative",
        threshold=0.5,
        fracture_model="elbow-v1",
        timings={"stage1": 0.01},
    )


def _claim(engine: Engine, limit: int = 1000, **kw: object) -> list[int]:
    claimed = claim_batch(engine, limit=limit, lease_seconds=60, worker_id="w1", **kw)  # type: ignore[arg-type]
    return [c.image_id for c in claimed]


def _finish(engine: Engine, ids: list[int]) -> None:
    assert record_results(engine, [_prediction(i) for i in ids], worker_id="w1") == len(ids)


def test_a_run_holds_its_paths_owner_bundle_and_counts(db_engine: Engine) -> None:
    run_id = _run(db_engine, bundle_name="tiny", bundle_version="1", bulk_window="20:00-06:00")
    ids = _images(db_engine, 5, run_id=run_id)
    run = get_run(db_engine, run_id)
    assert (run.paths, run.started_by, run.bundle_name, run.bundle_version) == (
        ("/archive/2024",),
        "ann@host",
        "tiny",
        "1",
    )
    assert run.bulk_window == "20:00-06:00"
    assert run.state == "queued" and run.left == 5 and run.counts["queued"] == 5
    # Registration is still going on: a run with nothing left is not done before it is sealed.
    _finish(db_engine, _claim(db_engine))
    assert get_run(db_engine, run_id).state == "running"
    seal_run(db_engine, run_id)
    run = get_run(db_engine, run_id)
    assert run.state == "done" and run.left == 0 and run.counts["done"] == 5
    assert {r["run_id"] for r in query_results(db_engine, run_id=run_id)} == {run_id}
    assert [r["id"] for r in query_results(db_engine, run_id=run_id)] == ids
    assert count_by_status(db_engine, run_id=run_id)["done"] == 5
    assert count_by_status(db_engine, run_id=run_id + 1)["done"] == 0
    assert [r.id for r in list_runs(db_engine)] == [run_id]


def test_a_watched_folder_keeps_one_run_across_restarts(db_engine: Engine) -> None:
    new = NewRun(kind="watch", queue="live", paths=("/in",), started_by="a@b", key="watch:/in")
    first = open_long_lived_run(db_engine, new)
    assert open_long_lived_run(db_engine, new) == first
    other = open_long_lived_run(db_engine, NewRun(**{**new.__dict__, "key": "watch:/other"}))
    assert other != first
    assert get_run(db_engine, first).state == "running"  # following, with nothing yet
    # never sealed: a long-lived run is never done
    _images(db_engine, 2, run_id=first, queue="live")
    _finish(db_engine, _claim(db_engine))
    assert get_run(db_engine, first).state == "running"


def test_a_paused_run_is_never_claimed_and_others_still_are(db_engine: Engine) -> None:
    paused = _run(db_engine)
    other = _run(db_engine)
    held = _images(db_engine, 4, run_id=paused)
    free = _images(db_engine, 3, run_id=other)
    loose = _images(db_engine, 1, run_id=None, start=90)
    assert pause_run(db_engine, paused, reason="PACS migration").state == "paused"
    assert sorted(_claim(db_engine)) == sorted(free + loose)
    # a task carrying the paused run's ids claims nothing: it is dropped
    assert claim_images(db_engine, held, lease_seconds=60, worker_id="w2") == []
    # reconcile does not publish them again while paused; nor does a drain wait for them
    settled = utcnow() + timedelta(seconds=1)
    assert not {i for i, _ in waiting_images(db_engine, settled_before=settled)} & set(held)
    run, requeued = resume_run(db_engine, paused)
    assert run.state == "queued" and requeued == 0
    assert {i for i, _ in waiting_images(db_engine, settled_before=settled)} >= set(held)
    assert sorted(_claim(db_engine)) == held


def test_cancel_marks_what_waits_and_lets_the_claimed_batch_finish(db_engine: Engine) -> None:
    run_id = _run(db_engine)
    ids = _images(db_engine, 10, run_id=run_id)
    _finish(db_engine, _claim(db_engine, limit=3))
    batch = _claim(db_engine, limit=2)  # claimed, not yet recorded
    outcome = cancel_run(db_engine, run_id, reason="wrong folder")
    assert (outcome.cancelled, outcome.still_processing) == (5, 2)
    assert outcome.run.state == "cancelled" and outcome.run.counts["done"] == 3
    _finish(db_engine, batch)  # the claimed batch finishes
    assert _claim(db_engine) == []
    counts = count_by_status(db_engine, run_id=run_id)
    assert (counts["done"], counts["cancelled"], counts["queued"]) == (5, 5, 0)
    rows = query_results(db_engine, run_id=run_id, status="cancelled")
    assert {(r["reason"], r["error_class"]) for r in rows} == {("wrong folder", "RunCancelled")}
    with pytest.raises(RunStateError):
        pause_run(db_engine, run_id)
    # A cancelled run is started again by resume; its finished results stay as they were.
    run, requeued = resume_run(db_engine, run_id)
    assert requeued == 5 and run.state == "running" and run.left == 5
    rest = _claim(db_engine)
    assert sorted(rest) == sorted(set(ids) - set(batch) - {r["id"] for r in query_results(
        db_engine, run_id=run_id, status="done")})  # fmt: skip
    _finish(db_engine, rest)
    seal_run(db_engine, run_id)
    assert get_run(db_engine, run_id).counts["done"] == 10


def test_cancel_takes_rows_whose_lease_expired(db_engine: Engine) -> None:
    run_id = _run(db_engine)
    ids = _images(db_engine, 2, run_id=run_id)
    _claim(db_engine)
    with db_engine.begin() as conn:  # the worker died: its leases ran out
        conn.execute(
            update(images).values(lease_expires_at=datetime.now(UTC) - timedelta(seconds=5))
        )
    outcome = cancel_run(db_engine, run_id, reason="stop")
    assert (outcome.cancelled, outcome.still_processing) == (2, 0)
    assert claim_images(db_engine, ids, lease_seconds=60, worker_id="w2") == []


def test_unknown_runs_are_named(db_engine: Engine) -> None:
    for call in (
        lambda: get_run(db_engine, 42),
        lambda: pause_run(db_engine, 42),
        lambda: resume_run(db_engine, 42),
        lambda: cancel_run(db_engine, 42, reason="x"),
        lambda: set_run_window(db_engine, 42, None),
    ):
        with pytest.raises(RunNotFoundError, match="no run 42"):
            call()


def test_the_window_rule_outside_live_only_inside_live_first(db_engine: Engine) -> None:
    assert claim_queues(False) == ("live",)
    assert claim_queues(True) == ("live", "bulk")
    bulk = _images(db_engine, 3, run_id=None, queue="bulk")
    live = _images(db_engine, 2, run_id=None, queue="live")
    assert claim_images(db_engine, bulk, lease_seconds=60, worker_id="w", bulk_open=False) == []
    assert sorted(_claim(db_engine, bulk_open=False)) == sorted(live)
    assert sorted(_claim(db_engine, bulk_open=True)) == sorted(bulk)
    # retries waiting on a closed queue are not waited for (a drain would spin on them)
    with db_engine.begin() as conn:
        conn.execute(
            update(images)
            .where(images.c.id.in_(bulk))
            .values(status="queued", retry_after=utcnow() - timedelta(seconds=1))
        )
    assert next_retry_at(db_engine, bulk_open=False) is None
    assert next_retry_at(db_engine, bulk_open=True) is not None


def test_a_run_outside_its_own_window_is_held_back(db_engine: Engine) -> None:
    windowed = _run(db_engine, bulk_window="01:00-02:00")
    other = _run(db_engine)
    held = _images(db_engine, 3, run_id=windowed)
    free = _images(db_engine, 2, run_id=other)
    assert windowed_runs(db_engine) == [(windowed, "01:00-02:00")]
    assert sorted(_claim(db_engine, held_runs=[windowed])) == sorted(free)
    assert (
        claim_images(db_engine, held, lease_seconds=60, worker_id="w", held_runs=[windowed]) == []
    )
    assert sorted(_claim(db_engine)) == sorted(held)
    assert windowed_runs(db_engine) == []  # nothing of it waits any more
    assert set_run_window(db_engine, windowed, None).bulk_window is None


def test_the_status_cancelled_is_allowed_and_checked(db_engine: Engine) -> None:
    from sqlalchemy.exc import IntegrityError

    (image_id,) = _images(db_engine, 1, run_id=None)
    with db_engine.begin() as conn:
        conn.execute(update(images).where(images.c.id == image_id).values(status="cancelled"))
    with pytest.raises(IntegrityError), db_engine.begin() as conn:
        conn.execute(update(images).where(images.c.id == image_id).values(status="halted"))
    with db_engine.connect() as conn:
        assert conn.execute(select(images.c.status)).scalar_one() == "cancelled"


def test_the_eta_is_within_a_quarter_on_a_steady_synthetic_run(db_engine: Engine) -> None:
    """A worker that claims and records a batch of 4 every 0.25 s (16 images/s): the ETA told
    a third of the way through is within 25 % of when the run really finishes."""
    run_id = _run(db_engine)
    n, batch, pace = 60, 4, 0.25
    _images(db_engine, n, run_id=run_id)
    seal_run(db_engine, run_id)
    predicted = told_at = None
    for k in range(n // batch):
        started = time.monotonic()
        _finish(db_engine, _claim(db_engine, limit=batch))
        if k == 5:
            run = get_run(db_engine, run_id)
            eta = run_eta(run, None)
            assert eta.at is not None and run_rate(run) is not None
            told_at, predicted = datetime.now(UTC), eta.at
        time.sleep(max(pace - (time.monotonic() - started), 0.0))
    finished = get_run(db_engine, run_id).last_finished_at
    assert get_run(db_engine, run_id).state == "done"
    assert told_at is not None and predicted is not None and finished is not None
    actual = (finished - told_at).total_seconds()
    told = (predicted - told_at).total_seconds()
    assert abs(told - actual) <= 0.25 * actual, (told, actual)


def test_the_eta_counts_only_the_hours_the_window_is_open(db_engine: Engine) -> None:
    """At a measured rate, what is left takes one open hour: with the window closed now it ends
    an hour after the window opens, not an hour from now."""
    run_id = _run(db_engine)
    _images(db_engine, 8, run_id=run_id)
    seal_run(db_engine, run_id)
    now = utcnow()
    with db_engine.begin() as conn:  # 4 images finished at 0 s, 10 s, 20 s, 30 s: 0.1 img/s
        for k, image_id in enumerate(sorted(_claim(db_engine, limit=4))):
            conn.execute(
                update(images)
                .where(images.c.id == image_id)
                .values(
                    status="done", finished_at=now - timedelta(seconds=30 - 10 * k),
                    lease_expires_at=None, leased_by=None,
                )
            )  # fmt: skip
    run = get_run(db_engine, run_id)
    assert run_rate(run) == pytest.approx(0.1)
    assert run.left == 4  # 40 s of work
    local = now.astimezone()
    start = (local + timedelta(hours=2)).replace(second=0, microsecond=0)
    window = BulkWindow(start.time(), (start + timedelta(hours=1)).time())
    eta = run_eta(run, window, now)
    assert eta.waits_for_window and eta.at is not None
    assert eta.at == window.opens_at(now) + timedelta(seconds=40)
    assert run_eta(run, None, now).at == now + timedelta(seconds=40)
    assert pause_run(db_engine, run_id).state == "paused"
    assert run_eta(get_run(db_engine, run_id), window, now).at is None
