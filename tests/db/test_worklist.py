"""db/worklist.py: the worklist's filters, sorts and pages, and the study page's data, on both
dialects."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from bonewatch.db.reviews import NewReview, record_review
from bonewatch.db.schema import studies, utcnow
from bonewatch.db.worklist import (
    WorklistFilter,
    bundle_versions,
    count_worklist,
    query_worklist,
    study_detail,
    worklist_window,
)
from tests.db.review_ledger import BUNDLE, add_study

B = {"bundle_name": BUNDLE[0], "bundle_version": BUNDLE[1]}


@pytest.fixture
def ledger(db_engine):
    """Six studies: scores, parts and thresholds chosen so every sort differs."""
    add_study(db_engine, "s.high", [0.95, 0.85], part="WRIST", threshold=0.5)
    add_study(db_engine, "s.edge", [0.52], part="HAND", threshold=0.5)
    add_study(db_engine, "s.low", [0.05], part="WRIST", threshold=0.5)
    add_study(db_engine, "s.mid", [0.4, 0.3], part="ELBOW", threshold=0.3, failed=1)
    add_study(db_engine, "s.refused", [None])  # stage 1 refused it: no study result
    add_study(db_engine, "s.other", [0.7], bundle=("other-bundle", "9"))
    record_review(
        db_engine,
        NewReview(study_uid="s.low", reviewer="bob", verdict="agree", **B),
    )
    # arrival times one hour apart, oldest first in the order above
    start = utcnow() - timedelta(days=2)
    with db_engine.begin() as conn:
        for i, uid in enumerate(["s.high", "s.edge", "s.low", "s.mid", "s.refused", "s.other"]):
            conn.execute(
                update(studies)
                .where(studies.c.study_uid == uid)
                .values(last_received_at=start + timedelta(hours=i))
            )
    return db_engine


def _uids(engine, **kw):
    return [r.study_uid for r in query_worklist(engine, WorklistFilter(**B, **kw)).rows]


def test_sorts(ledger):
    assert _uids(ledger) == ["s.high", "s.edge", "s.mid", "s.low"]
    # |0.9-0.5|=0.4, |0.52-0.5|=0.02, |0.05-0.5|=0.45, |0.35-0.3|=0.05
    assert _uids(ledger, sort="uncertain") == ["s.edge", "s.mid", "s.high", "s.low"]
    assert _uids(ledger, sort="newest") == ["s.mid", "s.low", "s.edge", "s.high"]


def test_filters(ledger):
    assert _uids(ledger, part="WRIST") == ["s.high", "s.low"]
    assert _uids(ledger, label="positive") == ["s.high", "s.edge", "s.mid"]
    assert _uids(ledger, label="negative") == ["s.low"]
    assert _uids(ledger, reviewed=True) == ["s.low"]
    assert _uids(ledger, reviewed=False) == ["s.high", "s.edge", "s.mid"]
    assert _uids(ledger, min_p=0.3, max_p=0.6) == ["s.edge", "s.mid"]
    assert _uids(ledger, status="failed") == ["s.mid"]
    assert _uids(ledger, status="unsupported") == []
    assert set(_uids(ledger, label="unscored")) == {"s.refused", "s.other"}
    assert _uids(ledger, label="unscored", status="unsupported") == ["s.refused"]
    assert _uids(ledger, label="unscored", part="WRIST") == []
    start = utcnow() - timedelta(days=2)
    window = {
        "since": start + timedelta(minutes=30),
        "until": start + timedelta(hours=2, minutes=30),
    }
    assert _uids(ledger, **window) == ["s.edge", "s.low"]
    assert _uids(ledger, sort="newest", **window) == ["s.low", "s.edge"]
    assert _uids(ledger, sort="uncertain", **window) == ["s.edge", "s.low"]


def test_rows_carry_results_statuses_and_reviews(ledger):
    rows = {r.study_uid: r for r in query_worklist(ledger, WorklistFilter(**B)).rows}
    mid = rows["s.mid"]
    assert mid.body_part == "ELBOW" and mid.n_images == 2 and mid.n_received == 3
    assert mid.mean_p_fracture == pytest.approx(0.35) and mid.label == "positive"
    assert mid.statuses == {"done": 2, "failed": 1}
    assert [(r.reviewer, r.verdict) for r in rows["s.low"].reviews] == [("bob", "agree")]
    assert mid.received_at is not None and mid.bundle == BUNDLE[0]


def test_pages_and_counts(ledger):
    f = WorklistFilter(**B)
    first = query_worklist(ledger, f, offset=0, limit=3)
    second = query_worklist(ledger, f, offset=3, limit=3)
    assert first.total == second.total == count_worklist(ledger, f) == 4
    assert [r.study_uid for r in first.rows + second.rows] == _uids(ledger)
    assert query_worklist(ledger, f, offset=10).rows == ()
    with pytest.raises(ValueError):
        query_worklist(ledger, f, offset=-1)


def test_window_gives_previous_and_next(ledger):
    f = WorklistFilter(**B)
    assert worklist_window(ledger, f, 0) == (None, "s.high", "s.edge")
    assert worklist_window(ledger, f, 2) == ("s.edge", "s.mid", "s.low")
    assert worklist_window(ledger, f, 3) == ("s.mid", "s.low", None)


def test_without_a_bundle_version_every_study_is_unscored(ledger):
    page = query_worklist(ledger, WorklistFilter())
    assert page.total == 6 and all(r.mean_p_fracture is None for r in page.rows)


def test_bundle_versions_newest_first(ledger):
    found = [(b.name, b.version, b.n_studies) for b in bundle_versions(ledger)]
    assert set(found) == {(BUNDLE[0], BUNDLE[1], 4), ("other-bundle", "9", 1)}
    assert found[0] == ("other-bundle", "9", 1)  # its result was written last


def test_filter_values_are_checked():
    with pytest.raises(ValueError):
        WorklistFilter(sort="random")
    with pytest.raises(ValueError):
        WorklistFilter(status="lost")
    with pytest.raises(ValueError):
        WorklistFilter(bundle_name="x")


def test_study_detail(ledger):
    detail = study_detail(ledger, "s.mid")
    assert detail.result.bundle == BUNDLE[0] and detail.result.n_images == 2
    assert [i.status for i in detail.images] == ["done", "done", "failed"]
    assert detail.images[0].prediction.p_fracture == pytest.approx(0.4)
    assert detail.images[2].prediction is None and detail.images[2].reason == "bad"
    assert not detail.images[0].prediction.has_heatmap
    refused = study_detail(ledger, "s.refused")
    assert refused.result is None and refused.images[0].status == "unsupported"
    assert study_detail(ledger, "no.such") is None
    other = study_detail(ledger, "s.other", bundle_name="nope", bundle_version="0")
    assert other.result.bundle == "other-bundle"  # falls back to the study's newest result
