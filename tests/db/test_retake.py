"""A file whose bytes change before its row got a result is taken again as that row: one row per
path for a file that failed while it was still being written, never a failed row beside a done
one, its study counted once; rows that hold a result stay, and new bytes beside them are a new
image. On SQLite and PostgreSQL."""

from __future__ import annotations

from sqlalchemy import Engine, select

from bonewatch.db import (
    FailureRecord,
    NewImage,
    claim_batch,
    record_results,
    register_images,
)
from bonewatch.db.schema import fingerprints, images, studies
from tests.db.test_ledger import _prediction

STUDY = "1.2.840.5"


def _new(path: str, sha: int, *, sop: str = "1.2.840.5.1", study: str | None = STUDY, **kw):
    return NewImage(
        path=path,
        sha256=f"{sha:064x}",
        size_bytes=100 + sha,
        format="dicom",
        sop_instance_uid=sop,
        study_uid=study,
        **kw,
    )


def _rows(engine: Engine, path: str) -> list[dict]:
    with engine.connect() as conn:
        return [
            dict(r._mapping)
            for r in conn.execute(select(images).where(images.c.path == path).order_by(images.c.id))
        ]


def _fingerprints(engine: Engine, image_id: int) -> set[tuple[str, str]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(fingerprints.c.kind, fingerprints.c.value).where(
                fingerprints.c.image_id == image_id
            )
        )
        return {(r.kind, r.value) for r in rows}


def _received(engine: Engine, study: str) -> int | None:
    with engine.connect() as conn:
        return conn.scalar(select(studies.c.n_received).where(studies.c.study_uid == study))


def _fail(engine: Engine, image_id: int, error: str = "TruncatedFileError") -> None:
    (claimed,) = claim_batch(engine, limit=1, lease_seconds=60, worker_id="w")
    assert claimed.image_id == image_id
    record_results(engine, [], [FailureRecord(image_id, "failed", error, "cut short")])


def test_a_file_that_failed_while_written_is_taken_again_as_its_row(db_engine: Engine) -> None:
    (cut,) = register_images(db_engine, [_new("/in/a.dcm", 1)])
    _fail(db_engine, cut.image_id)
    assert _received(db_engine, STUDY) == 1

    (whole,) = register_images(db_engine, [_new("/in/a.dcm", 2)])

    assert whole.image_id == cut.image_id and whole.retaken and not whole.created
    assert whole.status == "queued" and whole.requeued  # callers queue it like a new one
    (row,) = _rows(db_engine, "/in/a.dcm")
    assert row["sha256"] == f"{2:064x}" and row["size_bytes"] == 102
    assert row["attempts"] == 0 and row["error_class"] is None and row["reason"] is None
    assert row["finished_at"] is None
    # the truncated bytes' fingerprint went with them
    assert _fingerprints(db_engine, cut.image_id) == {
        ("sha256", f"{2:064x}"),
        ("sop", "1.2.840.5.1"),
    }
    assert _received(db_engine, STUDY) == 1, "the study counted the same instance twice"
    (claimed,) = claim_batch(db_engine, limit=5, lease_seconds=60, worker_id="w")
    assert claimed.image_id == cut.image_id and claimed.sha256 == f"{2:064x}"
    record_results(db_engine, [_prediction(cut.image_id, 0.7)])
    assert [r["status"] for r in _rows(db_engine, "/in/a.dcm")] == ["done"]
    # registering the complete file once more changes nothing
    (again,) = register_images(db_engine, [_new("/in/a.dcm", 2)])
    assert again.image_id == cut.image_id and not again.retaken and again.status == "done"


def test_a_file_unreadable_at_the_door_is_taken_again_into_its_study(db_engine: Engine) -> None:
    # Refused at registration (no header yet, so no study): the complete file is one arrival.
    (cut,) = register_images(
        db_engine,
        [_new("/in/b.dcm", 1, study=None, status="failed", error_class="NotAnImageError")],
    )
    (whole,) = register_images(db_engine, [_new("/in/b.dcm", 2)])
    assert whole.image_id == cut.image_id and whole.status == "queued"
    assert _received(db_engine, STUDY) == 1
    # a queued row whose bytes change again before any worker took it follows them
    (newer,) = register_images(db_engine, [_new("/in/b.dcm", 3, study="1.2.840.6")])
    assert newer.image_id == cut.image_id and newer.status == "queued"
    assert _received(db_engine, STUDY) == 0 and _received(db_engine, "1.2.840.6") == 1
    assert len(_rows(db_engine, "/in/b.dcm")) == 1


def test_a_row_with_a_result_stays_and_new_bytes_beside_it_are_a_new_image(
    db_engine: Engine,
) -> None:
    (first,) = register_images(db_engine, [_new("/in/c.dcm", 1)])
    claim_batch(db_engine, limit=1, lease_seconds=60, worker_id="w")
    record_results(db_engine, [_prediction(first.image_id, 0.2)])

    (second,) = register_images(db_engine, [_new("/in/c.dcm", 2, sop="1.2.840.5.2")])

    assert second.created and second.image_id != first.image_id and not second.retaken
    assert [r["status"] for r in _rows(db_engine, "/in/c.dcm")] == ["done", "queued"]


def test_new_bytes_while_the_row_is_processed_wait_for_it(db_engine: Engine) -> None:
    (cut,) = register_images(db_engine, [_new("/in/d.dcm", 1)])
    claim_batch(db_engine, limit=1, lease_seconds=60, worker_id="w")

    (busy,) = register_images(db_engine, [_new("/in/d.dcm", 2)])

    assert busy.deferred and busy.image_id == cut.image_id and busy.status == "processing"
    (row,) = _rows(db_engine, "/in/d.dcm")
    assert row["sha256"] == f"{1:064x}" and row["leased_by"] == "w"
    # the worker's read fails on the changed bytes; offered again, the file retakes the row
    record_results(
        db_engine, [], [FailureRecord(cut.image_id, "failed", "FileChangedError", "changed")]
    )
    (whole,) = register_images(db_engine, [_new("/in/d.dcm", 2)])
    assert whole.retaken and whole.image_id == cut.image_id and whole.status == "queued"
    assert len(_rows(db_engine, "/in/d.dcm")) == 1


def test_a_retaken_copy_of_a_known_image_is_its_duplicate(db_engine: Engine) -> None:
    (orig,) = register_images(db_engine, [_new("/in/orig.dcm", 7, sop="1.2.840.5.9")])
    (cut,) = register_images(
        db_engine,
        [_new("/in/e.dcm", 3, sop="1.2.840.5.8", status="failed", error_class="Truncated")],
    )
    assert _received(db_engine, STUDY) == 2
    # complete, the file turns out to be a byte copy of an image already known
    (whole,) = register_images(db_engine, [_new("/in/e.dcm", 7, sop="1.2.840.5.9")])
    assert whole.retaken and whole.image_id == cut.image_id
    assert whole.status == "duplicate" and whole.duplicate_of == orig.image_id
    assert _received(db_engine, STUDY) == 1, "the study counts a copy as an instance"
    assert _fingerprints(db_engine, cut.image_id) == set()


def test_where_finished_files_are_moved_away_new_bytes_at_their_path_are_new(
    db_engine: Engine,
) -> None:
    # Quarantine moved the failed file to failed/: what now has its name is another file, and
    # the moved one keeps its row.
    (moved,) = register_images(db_engine, [_new("/in/f.dcm", 1)])
    _fail(db_engine, moved.image_id)
    (other,) = register_images(db_engine, [_new("/in/f.dcm", 2)], retake_finished=False)
    assert other.created and other.image_id != moved.image_id
    assert [r["status"] for r in _rows(db_engine, "/in/f.dcm")] == ["failed", "queued"]
    # a row still queued follows its file's bytes all the same: nothing moved it
    (newer,) = register_images(db_engine, [_new("/in/f.dcm", 3)], retake_finished=False)
    assert newer.retaken and newer.image_id == other.image_id
