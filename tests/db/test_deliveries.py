"""Tests for db/deliveries.py, the outbox, on both dialects: idempotent enqueue, the
pending -> sent | failed transitions, attempts, the next attempt's time, what is complete."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

import pytest

from bonewatch.db import NewImage, PredictionRecord, record_results, register_images
from bonewatch.db import deliveries as outbox
from bonewatch.db.schema import utcnow

BUNDLE = ("demo", "1.0.0")


def _row(n: int, *, study: str = "1.2.3", destination: str = "PACS@127.0.0.1:4242", **kw):
    values = {
        "study_uid": study,
        "bundle_name": BUNDLE[0],
        "bundle_version": BUNDLE[1],
        "kind": "sc",
        "sop_instance_uid": f"2.25.{n}",
        "destination": destination,
        "source_sop_instance_uid": f"1.2.3.{n}",
    }
    values.update(kw)
    return outbox.NewDelivery(**values)


def _by_sop(engine) -> dict[str, dict]:
    return {r["sop_instance_uid"]: r for r in outbox.query_deliveries(engine)}


def _fail(engine, ids, *, max_attempts=3, base=10.0, cap=60.0, error="refused"):
    return outbox.mark_attempt_failed(
        engine,
        dict.fromkeys(ids, error),
        max_attempts=max_attempts,
        base=base,
        cap=cap,
        rng=random.Random(7),
    )


def _when(value) -> datetime:
    """A timestamp as the ledger returns it (SQLite: naive UTC), comparable with utcnow()."""
    when = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    now = utcnow()
    if when.tzinfo is None and now.tzinfo is not None:
        when = when.replace(tzinfo=now.tzinfo)
    elif when.tzinfo is not None and now.tzinfo is None:
        when = when.replace(tzinfo=None)
    return when


def test_enqueue_is_idempotent_per_object_and_destination(db_engine):
    rows = [_row(1), _row(2), _row(1, destination="OTHER@127.0.0.1:104")]
    assert outbox.enqueue_deliveries(db_engine, rows) == 3
    assert outbox.enqueue_deliveries(db_engine, rows) == 0  # the same again: nothing added
    assert outbox.enqueue_deliveries(db_engine, [*rows, _row(3)]) == 1
    assert outbox.count_deliveries(db_engine) == {"pending": 4, "sent": 0, "failed": 0}
    row = _by_sop(db_engine)["2.25.2"]
    assert row["status"] == "pending" and row["attempts"] == 0 and row["last_error"] is None


def test_a_sent_row_stays_sent_when_enqueued_again(db_engine):
    outbox.enqueue_deliveries(db_engine, [_row(1)])
    [due] = outbox.due_deliveries(db_engine)
    outbox.mark_sent(db_engine, [due.id])
    assert outbox.enqueue_deliveries(db_engine, [_row(1)]) == 0
    row = _by_sop(db_engine)["2.25.1"]
    assert row["status"] == "sent" and row["attempts"] == 1 and row["sent_at"] is not None
    assert outbox.due_deliveries(db_engine) == []
    assert outbox.next_delivery_at(db_engine) is None


def test_a_failed_attempt_counts_and_waits_out_the_backoff(db_engine):
    outbox.enqueue_deliveries(db_engine, [_row(1), _row(2)])
    first, second = outbox.due_deliveries(db_engine)
    before = utcnow()
    assert _fail(db_engine, [first.id], base=10.0) == 0  # pending again, not failed yet
    row = _by_sop(db_engine)[first.sop_instance_uid]
    assert row["status"] == "pending" and row["attempts"] == 1
    assert row["last_error"] == "refused"
    wait = (_when(row["next_attempt_at"]) - before).total_seconds()
    assert 5.0 <= wait <= 13.0  # 10 s, with jitter
    # not due now; due once its time has come
    assert [d.id for d in outbox.due_deliveries(db_engine)] == [second.id]
    later = utcnow() + timedelta(seconds=20)
    assert {d.id for d in outbox.due_deliveries(db_engine, now=later)} == {first.id, second.id}
    assert _when(outbox.next_delivery_at(db_engine)) <= _when(row["next_attempt_at"])


def test_the_backoff_grows_with_the_attempts_up_to_its_cap(db_engine):
    outbox.enqueue_deliveries(db_engine, [_row(1)])
    [due] = outbox.due_deliveries(db_engine)
    waits = []
    for _ in range(4):
        before = utcnow()
        _fail(db_engine, [due.id], max_attempts=10, base=1.0, cap=6.0)
        when = _when(_by_sop(db_engine)[due.sop_instance_uid]["next_attempt_at"])
        waits.append((when - before).total_seconds())
    assert waits[0] < waits[2]
    assert max(waits) <= 6.0 * 1.3  # the cap, with its jitter


def test_the_last_allowed_attempt_marks_the_row_failed_with_its_reason(db_engine):
    outbox.enqueue_deliveries(db_engine, [_row(1)])
    [due] = outbox.due_deliveries(db_engine)
    for attempt in (1, 2):
        assert _fail(db_engine, [due.id], base=0.0, cap=0.0, error=f"try {attempt}") == 0
    assert _fail(db_engine, [due.id], base=0.0, cap=0.0, error="no association") == 1
    row = _by_sop(db_engine)[due.sop_instance_uid]
    assert row["status"] == "failed" and row["attempts"] == 3
    assert row["last_error"] == "no association"
    assert outbox.count_deliveries(db_engine) == {"pending": 0, "sent": 0, "failed": 1}
    # a failed row is not due, and another failure report no longer touches it
    assert outbox.due_deliveries(db_engine, now=utcnow() + timedelta(days=1)) == []
    assert _fail(db_engine, [due.id]) == 0
    assert _by_sop(db_engine)[due.sop_instance_uid]["attempts"] == 3


def test_retry_failed_makes_failed_rows_due_again_with_fresh_attempts(db_engine):
    outbox.enqueue_deliveries(db_engine, [_row(1, study="1.1"), _row(2, study="1.2")])
    ids = [d.id for d in outbox.due_deliveries(db_engine)]
    _fail(db_engine, ids, max_attempts=1)
    assert outbox.count_deliveries(db_engine)["failed"] == 2
    assert outbox.retry_failed(db_engine, study="1.1") == 1
    assert outbox.count_deliveries(db_engine) == {"pending": 1, "sent": 0, "failed": 1}
    assert outbox.count_deliveries(db_engine, study="1.1") == {"pending": 1, "sent": 0, "failed": 0}
    [due] = outbox.due_deliveries(db_engine)
    assert due.study_uid == "1.1" and due.attempts == 0
    assert outbox.retry_failed(db_engine) == 1


def test_a_long_error_is_cut_and_a_bundle_filter_keeps_versions_apart(db_engine):
    outbox.enqueue_deliveries(
        db_engine, [_row(1), _row(2, bundle_version="2.0.0", sop_instance_uid="2.25.99")]
    )
    assert [d.bundle_version for d in outbox.due_deliveries(db_engine, bundle=BUNDLE)] == ["1.0.0"]
    other = outbox.due_deliveries(db_engine, bundle=("demo", "2.0.0"))
    assert [d.sop_instance_uid for d in other] == ["2.25.99"]
    _fail(db_engine, [other[0].id], error="x" * 5000)
    assert len(_by_sop(db_engine)["2.25.99"]["last_error"]) == 2000
    assert outbox.next_delivery_at(db_engine, bundle=BUNDLE) is not None
    outbox.mark_sent(db_engine, [d.id for d in outbox.due_deliveries(db_engine, bundle=BUNDLE)])
    # only version 2's row is pending, and it waits for its backoff
    assert _when(outbox.next_delivery_at(db_engine)) > utcnow()
    assert outbox.next_delivery_at(db_engine, bundle=BUNDLE) is None


# --------------------------------------------------------------------- which studies are due


def _study(engine, uid: str, scores: list[float | None], *, bundle=BUNDLE) -> list[int]:
    """One DICOM image per score; None leaves that image queued (not finished)."""
    base = abs(hash(uid)) % 10**6
    registered = register_images(
        engine,
        [
            NewImage(
                path=f"/in/{uid}/{i}.dcm",
                sha256=f"{base * 100 + i:064x}",
                size_bytes=10,
                format="dicom",
                study_uid=uid,
                sop_instance_uid=f"{uid}.{i}",
            )
            for i in range(len(scores))
        ],
    )
    ids = [r.image_id for r in registered]
    record_results(
        engine,
        [
            PredictionRecord(
                image_id=image_id,
                bundle_name=bundle[0],
                bundle_version=bundle[1],
                status="done",
                reason=None,
                body_part_probs={"WRIST": 0.9, "other": 0.1},
                body_part="WRIST",
                body_part_confidence=0.9,
                body_part_examined=None,
                body_part_disagrees=False,
                p_fracture=p,
                label="positive" if p >= 0.5 else "negative",
                threshold=0.5,
                fracture_model="wrist-v1",
                timings={"preprocess_ms": 1.0, "stage1_ms": 5.0, "stage2_ms": 4.0},
            )
            for image_id, p in zip(ids, scores, strict=True)
            if p is not None
        ],
        [],
    )
    return ids


def test_a_study_is_due_once_all_its_images_finished_and_until_its_sr_is_enqueued(db_engine):
    _study(db_engine, "1.1", [0.9, 0.2])
    _study(db_engine, "1.2", [0.7, None])  # one image still queued
    assert outbox.finished_studies(db_engine, *BUNDLE) == ["1.1"]
    assert outbox.studies_to_deliver(db_engine, *BUNDLE) == []  # not received (stable) yet
    assert outbox.studies_to_deliver(db_engine, *BUNDLE, study_uids=["1.1", "1.2"]) == ["1.1"]
    assert outbox.finished_studies(db_engine, "demo", "9.9") == []  # another version: none
    sr = _row(1, study="1.1", kind="sr", source_sop_instance_uid=None)
    outbox.enqueue_deliveries(db_engine, [sr])
    assert outbox.finished_studies(db_engine, *BUNDLE) == []
    assert outbox.studies_to_deliver(db_engine, *BUNDLE, finished=True, enqueued=True) == ["1.1"]


def test_the_study_result_holds_each_scored_image(db_engine):
    _study(db_engine, "1.1", [0.9, 0.2])
    result = outbox.study_result(db_engine, "1.1", *BUNDLE)
    assert result is not None
    assert result.mean_p_fracture == pytest.approx(0.55) and result.label == "positive"
    assert [(i.sop_instance_uid, i.p_fracture) for i in result.images] == [
        ("1.1.0", pytest.approx(0.9)),
        ("1.1.1", pytest.approx(0.2)),
    ]
    assert outbox.study_result(db_engine, "1.1", "demo", "9.9") is None


def test_a_study_enqueued_for_one_destination_is_still_due_for_another(db_engine):
    _study(db_engine, "1.1", [0.9])
    sr = _row(1, study="1.1", kind="sr", source_sop_instance_uid=None, destination="A@h:1")
    outbox.enqueue_deliveries(db_engine, [sr])
    due = outbox.studies_to_deliver
    assert due(db_engine, *BUNDLE, finished=True, destinations=["A@h:1"]) == []
    assert due(db_engine, *BUNDLE, finished=True, destinations=["A@h:1", "B@h:2"]) == ["1.1"]
    assert due(db_engine, *BUNDLE, finished=True) == []
    # not received (stable) yet, but complete when first enqueued: due for the new destination
    assert due(db_engine, *BUNDLE, destinations=["A@h:1", "B@h:2"]) == ["1.1"]
    assert due(db_engine, *BUNDLE, destinations=["A@h:1"]) == []
