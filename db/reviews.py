"""Reviewers' verdicts: recording them (never touching a prediction), and reading them back as
labels for training and for measuring the model against its reviewers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, and_, func, select

from bonewatch.db._sql import check_choice
from bonewatch.db.audit import add_audit_event
from bonewatch.db.engine import write_transaction
from bonewatch.db.records import FromAttrs
from bonewatch.db.schema import LABELS, VERDICTS, images, reviews, study_results, utcnow
from bonewatch.db.worklist import ReviewView, review_view

# A corrected body part: one of MURA's seven (the ledger keeps them upper-case).
PARTS: tuple[str, ...] = ("ELBOW", "FINGER", "FOREARM", "HAND", "HUMERUS", "SHOULDER", "WRIST")
MAX_COMMENT = 4000


@dataclass(frozen=True)
class NewReview:
    """A verdict on one bundle version's result for a study.

    ``label`` may be left out: ``agree`` then means the model's label and ``disagree`` the
    other one. Given, it must match the verdict.
    """

    study_uid: str
    reviewer: str
    verdict: str
    bundle_name: str
    bundle_version: str
    user_id: int | None = None
    label: str | None = None
    part: str | None = None
    comment: str | None = None
    image_id: int | None = None


class NoResultError(LookupError):
    """The study has no result from that bundle version: there is nothing to review."""


def _other(label: str) -> str:
    return "negative" if label == "positive" else "positive"


def record_review(engine: Engine, review: NewReview, *, client: str | None = None) -> ReviewView:
    """Store a review and its audit event in one transaction.

    Returns:
        The stored review, with the model's label and score it was given against.

    Raises:
        NoResultError: the study has no (labelled) result from that bundle version.
        ValueError: a verdict, label or part that is not one of the allowed values, a label that
            contradicts the verdict, a comment over 4000 characters, or an image of another
            study.
    """
    check_choice(review.verdict, VERDICTS, "verdict")
    if review.label is not None:
        check_choice(review.label, LABELS, "label")
    if review.part is not None:
        check_choice(review.part, PARTS, "part")
    comment = review.comment.strip() if review.comment else None
    if comment and len(comment) > MAX_COMMENT:
        raise ValueError(f"a comment is at most {MAX_COMMENT} characters")
    r = study_results
    with write_transaction(engine) as conn:
        result = conn.execute(
            select(r.c.label, r.c.mean_p_fracture).where(
                r.c.study_uid == review.study_uid,
                r.c.bundle_name == review.bundle_name,
                r.c.bundle_version == review.bundle_version,
            )
        ).first()
        if result is None or result.label is None:
            raise NoResultError(
                f"study {review.study_uid!r} has no result from {review.bundle_name} "
                f"{review.bundle_version} to review"
            )
        agreed = result.label if review.verdict == "agree" else _other(result.label)
        if review.label is not None and review.label != agreed:
            raise ValueError(
                f"'{review.verdict}' with the model's {result.label} means {agreed}, "
                f"not {review.label}"
            )
        if review.image_id is not None:
            owner = conn.execute(
                select(images.c.study_uid).where(images.c.id == review.image_id)
            ).scalar_one_or_none()
            if owner != review.study_uid:
                raise ValueError(f"image {review.image_id} is not part of this study")
        now = utcnow()
        review_id = conn.execute(
            reviews.insert()
            .values(
                study_uid=review.study_uid,
                image_id=review.image_id,
                user_id=review.user_id,
                reviewer=review.reviewer,
                verdict=review.verdict,
                label=agreed,
                part=review.part,
                comment=comment or None,
                bundle_name=review.bundle_name,
                bundle_version=review.bundle_version,
                model_label=result.label,
                model_score=result.mean_p_fracture,
                created_at=now,
            )
            .returning(reviews.c.id)
        ).scalar_one()
        add_audit_event(
            conn,
            "review",
            user_id=review.user_id,
            username=review.reviewer,
            study_uid=review.study_uid,
            review_id=int(review_id),
            client=client,
        )
        row = conn.execute(select(reviews).where(reviews.c.id == review_id)).one()
    return review_view(row)


@dataclass(frozen=True)
class ReviewedStudy(FromAttrs):
    """A study's latest review beside the result it judged.

    ``part`` is the reviewer's corrected part, else the part of the reviewed result.
    """

    study_uid: str
    label: str
    part: str | None
    model_label: str | None
    model_score: float | None
    bundle_name: str
    bundle_version: str
    reviewer: str
    reviewed_at: datetime


def latest_reviews(
    engine: Engine, *, bundle_name: str | None = None, bundle_version: str | None = None
) -> list[ReviewedStudy]:
    """The latest review of every reviewed study (of that bundle version's results, where
    given), by study UID. Earlier reviews stay in the ledger; the latest one counts."""
    rv, r = reviews, study_results
    latest = select(func.max(rv.c.id).label("id")).group_by(rv.c.study_uid)
    if bundle_name is not None:
        latest = latest.where(rv.c.bundle_name == bundle_name)
    if bundle_version is not None:
        latest = latest.where(rv.c.bundle_version == bundle_version)
    ids = latest.subquery("latest")
    stmt = (
        select(
            rv.c.study_uid,
            rv.c.label,
            func.coalesce(rv.c.part, r.c.body_part).label("part"),
            rv.c.model_label,
            rv.c.model_score,
            rv.c.bundle_name,
            rv.c.bundle_version,
            rv.c.reviewer,
            rv.c.created_at.label("reviewed_at"),
        )
        .select_from(
            rv.join(ids, ids.c.id == rv.c.id).outerjoin(
                r,
                and_(
                    r.c.study_uid == rv.c.study_uid,
                    r.c.bundle_name == rv.c.bundle_name,
                    r.c.bundle_version == rv.c.bundle_version,
                ),
            )
        )
        .order_by(rv.c.study_uid)
    )
    with engine.connect() as conn:
        return [ReviewedStudy.from_attrs(row) for row in conn.execute(stmt)]


def study_reviews(engine: Engine, study_uid: str) -> list[ReviewView]:
    """Every review of a study, oldest first."""
    with engine.connect() as conn:
        return [
            review_view(row)
            for row in conn.execute(
                select(reviews).where(reviews.c.study_uid == study_uid).order_by(reviews.c.id)
            )
        ]


def review_counts(engine: Engine) -> dict[str, int]:
    """Reviews by verdict (both verdicts are keys), and ``studies``: how many were reviewed."""
    counts = dict.fromkeys(VERDICTS, 0)
    with engine.connect() as conn:
        for verdict, n in conn.execute(
            select(reviews.c.verdict, func.count()).group_by(reviews.c.verdict)
        ):
            counts[verdict] = int(n)
        counts["studies"] = int(
            conn.execute(select(func.count(func.distinct(reviews.c.study_uid)))).scalar_one()
        )
    return counts
