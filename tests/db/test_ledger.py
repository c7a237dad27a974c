"""Tests for the ledger (registration, leases, results, queries), on SQLite and on PostgreSQL."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

import pytest
from sqlalchemy import Engine, func, select

from bonewatch.db import (
    STATUSES,
    FailureRecord,
    NewImage,
    PredictionRecord,
    claim_batch,
    claim_images,
    count_by_status,
    lease_holders,
    make_engine,
    next_retry_at,
    query_results,
    query_studies,
    reclaim_expired,
    record_results,
    register_images,
    release_for_retry,
    release_leases,
)
from bonewatch.db.schema import images, predictions, utcnow

BUNDLE = "phantom-demo"


def _sha(n: int) -> str:
    return f"{n:064x}"


def _new(path: str, sha: int | None, **kw: object) -> NewImage:
    return NewImage(
        path=path,
        sha256=_sha(sha) if sha is not None else None,
        size_bytes=100,
        format="dicom",
        **kw,  # type: ignore[arg-type]
    )


def _prediction(
    image_id: int,
    p: float | None,
    *,
    version: str = "1.0",
    part: str = "ELBOW",
    threshold: float = 0.5,
    status: str = "done",
) -> PredictionRecord:
    return PredictionRecord(
        image_id=image_id,
        bundle_name=BUNDLE,
        bundle_version=version,
        status=status,
        reason=None if status == "done" else "stage 1 says: other",
        body_part_probs={part: 0.9, "other": 0.1},
        body_part=part if status == "done" else None,
        body_part_confidence=0.9,
        body_part_examined=None,
        body_part_disagrees=False,
        p_fracture=p,
        label=None if p is None else ("positive" if p >= threshold else "negative"),
        threshold=threshold if status == "done" else None,
        fracture_model=f"{part.lower()}-v1" if status == "done" else None,
        timings={"stage1": 0.01, "stage2": 0.02},
        rows=512,
        columns=400,
    )


def _claim_all(engine: Engine, worker: str = "w1") -> list[int]:
    return [c.image_id for c in claim_batch(engine, limit=1000, lease_seconds=60, worker_id=worker)]


def _n_predictions(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.scalar(select(func.count()).select_from(predictions)) or 0


def _image(engine: Engine, image_id: int) -> dict[str, object]:
    with engine.connect() as conn:
        row = conn.execute(select(images).where(images.c.id == image_id)).one()
    return dict(row._mapping)


# --------------------------------------------------------------------------- registration


def test_register_same_path_and_sha_is_idempotent(db_engine: Engine) -> None:
    first = register_images(db_engine, [_new("/in/a.dcm", 1, study_uid="1.2.3")])
    again = register_images(db_engine, [_new("/in/a.dcm", 1, study_uid="1.2.3")])
    assert first[0].created and first[0].status == "queued"
    assert not again[0].created
    assert again[0].image_id == first[0].image_id
    assert count_by_status(db_engine)["queued"] == 1


def test_register_same_key_twice_in_one_batch_is_one_row(db_engine: Engine) -> None:
    out = register_images(db_engine, [_new("/in/a.dcm", 1), _new("/in/a.dcm", 1)])
    assert out[0].image_id == out[1].image_id
    assert sum(count_by_status(db_engine).values()) == 1


def test_unreadable_file_without_sha_is_idempotent_too(db_engine: Engine) -> None:
    item = _new("/in/broken.dcm", None, status="failed", error_class="TruncatedFile", reason="eof")
    first = register_images(db_engine, [item])
    again = register_images(db_engine, [item])
    assert first[0].created and not again[0].created
    assert first[0].image_id == again[0].image_id
    assert first[0].status == "failed"
    row = _image(db_engine, first[0].image_id)
    assert row["reason"] == "eof" and row["finished_at"] is not None


def test_results_keep_the_order_of_the_items(db_engine: Engine) -> None:
    items = [_new(f"/in/{name}.dcm", n) for n, name in enumerate(["z", "a", "m", "b"])]
    out = register_images(db_engine, items)
    ids_by_path = {r["path"]: r["id"] for r in query_results(db_engine)}
    assert [r.image_id for r in out] == [ids_by_path[i.path] for i in items]


def test_copy_under_another_name_is_a_duplicate_of_the_original(db_engine: Engine) -> None:
    (orig,) = register_images(db_engine, [_new("/in/a.dcm", 7)])
    (copy,) = register_images(db_engine, [_new("/in/copy-of-a.dcm", 7)])
    (third,) = register_images(db_engine, [_new("/archive/a.dcm", 7)])
    assert copy.created and copy.status == "duplicate" and copy.duplicate_of == orig.image_id
    assert third.status == "duplicate" and third.duplicate_of == orig.image_id
    assert _claim_all(db_engine) == [orig.image_id]


def test_same_sop_instance_with_different_bytes_is_a_duplicate(db_engine: Engine) -> None:
    (orig,) = register_images(db_engine, [_new("/in/a.dcm", 1, sop_instance_uid="1.2.840.9")])
    (again,) = register_images(db_engine, [_new("/in/a2.dcm", 2, sop_instance_uid="1.2.840.9")])
    assert again.status == "duplicate"
    assert again.duplicate_of == orig.image_id
    assert str(_image(db_engine, again.image_id)["reason"]) == (
        f"same SOPInstanceUID as image {orig.image_id} (/in/a.dcm), different bytes"
    )


def test_other_frame_of_the_same_sop_instance_is_not_a_duplicate(db_engine: Engine) -> None:
    out = register_images(
        db_engine,
        [
            _new("/in/mf.dcm#1", 1, sop_instance_uid="1.2.840.9", frame_number=1),
            _new("/in/mf.dcm#2", 2, sop_instance_uid="1.2.840.9", frame_number=2),
        ],
    )
    assert [r.status for r in out] == ["queued", "queued"]


def test_duplicates_within_one_batch(db_engine: Engine) -> None:
    out = register_images(
        db_engine, [_new("/in/b.dcm", 3), _new("/in/a.dcm", 3), _new("/in/c.dcm", 4)]
    )
    statuses = sorted(r.status for r in out[:2])
    assert statuses == ["duplicate", "queued"]
    original = next(r for r in out[:2] if r.status == "queued")
    duplicate = next(r for r in out[:2] if r.status == "duplicate")
    assert duplicate.duplicate_of == original.image_id
    assert out[2].status == "queued"


def test_register_rejects_unknown_queue(db_engine: Engine) -> None:
    with pytest.raises(ValueError, match="queue"):
        register_images(db_engine, [_new("/in/a.dcm", 1, queue="urgent")])


def test_concurrent_registrants_agree_on_one_original(db_url: str, db_engine: Engine) -> None:
    # Two watchers see copies of the same 40 files under different names at the same time.
    barrier = threading.Barrier(2)
    results: dict[str, list] = {}
    errors: list[BaseException] = []

    def register(name: str) -> None:
        engine = make_engine(db_url)
        try:
            barrier.wait()
            items = [_new(f"/{name}/{n}.dcm", n) for n in range(40)]
            out = []
            for start in range(0, 40, 8):
                out.extend(register_images(engine, items[start : start + 8]))
            results[name] = out
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=register, args=(n,)) for n in ("left", "right")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for n in range(40):
        pair = [results["left"][n], results["right"][n]]
        assert sorted(r.status for r in pair) == ["duplicate", "queued"]
        original = next(r for r in pair if r.status == "queued")
        assert next(r for r in pair if r.status == "duplicate").duplicate_of == original.image_id


# --------------------------------------------------------------------------- claiming


def test_claim_sets_processing_attempts_and_lease(db_engine: Engine) -> None:
    register_images(db_engine, [_new("/in/a.dcm", 1, study_uid="S", body_part_examined="HAND")])
    before = utcnow()
    (claimed,) = claim_batch(db_engine, limit=5, lease_seconds=30, worker_id="host:1")
    assert claimed.attempts == 1 and claimed.path == "/in/a.dcm"
    assert claimed.study_uid == "S" and claimed.body_part_examined == "HAND"
    row = _image(db_engine, claimed.image_id)
    assert row["status"] == "processing" and row["leased_by"] == "host:1"
    lease = row["lease_expires_at"]
    assert isinstance(lease, datetime)
    assert before + timedelta(seconds=29) < lease < utcnow() + timedelta(seconds=31)
    # Leased and not expired: nobody else gets it.
    assert claim_batch(db_engine, limit=5, lease_seconds=30, worker_id="host:2") == []


def test_claim_batch_never_hands_a_row_to_two_claimers(db_url: str, db_engine: Engine) -> None:
    register_images(db_engine, [_new(f"/in/{n}.dcm", n) for n in range(200)])
    barrier = threading.Barrier(2)
    claims: dict[str, list[int]] = {"w1": [], "w2": []}
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        engine = make_engine(db_url)
        try:
            barrier.wait()
            while batch := claim_batch(engine, limit=7, lease_seconds=60, worker_id=name):
                claims[name].extend(c.image_id for c in batch)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=worker, args=(n,)) for n in claims]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    first, second = set(claims["w1"]), set(claims["w2"])
    assert len(first) == len(claims["w1"]) and len(second) == len(claims["w2"])
    assert not first & second
    assert len(first | second) == 200
    assert count_by_status(db_engine)["processing"] == 200


def test_live_is_claimed_before_bulk_then_oldest_first(db_engine: Engine) -> None:
    bulk = register_images(db_engine, [_new(f"/arch/{n}.dcm", n, queue="bulk") for n in range(3)])
    live = register_images(db_engine, [_new(f"/in/{n}.dcm", 10 + n) for n in range(2)])
    live_ids = sorted(r.image_id for r in live)
    bulk_ids = sorted(r.image_id for r in bulk)
    first = claim_batch(db_engine, limit=3, lease_seconds=60, worker_id="w")
    assert [c.image_id for c in first] == live_ids + bulk_ids[:1]
    rest = claim_batch(db_engine, limit=3, lease_seconds=60, worker_id="w")
    assert [c.image_id for c in rest] == bulk_ids[1:]


def test_claim_batch_honours_queues(db_engine: Engine) -> None:
    register_images(db_engine, [_new("/arch/a.dcm", 1, queue="bulk"), _new("/in/b.dcm", 2)])
    got = claim_batch(db_engine, limit=10, lease_seconds=60, worker_id="w", queues=["bulk"])
    assert [c.queue for c in got] == ["bulk"]


def test_expired_lease_is_claimed_again(db_engine: Engine) -> None:
    register_images(db_engine, [_new("/in/a.dcm", 1)])
    (first,) = claim_batch(db_engine, limit=1, lease_seconds=-1, worker_id="crashed")
    (second,) = claim_batch(db_engine, limit=1, lease_seconds=60, worker_id="healthy")
    assert second.image_id == first.image_id
    assert second.attempts == 2
    assert _image(db_engine, first.image_id)["leased_by"] == "healthy"


def test_reclaim_expired_requeues_only_expired_leases(db_engine: Engine) -> None:
    a, b = register_images(db_engine, [_new("/in/a.dcm", 1), _new("/in/b.dcm", 2)])
    (stale,) = claim_images(db_engine, [a.image_id], lease_seconds=-1, worker_id="crashed")
    (fresh,) = claim_images(db_engine, [b.image_id], lease_seconds=60, worker_id="alive")
    assert reclaim_expired(db_engine) == 1
    assert _image(db_engine, stale.image_id)["status"] == "queued"
    assert _image(db_engine, stale.image_id)["lease_expires_at"] is None
    assert _image(db_engine, fresh.image_id)["status"] == "processing"
    assert reclaim_expired(db_engine) == 0


def test_lease_expiring_too_often_fails_the_image(db_engine: Engine) -> None:
    register_images(db_engine, [_new("/in/poison.dcm", 1)])
    for _ in range(3):
        assert claim_batch(db_engine, limit=1, lease_seconds=-1, worker_id="w", max_attempts=3)
    assert claim_batch(db_engine, limit=1, lease_seconds=60, worker_id="w", max_attempts=3) == []
    (row,) = query_results(db_engine)
    assert row["status"] == "failed" and row["error_class"] == "LeaseExpired"
    assert row["attempts"] == 3


def test_claim_images_only_takes_queued_or_expired(db_engine: Engine) -> None:
    out = register_images(db_engine, [_new(f"/in/{n}.dcm", n) for n in range(4)])
    a, b, c, d = (r.image_id for r in out)
    claim_images(db_engine, [b], lease_seconds=60, worker_id="other")
    claim_images(db_engine, [c], lease_seconds=-1, worker_id="crashed")
    claim_images(db_engine, [d], lease_seconds=60, worker_id="w")
    record_results(db_engine, [_prediction(d, 0.3)])
    got = claim_images(db_engine, [d, c, b, a, 999], lease_seconds=60, worker_id="me")
    assert [g.image_id for g in got] == [a, c]
    assert claim_images(db_engine, [a], lease_seconds=60, worker_id="again") == []


# --------------------------------------------------------------------------- results


def test_record_results_marks_done_and_clears_the_lease(db_engine: Engine) -> None:
    (reg,) = register_images(db_engine, [_new("/in/a.dcm", 1)])
    _claim_all(db_engine)
    record_results(db_engine, [_prediction(reg.image_id, 0.8)])
    row = _image(db_engine, reg.image_id)
    assert row["status"] == "done"
    assert row["lease_expires_at"] is None and row["leased_by"] is None
    assert row["finished_at"] is not None
    assert (row["rows"], row["columns"]) == (512, 400)


def test_recording_the_same_prediction_twice_keeps_one_row(db_engine: Engine) -> None:
    (reg,) = register_images(db_engine, [_new("/in/a.dcm", 1)])
    _claim_all(db_engine)
    record_results(db_engine, [_prediction(reg.image_id, 0.8)])
    record_results(db_engine, [_prediction(reg.image_id, 0.8)])
    assert _n_predictions(db_engine) == 1
    (row,) = query_results(db_engine)
    assert row["p_fracture"] == pytest.approx(0.8)


def test_new_bundle_version_adds_rows_and_becomes_latest(db_engine: Engine) -> None:
    (reg,) = register_images(db_engine, [_new("/in/a.dcm", 1, study_uid="S")])
    _claim_all(db_engine)
    record_results(db_engine, [_prediction(reg.image_id, 0.2, version="1.0")])
    record_results(db_engine, [_prediction(reg.image_id, 0.9, version="2.0")])
    assert _n_predictions(db_engine) == 2
    (row,) = query_results(db_engine)
    assert row["bundle"] == BUNDLE and row["bundle_version"] == "2.0"
    assert row["p_fracture"] == pytest.approx(0.9)
    studies = query_studies(db_engine, study="S")
    assert [(s["bundle_version"], s["mean_p_fracture"]) for s in studies] == [
        ("1.0", pytest.approx(0.2)),
        ("2.0", pytest.approx(0.9)),
    ]


def test_study_score_is_the_mean_of_its_images(db_engine: Engine) -> None:
    regs = register_images(
        db_engine,
        [_new(f"/in/s1/{n}.dcm", n, study_uid="S1") for n in range(3)]
        + [_new("/in/s2/0.dcm", 10, study_uid="S2")],
    )
    ids = [r.image_id for r in regs]
    _claim_all(db_engine)
    record_results(
        db_engine,
        [
            _prediction(ids[0], 0.2, part="HAND"),
            _prediction(ids[1], 0.3, part="WRIST"),
            _prediction(ids[2], 0.4, part="WRIST"),
            _prediction(ids[3], 0.7, part="ELBOW"),
        ],
    )
    (s1,) = query_studies(db_engine, study="S1")
    assert s1["n_images"] == 3
    assert s1["mean_p_fracture"] == pytest.approx(0.3)
    assert s1["body_part"] == "WRIST"
    assert s1["label"] == "negative" and s1["threshold"] == pytest.approx(0.5)
    (s2,) = query_studies(db_engine, study="S2")
    assert s2["label"] == "positive" and s2["mean_p_fracture"] == pytest.approx(0.7)

    # A late image of S1 is recorded on its own: the study is recomputed, not appended to.
    (late,) = register_images(db_engine, [_new("/in/s1/3.dcm", 3, study_uid="S1")])
    _claim_all(db_engine)
    record_results(db_engine, [_prediction(late.image_id, 0.9, part="WRIST")])
    (s1,) = query_studies(db_engine, study="S1")
    assert s1["n_images"] == 4
    assert s1["mean_p_fracture"] == pytest.approx(0.45)
    assert s1["label"] == "negative"
    assert [s["study_uid"] for s in query_studies(db_engine, label="positive")] == ["S2"]
    assert [s["study_uid"] for s in query_studies(db_engine, part="wrist")] == ["S1"]


def test_unsupported_images_do_not_count_in_the_study_mean(db_engine: Engine) -> None:
    regs = register_images(db_engine, [_new(f"/in/{n}.dcm", n, study_uid="S") for n in range(2)])
    _claim_all(db_engine)
    record_results(
        db_engine,
        [
            _prediction(regs[0].image_id, 0.6),
            _prediction(regs[1].image_id, None, status="unsupported"),
        ],
    )
    assert _image(db_engine, regs[1].image_id)["status"] == "unsupported"
    (study,) = query_studies(db_engine)
    assert study["n_images"] == 1 and study["mean_p_fracture"] == pytest.approx(0.6)


def test_failures_are_recorded_with_class_and_reason(db_engine: Engine) -> None:
    regs = register_images(db_engine, [_new("/in/a.dcm", 1), _new("/in/b.dcm", 2)])
    _claim_all(db_engine)
    record_results(
        db_engine,
        [_prediction(regs[0].image_id, 0.1)],
        [FailureRecord(regs[1].image_id, "failed", "NoPixelData", "DICOM has no pixel data")],
    )
    row = _image(db_engine, regs[1].image_id)
    assert row["status"] == "failed" and row["error_class"] == "NoPixelData"
    assert row["reason"] == "DICOM has no pixel data" and row["lease_expires_at"] is None
    assert count_by_status(db_engine)["done"] == 1


def test_release_for_retry_caps_attempts(db_engine: Engine) -> None:
    (reg,) = register_images(db_engine, [_new("/in/a.dcm", 1)])
    for attempt in (1, 2):
        (claimed,) = claim_batch(db_engine, limit=1, lease_seconds=60, worker_id="w")
        assert claimed.attempts == attempt
        release_for_retry(
            db_engine,
            [reg.image_id],
            error_class="OperationalError",
            reason="db down",
            max_attempts=3,
            backoff_seconds=0,
        )
        row = _image(db_engine, reg.image_id)
        assert row["status"] == "queued" and row["error_class"] == "OperationalError"
        assert row["lease_expires_at"] is None
    claim_batch(db_engine, limit=1, lease_seconds=60, worker_id="w")
    release_for_retry(
        db_engine, [reg.image_id], error_class="OperationalError", reason="db down", max_attempts=3
    )
    row = _image(db_engine, reg.image_id)
    assert row["status"] == "failed" and row["attempts"] == 3
    assert "db down" in str(row["reason"])
    assert claim_batch(db_engine, limit=1, lease_seconds=60, worker_id="w") == []


def test_release_for_retry_leaves_finished_images_alone(db_engine: Engine) -> None:
    (reg,) = register_images(db_engine, [_new("/in/a.dcm", 1)])
    _claim_all(db_engine)
    record_results(db_engine, [_prediction(reg.image_id, 0.5)])
    release_for_retry(db_engine, [reg.image_id], error_class="E", reason="r", max_attempts=3)
    assert _image(db_engine, reg.image_id)["status"] == "done"


# --------------------------------------------------------------------------- queries


def test_count_by_status_includes_zeros(db_engine: Engine) -> None:
    assert count_by_status(db_engine) == dict.fromkeys(STATUSES, 0)
    register_images(db_engine, [_new("/in/a.dcm", 1), _new("/in/b.dcm", 1)])
    counts = count_by_status(db_engine)
    assert set(counts) == set(STATUSES)
    assert counts["queued"] == 1 and counts["duplicate"] == 1 and counts["done"] == 0


def test_query_results_filters(db_engine: Engine) -> None:
    regs = register_images(
        db_engine,
        [
            _new("/in/a.dcm", 1, study_uid="S1", sop_instance_uid="1.1"),
            _new("/in/b.dcm", 2, study_uid="S1", sop_instance_uid="1.2"),
            _new("/in/c.dcm", 3, study_uid="S2"),
            _new("/in/d.dcm", 4, study_uid="S2"),
            _new("/in/e.dcm", None, status="failed", error_class="NotAnImage", reason="text"),
        ],
    )
    a, b, c, d, e = (r.image_id for r in regs)
    _claim_all(db_engine)
    record_results(
        db_engine,
        [
            _prediction(a, 0.9, part="HAND"),
            _prediction(b, 0.1, part="HAND"),
            _prediction(c, 0.6, part="ELBOW"),
        ],
        [FailureRecord(d, "unsupported", "UnsupportedModality", "CT slice")],
    )

    def ids(**filters: object) -> list[int]:
        return [int(r["id"]) for r in query_results(db_engine, **filters)]  # type: ignore[arg-type]

    assert ids() == [a, b, c, d, e]
    assert ids(study="S1") == [a, b]
    assert ids(part="HAND") == [a, b]
    assert ids(part="elbow") == [c]
    assert ids(label="positive") == [a, c]
    assert ids(status="unsupported") == [d]
    assert ids(status="failed") == [e]
    assert ids(min_p=0.5) == [a, c]
    assert ids(max_p=0.5) == [b]
    assert ids(min_p=0.5, max_p=0.7) == [c]
    assert ids(limit=2) == [a, b]
    assert ids(since=utcnow() - timedelta(hours=1)) == [a, b, c, d, e]
    assert ids(since=utcnow() + timedelta(hours=1)) == []

    first, *_, last = query_results(db_engine)
    required = {
        "id", "path", "status", "reason", "error_class", "study_uid", "sop_instance_uid",
        "body_part", "body_part_confidence", "body_part_examined", "p_fracture", "label",
        "threshold", "bundle", "bundle_version", "duplicate_of", "attempts", "created_at",
        "heatmap_path",
    }  # fmt: skip
    assert required <= set(first)
    assert first["sop_instance_uid"] == "1.1" and first["bundle"] == BUNDLE
    created = datetime.fromisoformat(str(first["created_at"]))
    assert created.utcoffset() == timedelta(0)
    assert last["status"] == "failed" and last["reason"] == "text" and last["bundle"] is None


def test_complete_resend_of_a_failed_image_is_processed_not_a_duplicate(db_engine: Engine) -> None:
    (cut,) = register_images(db_engine, [_new("/in/a.dcm", 1, sop_instance_uid="1.2.840.77")])
    assert _claim_all(db_engine) == [cut.image_id]
    record_results(db_engine, [], [FailureRecord(cut.image_id, "failed", "Truncated", "cut short")])
    # re-sent under another name, as the listener keeps a second copy (the same name would
    # take the failed row again: tests/db/test_retake.py)
    (whole,) = register_images(db_engine, [_new("/in/a.1.dcm", 2, sop_instance_uid="1.2.840.77")])
    assert whole.created and whole.status == "queued" and whole.duplicate_of is None
    assert _claim_all(db_engine) == [whole.image_id]
    # a third copy of the same instance is now a duplicate of the complete one
    (third,) = register_images(db_engine, [_new("/in/b.dcm", 3, sop_instance_uid="1.2.840.77")])
    assert third.status == "duplicate" and third.duplicate_of == whole.image_id


def test_leases_of_a_dead_worker_are_released_at_once(db_engine: Engine) -> None:
    register_images(db_engine, [_new(f"/in/{i}.dcm", i) for i in range(6)])
    dead = claim_batch(db_engine, limit=4, lease_seconds=3600, worker_id="host:1")
    alive = claim_batch(db_engine, limit=2, lease_seconds=3600, worker_id="host:2")
    assert lease_holders(db_engine) == ["host:1", "host:2"]
    assert release_leases(db_engine, ["host:1"]) == len(dead) == 4
    counts = count_by_status(db_engine)
    assert counts["queued"] == 4 and counts["processing"] == len(alive) == 2
    again = claim_batch(db_engine, limit=10, lease_seconds=60, worker_id="host:3")
    assert sorted(c.image_id for c in again) == sorted(c.image_id for c in dead)
    assert all(c.attempts == 2 for c in again)  # the lost attempt still counts


def test_a_stale_worker_cannot_release_a_row_another_worker_holds(db_engine: Engine) -> None:
    (reg,) = register_images(db_engine, [_new("/in/a.dcm", 1)])
    claim_batch(db_engine, limit=1, lease_seconds=-1, worker_id="slow")  # lease already over
    (taken,) = claim_batch(db_engine, limit=1, lease_seconds=60, worker_id="fresh")
    release_for_retry(
        db_engine,
        [reg.image_id],
        error_class="IO",
        reason="eio",
        max_attempts=5,
        worker_id="slow",
    )
    assert _image(db_engine, taken.image_id)["status"] == "processing"
    assert _image(db_engine, taken.image_id)["leased_by"] == "fresh"


def test_a_transient_failure_waits_out_its_backoff(db_engine: Engine) -> None:
    from datetime import timedelta

    (reg,) = register_images(db_engine, [_new("/in/a.dcm", 1)])
    claim_batch(db_engine, limit=1, lease_seconds=60, worker_id="w")
    before = utcnow()
    release_for_retry(
        db_engine,
        [reg.image_id],
        error_class="OSError",
        reason="EIO",
        max_attempts=5,
        backoff_seconds=30,
    )
    assert claim_batch(db_engine, limit=1, lease_seconds=60, worker_id="w") == []
    ready_at = next_retry_at(db_engine)
    assert ready_at is not None
    assert before + timedelta(seconds=22) <= ready_at <= utcnow() + timedelta(seconds=38)
    with db_engine.begin() as conn:
        conn.execute(images.update().values(retry_after=utcnow() - timedelta(seconds=1)))
    (again,) = claim_batch(db_engine, limit=1, lease_seconds=60, worker_id="w")
    assert again.attempts == 2


def test_the_callers_backoff_cap_bounds_the_scheduled_retry(db_engine: Engine) -> None:
    # A cap set by the caller (BONEWATCH_RETRY_BACKOFF_MAX) bounds retry_after itself: the jitter
    # used to add up to 25 % on top of it.
    regs = register_images(db_engine, [_new(f"/in/{n}.dcm", n) for n in range(20)])
    _claim_all(db_engine)
    before = utcnow()
    release_for_retry(
        db_engine,
        [r.image_id for r in regs],
        error_class="OSError",
        reason="EIO",
        max_attempts=5,
        backoff_seconds=30,
        backoff_cap_seconds=5,
    )
    released = utcnow()
    with db_engine.connect() as conn:
        waits = list(conn.scalars(select(images.c.retry_after)))
    assert len(waits) == 20
    assert all(w is not None and w <= released + timedelta(seconds=5) for w in waits)
    assert all(w is not None and w >= before + timedelta(seconds=3.75) for w in waits)


def test_backoff_doubles_up_to_its_cap() -> None:
    import random

    from bonewatch.db import retry_delay

    rng = random.Random(0)
    delays = [retry_delay(a, base=2, cap=60, rng=rng) for a in range(1, 9)]
    assert 1.5 <= delays[0] <= 2.5 and 3 <= delays[1] <= 5 and 6 <= delays[2] <= 10
    assert all(d <= 75 for d in delays) and delays[-1] >= 45


def test_registering_a_transiently_failed_file_again_queues_it(db_engine: Engine) -> None:
    (reg,) = register_images(db_engine, [_new("/in/a.dcm", 1)])
    claim_batch(db_engine, limit=1, lease_seconds=60, worker_id="w")
    release_for_retry(
        db_engine, [reg.image_id], error_class="TransientIOError", reason="EIO", max_attempts=1
    )
    assert _image(db_engine, reg.image_id)["status"] == "failed"
    (again,) = register_images(db_engine, [_new("/in/a.dcm", 1)])
    assert not again.created and again.requeued and again.status == "queued"
    assert _claim_all(db_engine) == [reg.image_id]
    # a file that failed for its own content stays failed
    bad = _new("/in/b.dcm", 2, status="failed", error_class="CorruptFileError", reason="bad")
    (first,) = register_images(db_engine, [bad])
    (second,) = register_images(db_engine, [_new("/in/b.dcm", 2)])
    assert not second.requeued and second.status == "failed"


def test_a_file_that_keeps_killing_its_worker_is_failed_not_retried(db_engine: Engine) -> None:
    (reg,) = register_images(db_engine, [_new("/in/poison.dcm", 1)])
    for attempt, worker in enumerate(["host:1", "host:2", "host:3"], start=1):
        (claimed,) = claim_batch(db_engine, limit=1, lease_seconds=3600, worker_id=worker)
        assert claimed.attempts == attempt
        release_leases(db_engine, [worker], max_attempts=3)
    row = _image(db_engine, reg.image_id)
    assert row["status"] == "failed" and row["error_class"] == "WorkerDied"
    # seeing the file again does not start the cycle over
    (again,) = register_images(db_engine, [_new("/in/poison.dcm", 1)])
    assert not again.requeued and again.status == "failed"


def test_a_failed_file_whose_copy_took_over_is_not_queued_twice(db_engine: Engine) -> None:
    (p,) = register_images(db_engine, [_new("/in/p.dcm", 1, sop_instance_uid="1.2.3.9")])
    claim_batch(db_engine, limit=1, lease_seconds=60, worker_id="w")
    release_for_retry(
        db_engine, [p.image_id], error_class="TransientIOError", reason="EIO", max_attempts=1
    )
    (q,) = register_images(db_engine, [_new("/in/q.dcm", 1, sop_instance_uid="1.2.3.9")])
    assert q.status == "queued"  # the copy took over the failed image's fingerprints
    (p_again,) = register_images(db_engine, [_new("/in/p.dcm", 1, sop_instance_uid="1.2.3.9")])
    assert not p_again.requeued and p_again.status == "failed"
    assert _claim_all(db_engine) == [q.image_id]


def test_a_worker_whose_lease_was_taken_over_cannot_record(db_engine: Engine) -> None:
    (a,) = register_images(db_engine, [_new("/in/a.dcm", 1)])
    claim_images(db_engine, [a.image_id], lease_seconds=-1, worker_id="slow")
    claim_batch(db_engine, limit=1, lease_seconds=60, worker_id="fast")
    late = FailureRecord(a.image_id, "failed", "ModelError", "late news from a stale worker")
    assert record_results(db_engine, [], [late], worker_id="slow") == 0
    assert record_results(db_engine, [_prediction(a.image_id, 0.3)], worker_id="fast") == 1
    row = _image(db_engine, a.image_id)
    assert row["status"] == "done" and row["reason"] is None
    assert record_results(db_engine, [], [late], worker_id="slow") == 0  # done stays done
    assert _image(db_engine, a.image_id)["status"] == "done"


def test_a_retried_task_takes_back_its_own_batch_or_one_handed_to_it(db_engine: Engine) -> None:
    a, b = register_images(db_engine, [_new("/in/a.dcm", 1), _new("/in/b.dcm", 2)])
    claim_images(db_engine, [a.image_id, b.image_id], lease_seconds=60, worker_id="host:1")
    # another process may not take them, unless the batch is handed over to it
    assert claim_images(db_engine, [a.image_id], lease_seconds=60, worker_id="host:2") == []
    (again,) = claim_images(db_engine, [a.image_id], lease_seconds=60, worker_id="host:1")
    assert again.image_id == a.image_id
    taken = claim_images(
        db_engine, [b.image_id], lease_seconds=60, worker_id="host:2", taking_over_from=["host:1"]
    )
    assert [c.image_id for c in taken] == [b.image_id]
    assert _image(db_engine, b.image_id)["leased_by"] == "host:2"


def test_ledger_health_counts_expired_leases(db_engine: Engine) -> None:
    from bonewatch.db import ledger_health

    a, b = register_images(db_engine, [_new("/in/a.dcm", 1), _new("/in/b.dcm", 2)])
    claim_images(db_engine, [a.image_id], lease_seconds=-1, worker_id="dead")
    claim_images(db_engine, [b.image_id], lease_seconds=60, worker_id="alive")
    record_results(db_engine, [_prediction(b.image_id, 0.3)])
    assert ledger_health(db_engine) == {
        "expired_leases": 1,
        "double_predictions": 0,
        "finished_without_prediction": 0,
    }


def test_only_one_caller_holds_an_exclusive_name_at_a_time(db_engine: Engine) -> None:
    from bonewatch.db import exclusive

    with exclusive(db_engine, "reconcile") as first:
        assert first
        if db_engine.dialect.name == "postgresql":
            with exclusive(db_engine, "reconcile") as second:
                assert not second
            with exclusive(db_engine, "another") as other:
                assert other
    with exclusive(db_engine, "reconcile") as again:
        assert again
