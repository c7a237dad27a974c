"""db/reviews.py and db/audit.py: verdicts never touch predictions, history is kept, the latest
review counts; on both dialects."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect, select

from bonewatch.db.audit import query_audit, record_audit_event
from bonewatch.db.reviews import (
    NewReview,
    NoResultError,
    latest_reviews,
    record_review,
    review_counts,
    study_reviews,
)
from bonewatch.db.schema import predictions, study_results
from bonewatch.db.users import add_user, remove_user
from tests.db.review_ledger import BUNDLE, add_study


def _review(uid: str, verdict: str, **kw: object) -> NewReview:
    return NewReview(
        study_uid=uid,
        reviewer=str(kw.pop("reviewer", "bob")),
        verdict=verdict,
        bundle_name=BUNDLE[0],
        bundle_version=BUNDLE[1],
        **kw,  # type: ignore[arg-type]
    )


def _snapshot(engine):
    with engine.connect() as conn:
        return (
            [tuple(r) for r in conn.execute(select(predictions).order_by(predictions.c.id))],
            [tuple(r) for r in conn.execute(select(study_results))],
        )


def test_the_review_tables_exist_after_migrating(db_engine):
    tables = set(inspect(db_engine).get_table_names())
    assert {"users", "reviews", "audit_events"} <= tables
    indexes = {i["name"] for i in inspect(db_engine).get_indexes("study_results")}
    assert {"ix_study_results_bundle_score", "ix_study_results_bundle_part"} <= indexes


def test_a_review_is_a_new_row_and_predictions_stay(db_engine):
    add_study(db_engine, "1.2.3", [0.9, 0.7])  # positive
    before = _snapshot(db_engine)
    user = add_user(db_engine, "bob", "h")
    first = record_review(db_engine, _review("1.2.3", "agree", user_id=user), client="10.0.0.1")
    assert first.label == "positive" and first.model_label == "positive"
    assert first.model_score == pytest.approx(0.8)
    second = record_review(
        db_engine, _review("1.2.3", "disagree", reviewer="alice", comment="  no line  ")
    )
    assert second.label == "negative" and second.comment == "no line"
    assert [r.id for r in study_reviews(db_engine, "1.2.3")] == [first.id, second.id]
    assert _snapshot(db_engine) == before
    latest = latest_reviews(db_engine)
    assert [(r.study_uid, r.label, r.reviewer, r.part) for r in latest] == [
        ("1.2.3", "negative", "alice", "WRIST")
    ]
    assert review_counts(db_engine) == {"agree": 1, "disagree": 1, "studies": 1}
    events = query_audit(db_engine, action="review")
    assert [(e.username, e.review_id) for e in events] == [("alice", second.id), ("bob", first.id)]
    assert events[1].client == "10.0.0.1"
    remove_user(db_engine, "bob")  # the name stays on the review
    assert study_reviews(db_engine, "1.2.3")[0].reviewer == "bob"


def test_label_part_and_comment_are_checked(db_engine):
    add_study(db_engine, "1.2.4", [0.1])  # negative
    assert record_review(db_engine, _review("1.2.4", "agree", label="negative")).label == (
        "negative"
    )
    with pytest.raises(ValueError, match="means negative"):
        record_review(db_engine, _review("1.2.4", "agree", label="positive"))
    with pytest.raises(ValueError, match="part"):
        record_review(db_engine, _review("1.2.4", "agree", part="KNEE"))
    with pytest.raises(ValueError, match="verdict"):
        record_review(db_engine, _review("1.2.4", "maybe"))
    with pytest.raises(ValueError, match="4000"):
        record_review(db_engine, _review("1.2.4", "agree", comment="x" * 4001))
    other = add_study(db_engine, "1.2.5", [0.2])
    with pytest.raises(ValueError, match="not part of this study"):
        record_review(db_engine, _review("1.2.4", "agree", image_id=other[0]))
    corrected = record_review(db_engine, _review("1.2.4", "disagree", part="HAND"))
    assert corrected.part == "HAND" and corrected.label == "positive"
    assert latest_reviews(db_engine)[0].part == "HAND"


def test_a_study_without_that_result_cannot_be_reviewed(db_engine):
    add_study(db_engine, "1.2.6", [None])  # refused by stage 1: no study result
    with pytest.raises(NoResultError):
        record_review(db_engine, _review("1.2.6", "agree"))
    with pytest.raises(NoResultError):
        record_review(db_engine, _review("9.9.9", "agree"))


def test_latest_reviews_by_bundle_version(db_engine):
    add_study(db_engine, "1.2.7", [0.9])
    add_study(db_engine, "1.2.7", [0.2], bundle=("review-bundle", "2.0"))
    record_review(db_engine, _review("1.2.7", "agree"))
    record_review(
        db_engine,
        NewReview(
            study_uid="1.2.7",
            reviewer="bob",
            verdict="agree",
            bundle_name="review-bundle",
            bundle_version="2.0",
        ),  # fmt: skip
    )
    assert latest_reviews(db_engine)[0].bundle_version == "2.0"
    old = latest_reviews(db_engine, bundle_name="review-bundle", bundle_version="1.0")
    assert [(r.label, r.model_label) for r in old] == [("positive", "positive")]


def test_audit_events(db_engine):
    record_audit_event(db_engine, "login", username="x" * 100, client="1.2.3.4")
    record_audit_event(db_engine, "view_study", username="bob", study_uid="1.2.3")
    assert query_audit(db_engine, study_uid="1.2.3")[0].action == "view_study"
    assert len(query_audit(db_engine, action="login")[0].username) == 64
    with pytest.raises(ValueError):
        record_audit_event(db_engine, "delete_everything")
