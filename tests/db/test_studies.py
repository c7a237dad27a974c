"""Tests for db/studies.py: arrival times and study completeness, on both dialects."""

from __future__ import annotations

from datetime import datetime, timedelta

from bonewatch.db import NewImage, mark_stable_studies, query_arrivals, register_images
from bonewatch.db.schema import utcnow


def _image(n: int, study: str, sop: str | None = None) -> NewImage:
    return NewImage(
        path=f"/in/{study}/{n}.dcm",
        sha256=f"{n:064x}",
        size_bytes=10,
        format="dicom",
        study_uid=study,
        sop_instance_uid=sop or f"1.2.{n}",
    )


def _arrivals(engine) -> dict[str, dict]:
    return {row["study_uid"]: row for row in query_arrivals(engine)}


def test_new_instances_move_the_arrival_time_and_copies_do_not(db_engine):
    register_images(db_engine, [_image(1, "1.1"), _image(2, "1.1"), _image(3, "1.2")])
    first = _arrivals(db_engine)
    assert first["1.1"]["n_received"] == 2 and first["1.2"]["n_received"] == 1
    # the same file again, and a copy of a known SOP instance at another path
    register_images(db_engine, [_image(1, "1.1"), _image(9, "1.1", sop="1.2.1")])
    assert _arrivals(db_engine)["1.1"] == first["1.1"]


def test_a_quiet_study_is_stable_from_its_last_arrival_plus_the_quiet_time(db_engine):
    register_images(db_engine, [_image(1, "1.1")])
    last = datetime.fromisoformat(_arrivals(db_engine)["1.1"]["last_received_at"])
    assert mark_stable_studies(db_engine, 30) == 0  # not quiet long enough yet
    later = utcnow() + timedelta(seconds=31)
    assert mark_stable_studies(db_engine, 30, now=later) == 1
    stable = datetime.fromisoformat(_arrivals(db_engine)["1.1"]["stable_at"])
    assert stable == last + timedelta(seconds=30)
    assert mark_stable_studies(db_engine, 30, now=later) == 0  # once
    assert [r["study_uid"] for r in query_arrivals(db_engine, stable=True)] == ["1.1"]


def test_a_late_instance_opens_the_study_again(db_engine):
    register_images(db_engine, [_image(1, "1.1")])
    mark_stable_studies(db_engine, 0, now=utcnow() + timedelta(seconds=1))
    assert _arrivals(db_engine)["1.1"]["stable_at"] is not None
    register_images(db_engine, [_image(2, "1.1")])
    row = _arrivals(db_engine)["1.1"]
    assert row["stable_at"] is None and row["n_received"] == 2
    assert query_arrivals(db_engine, stable=False)[0]["study_uid"] == "1.1"
