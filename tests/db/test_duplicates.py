"""Duplicates: the reason names the original by its stored path and id and says whether the bytes
are the same; a duplicate whose original fails is queued again, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading

from sqlalchemy import Engine, select

from bonewatch.db import (
    FailureRecord,
    NewImage,
    claim_batch,
    make_engine,
    record_results,
    register_images,
    release_for_retry,
    release_leases,
)
from bonewatch.db.schema import fingerprints, images


def _new(path: str, sha: int, sop: str | None = None) -> NewImage:
    return NewImage(
        path=path, sha256=f"{sha:064x}", size_bytes=10, format="dicom", sop_instance_uid=sop
    )


def _row(engine: Engine, image_id: int) -> dict:
    with engine.connect() as conn:
        return dict(conn.execute(select(images).where(images.c.id == image_id)).one()._mapping)


def _owner(engine: Engine, kind: str, value: str) -> int:
    with engine.connect() as conn:
        return conn.execute(
            select(fingerprints.c.image_id).where(
                fingerprints.c.kind == kind, fingerprints.c.value == value
            )
        ).scalar_one()


def _claim(engine: Engine, worker: str = "w1") -> list[int]:
    return [c.image_id for c in claim_batch(engine, limit=100, lease_seconds=60, worker_id=worker)]


def test_a_duplicate_names_its_original_and_whether_the_bytes_are_the_same(db_engine):
    (orig,) = register_images(db_engine, [_new("/in/PAT1/IM0001", 1, "1.2.3.1")])
    (copy,) = register_images(db_engine, [_new("/in/copy/IM0001", 1, "1.2.3.1")])
    (resent,) = register_images(db_engine, [_new("/in/resent/IM0001", 2, "1.2.3.1")])
    (third,) = register_images(db_engine, [_new("/in/third/IM0001", 2, "1.2.3.1")])

    assert _row(db_engine, copy.image_id)["reason"] == (
        f"same bytes as image {orig.image_id} (/in/PAT1/IM0001)"
    )
    assert _row(db_engine, resent.image_id)["reason"] == (
        f"same SOPInstanceUID as image {orig.image_id} (/in/PAT1/IM0001), different bytes"
    )
    # the same bytes as another duplicate: still the original's SOPInstanceUID, other bytes
    assert third.duplicate_of == orig.image_id
    assert _row(db_engine, third.image_id)["reason"] == (
        f"same SOPInstanceUID as image {orig.image_id} (/in/PAT1/IM0001), different bytes"
    )


def _cut_and_copies(engine: Engine) -> dict[str, int]:
    """A damaged copy and three good ones of one instance, plus a byte copy of the damaged one,
    registered in one chunk: the damaged copy sorts first and owns the SOPInstanceUID."""
    out = register_images(
        engine,
        [
            _new("/in/a_cut.dcm", 1, "1.2.840.77"),
            _new("/in/b_whole.dcm", 2, "1.2.840.77"),
            _new("/in/c_whole_again.dcm", 2, "1.2.840.77"),
            _new("/in/d_other.dcm", 3, "1.2.840.77"),
            _new("/in/e_cut_copy.dcm", 1, "1.2.840.77"),
        ],
    )
    names = ["cut", "whole", "whole_again", "other", "cut_copy"]
    ids = dict(zip(names, (r.image_id for r in out), strict=True))
    assert [r.status for r in out] == ["queued", "duplicate", "duplicate", "duplicate", "duplicate"]
    return ids


def _assert_taken_over(engine: Engine, ids: dict[str, int]) -> None:
    whole = _row(engine, ids["whole"])
    assert whole["status"] == "queued" and whole["duplicate_of"] is None
    assert whole["reason"] is None and whole["finished_at"] is None
    assert _owner(engine, "sop", "1.2.840.77") == ids["whole"]
    again, other = _row(engine, ids["whole_again"]), _row(engine, ids["other"])
    assert again["status"] == "duplicate" and again["duplicate_of"] == ids["whole"]
    assert again["reason"] == f"same bytes as image {ids['whole']} (/in/b_whole.dcm)"
    assert other["status"] == "duplicate" and other["duplicate_of"] == ids["whole"]
    assert other["reason"] == (
        f"same SOPInstanceUID as image {ids['whole']} (/in/b_whole.dcm), different bytes"
    )
    # a byte copy of the damaged file would fail the same way: it stays its duplicate
    cut_copy = _row(engine, ids["cut_copy"])
    assert cut_copy["status"] == "duplicate" and cut_copy["duplicate_of"] == ids["cut"]
    assert _claim(engine) == [ids["whole"]]
    # a later copy of the instance is a duplicate of the good one, not of the failure
    (late,) = register_images(engine, [_new("/in/late.dcm", 9, "1.2.840.77")])
    assert late.status == "duplicate" and late.duplicate_of == ids["whole"]


def test_duplicates_of_an_original_that_fails_are_queued_again(db_engine):
    ids = _cut_and_copies(db_engine)
    assert _claim(db_engine) == [ids["cut"]]
    record_results(
        db_engine,
        [],
        [FailureRecord(ids["cut"], "failed", "TruncatedFileError", "cut short")],
        worker_id="w1",
    )
    assert _row(db_engine, ids["cut"])["status"] == "failed"
    _assert_taken_over(db_engine, ids)


def test_an_unsupported_original_keeps_its_duplicates(db_engine):
    ids = _cut_and_copies(db_engine)
    _claim(db_engine)
    record_results(db_engine, [], [FailureRecord(ids["cut"], "unsupported", "X", "a CT")])
    assert _row(db_engine, ids["whole"])["status"] == "duplicate"


def test_an_original_given_up_on_by_the_lease_rules_hands_over_too(db_engine):
    ids = _cut_and_copies(db_engine)
    _claim(db_engine)
    release_for_retry(
        db_engine, [ids["cut"]], error_class="TransientIOError", reason="EIO", max_attempts=1
    )
    assert _row(db_engine, ids["cut"])["status"] == "failed"
    _assert_taken_over(db_engine, ids)

    other = _cut_and_copies_at(db_engine, "/w")
    for worker in ("host:1", "host:2"):
        claim_batch(db_engine, limit=1, lease_seconds=3600, worker_id=worker)
        release_leases(db_engine, [worker], max_attempts=2)
    assert _row(db_engine, other["cut"])["error_class"] == "WorkerDied"
    assert _row(db_engine, other["whole"])["status"] == "queued"


def _cut_and_copies_at(engine: Engine, prefix: str) -> dict[str, int]:
    out = register_images(
        engine,
        [_new(f"{prefix}/a_cut.dcm", 11, "1.2.9.9"), _new(f"{prefix}/b_whole.dcm", 12, "1.2.9.9")],
    )
    return {"cut": out[0].image_id, "whole": out[1].image_id}


def test_a_failure_and_a_new_copy_at_the_same_time_never_strand_the_copy(db_url, db_engine):
    # One worker records the original's failure while a watcher registers another copy of the
    # same instance: whichever commits first, the copy ends queued or a duplicate of a row
    # that did not fail.
    for round_ in range(12):
        sop = f"1.2.7.{round_}"
        (cut,) = register_images(db_engine, [_new(f"/r{round_}/a.dcm", 100 + 3 * round_, sop)])
        (claimed,) = claim_batch(db_engine, limit=1, lease_seconds=60, worker_id="w1")
        assert claimed.image_id == cut.image_id
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []
        copy: list[int] = []

        def fail(barrier=barrier, cut=cut, errors=errors) -> None:
            engine = make_engine(db_url)
            try:
                barrier.wait()
                record_results(
                    engine, [], [FailureRecord(cut.image_id, "failed", "X", "bad")], worker_id="w1"
                )
            except BaseException as exc:
                errors.append(exc)
            finally:
                engine.dispose()

        def register(round_=round_, sop=sop, barrier=barrier, errors=errors, copy=copy) -> None:
            engine = make_engine(db_url)
            try:
                barrier.wait()
                (reg,) = register_images(engine, [_new(f"/r{round_}/b.dcm", 101 + 3 * round_, sop)])
                copy.append(reg.image_id)
            except BaseException as exc:
                errors.append(exc)
            finally:
                engine.dispose()

        threads = [threading.Thread(target=fail), threading.Thread(target=register)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        row = _row(db_engine, copy[0])
        if row["status"] == "duplicate":
            original = _row(db_engine, row["duplicate_of"])
            assert original["status"] != "failed", (round_, row, original)
        else:
            assert row["status"] == "queued", (round_, row)
        assert _owner(db_engine, "sop", sop) == copy[0]
        _claim(db_engine, "drain")  # leave nothing queued for the next round's claim
