"""The ledger's tables, as SQLAlchemy 2 typed ORM classes.

The same schema runs on SQLite and PostgreSQL, so it sticks to portable types. Timestamps go
through :class:`UTCDateTime`, which always hands back timezone-aware UTC datetimes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Every status an image row can hold. "queued", "processing" and "cancelled" (the rest of a
# cancelled run, queued again when the run is resumed) are the non-final ones.
STATUSES: tuple[str, ...] = (
    "queued",
    "processing",
    "done",
    "failed",
    "unsupported",
    "duplicate",
    "cancelled",
)
FINAL_STATUSES: tuple[str, ...] = ("done", "failed", "unsupported", "duplicate")
QUEUES: tuple[str, ...] = ("live", "bulk")
FINGERPRINT_KINDS: tuple[str, ...] = ("sha256", "sop")

# Named constraints keep Alembic migrations stable across dialects.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time as a timezone-aware UTC datetime."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always returned timezone-aware.

    PostgreSQL keeps it as ``timestamptz``. SQLite has no timezone type and returns naive values;
    they are stored naive-in-UTC so that string comparison still orders them correctly.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} given to the ledger; pass UTC-aware values")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base holding the ledger's metadata."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: dict[Any, Any] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
    }


def _in_list(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


# Runs (migration 0005): an archive given to `process`, or a watched folder or a listener.
RUN_KINDS: tuple[str, ...] = ("archive", "watch", "listen")
# What the run's owner asked for; the state shown (queued, running, done...) is derived from it
# and the counts of the run's images.
RUN_CONTROLS: tuple[str, ...] = ("active", "paused", "cancelled")


class Run(Base):
    """One run: the paths given to one `process`, or one watched folder or listener for good."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))
    # A long-lived run's identity ("watch:/srv/inbox"), so a restart carries on with it.
    key: Mapped[str | None] = mapped_column(String(512), unique=True)
    queue: Mapped[str] = mapped_column(String(16))
    paths: Mapped[list[str]] = mapped_column(JSON)
    started_by: Mapped[str] = mapped_column(String(255))
    bundle_name: Mapped[str | None] = mapped_column(String(128))
    bundle_version: Mapped[str | None] = mapped_column(String(64))
    bulk_window: Mapped[str | None] = mapped_column(String(32))
    control: Mapped[str] = mapped_column(String(16), default="active")
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # Every path registered: from then on no image joins it (never set for long-lived runs).
    sealed_at: Mapped[datetime | None]

    __table_args__ = (
        CheckConstraint(_in_list("kind", RUN_KINDS), name="kind"),
        CheckConstraint(_in_list("control", RUN_CONTROLS), name="control"),
        CheckConstraint(_in_list("queue", QUEUES), name="queue"),
    )


class Image(Base):
    """One accepted file (or one frame of it) and where it stands in processing."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64))
    size_bytes: Mapped[int | None] = mapped_column(Integer)
    format: Mapped[str | None] = mapped_column(String(16))
    frame_number: Mapped[int | None] = mapped_column(Integer)
    study_uid: Mapped[str | None] = mapped_column(String(128))
    series_uid: Mapped[str | None] = mapped_column(String(128))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(128))
    sop_class_uid: Mapped[str | None] = mapped_column(String(128))
    patient_hash: Mapped[str | None] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part_examined: Mapped[str | None] = mapped_column(String(64))
    view_position: Mapped[str | None] = mapped_column(String(16))
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    mura_part: Mapped[str | None] = mapped_column(String(32))
    mura_label: Mapped[int | None] = mapped_column(Integer)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"))
    queue: Mapped[str] = mapped_column(String(16), default="live")
    status: Mapped[str] = mapped_column(String(16), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_expires_at: Mapped[datetime | None]
    # A queued row that failed transiently waits until then (backoff between attempts).
    retry_after: Mapped[datetime | None]
    leased_by: Mapped[str | None] = mapped_column(String(255))
    error_class: Mapped[str | None] = mapped_column(String(128))
    reason: Mapped[str | None] = mapped_column(Text)
    duplicate_of: Mapped[int | None] = mapped_column(ForeignKey("images.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None]

    __table_args__ = (
        # Re-registering the same bytes at the same path is a no-op.
        UniqueConstraint("path", "sha256"),
        # NULLs are distinct in a unique constraint, so unreadable files (no sha256) need their
        # own partial index to stay idempotent per path.
        Index(
            "uq_images_path_no_sha",
            "path",
            unique=True,
            sqlite_where=text("sha256 IS NULL"),
            postgresql_where=text("sha256 IS NULL"),
        ),
        Index("ix_images_claim", "status", "queue", "id"),
        Index("ix_images_study_uid", "study_uid"),
        Index("ix_images_sop_instance_uid", "sop_instance_uid"),
        Index("ix_images_sha256", "sha256"),
        Index("ix_images_run_id_status", "run_id", "status"),
        CheckConstraint(_in_list("status", STATUSES), name="status"),
        CheckConstraint(_in_list("queue", QUEUES), name="queue"),
    )


class Fingerprint(Base):
    """Which image first claimed a content hash or a SOP instance; the key to deduplication."""

    __tablename__ = "fingerprints"

    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    value: Mapped[str] = mapped_column(String(160), primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)

    __table_args__ = (CheckConstraint(_in_list("kind", FINGERPRINT_KINDS), name="kind"),)


class PredictionRow(Base):
    """What one model bundle version concluded about one image. Never overwritten."""

    __tablename__ = "predictions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    bundle_name: Mapped[str] = mapped_column(String(128))
    bundle_version: Mapped[str] = mapped_column(String(64))
    body_part_probs: Mapped[dict[str, Any]]
    body_part: Mapped[str | None] = mapped_column(String(32))
    body_part_confidence: Mapped[float | None] = mapped_column(Float)
    body_part_examined: Mapped[str | None] = mapped_column(String(64))
    body_part_disagrees: Mapped[bool] = mapped_column(Boolean, default=False)
    p_fracture: Mapped[float | None] = mapped_column(Float)
    label: Mapped[str | None] = mapped_column(String(16))
    threshold: Mapped[float | None] = mapped_column(Float)
    fracture_model: Mapped[str | None] = mapped_column(String(255))
    timings: Mapped[dict[str, Any]]
    heatmap_path: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        UniqueConstraint("image_id", "bundle_name", "bundle_version"),
        Index("ix_predictions_bundle", "bundle_name", "bundle_version"),
    )


class StudyResult(Base):
    """MURA-style study score: the mean image p(fracture) per study and bundle version."""

    __tablename__ = "study_results"

    study_uid: Mapped[str] = mapped_column(String(128), primary_key=True)
    bundle_name: Mapped[str] = mapped_column(String(128), primary_key=True)
    bundle_version: Mapped[str] = mapped_column(String(64), primary_key=True)
    body_part: Mapped[str | None] = mapped_column(String(32))
    n_images: Mapped[int] = mapped_column(Integer)
    mean_p_fracture: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float | None] = mapped_column(Float)
    label: Mapped[str | None] = mapped_column(String(16))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Study(Base):
    """When a study's instances arrived, and when it counted as complete.

    ``last_received_at`` moves with each new instance (a re-send of one already registered does
    not count); ``stable_at`` is set once nothing new arrived for the configured quiet time, and
    cleared again if a late instance comes.
    """

    __tablename__ = "studies"

    study_uid: Mapped[str] = mapped_column(String(128), primary_key=True)
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    n_received: Mapped[int] = mapped_column(Integer, default=0)
    stable_at: Mapped[datetime | None]

    __table_args__ = (Index("ix_studies_unstable", "stable_at", "last_received_at"),)


# The review web app (`bonewatch serve`): its accounts, the reviewers' verdicts, the audit trail.
ROLES: tuple[str, ...] = ("reviewer", "admin")
VERDICTS: tuple[str, ...] = ("agree", "disagree")
LABELS: tuple[str, ...] = ("positive", "negative")


class User(Base):
    """A web app account. Only a slow salted hash of the password is kept (argon2id)."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16), default="reviewer")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (CheckConstraint(_in_list("role", ROLES), name="role"),)


class Review(Base):
    """One reviewer's verdict on one bundle version's result for a study. Never overwritten and
    never overwriting: a later verdict is a new row, and predictions stay as they are."""

    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_uid: Mapped[str] = mapped_column(String(128))
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id", ondelete="SET NULL"))
    # The account, while it exists; the name stays when it is removed.
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    reviewer: Mapped[str] = mapped_column(String(64))
    verdict: Mapped[str] = mapped_column(String(16))
    label: Mapped[str] = mapped_column(String(16))
    part: Mapped[str | None] = mapped_column(String(32))
    comment: Mapped[str | None] = mapped_column(Text)
    bundle_name: Mapped[str] = mapped_column(String(128))
    bundle_version: Mapped[str] = mapped_column(String(64))
    # What the model said when the verdict was given (the study's result can change later).
    model_label: Mapped[str | None] = mapped_column(String(16))
    model_score: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        Index("ix_reviews_study_uid", "study_uid", "id"),
        Index("ix_reviews_user_id", "user_id"),
        CheckConstraint(_in_list("verdict", VERDICTS), name="verdict"),
        CheckConstraint(_in_list("label", LABELS), name="label"),
    )


class AuditEvent(Base):
    """Who did what in the web app: logins, study views, reviews."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    username: Mapped[str | None] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(32))
    study_uid: Mapped[str | None] = mapped_column(String(128))
    review_id: Mapped[int | None] = mapped_column(ForeignKey("reviews.id", ondelete="SET NULL"))
    client: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (
        Index("ix_audit_events_created_at", "created_at"),
        Index("ix_audit_events_study_uid", "study_uid"),
        Index("ix_audit_events_user_id", "user_id"),
    )


# The outbox of results sent back to PACS (migration 0004): one row per (object, destination).
DELIVERY_STATUSES: tuple[str, ...] = ("pending", "sent", "failed")
DELIVERY_KINDS: tuple[str, ...] = ("sr", "sc")


class Delivery(Base):
    """One DICOM result object (an SR, or a Secondary Capture of one image) for one destination.

    The object itself is never stored: it is rebuilt from the results and the source headers at
    each attempt, with the same deterministic UIDs, so a re-send replaces it in the PACS.
    """

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_uid: Mapped[str] = mapped_column(String(128))
    bundle_name: Mapped[str] = mapped_column(String(128))
    bundle_version: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(8))
    sop_instance_uid: Mapped[str] = mapped_column(String(128))
    source_sop_instance_uid: Mapped[str | None] = mapped_column(String(128))
    destination: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    sent_at: Mapped[datetime | None]

    __table_args__ = (
        UniqueConstraint("sop_instance_uid", "destination"),
        Index("ix_deliveries_due", "status", "next_attempt_at"),
        Index("ix_deliveries_study_uid", "study_uid"),
        CheckConstraint(_in_list("status", DELIVERY_STATUSES), name="status"),
        CheckConstraint(_in_list("kind", DELIVERY_KINDS), name="kind"),
    )


# Worklist indexes on the tables above (migration 0003 creates them): a bundle version's
# studies by score and by distance from the threshold, a study's images by status, the studies
# by arrival. The sorts read them in order, so a page costs the same at any depth.
Index(
    "ix_study_results_bundle_score",
    StudyResult.bundle_name,
    StudyResult.bundle_version,
    StudyResult.mean_p_fracture,
    StudyResult.study_uid,
)
Index(
    "ix_study_results_bundle_uncertainty",
    StudyResult.bundle_name,
    StudyResult.bundle_version,
    func.abs(StudyResult.mean_p_fracture - StudyResult.threshold),
    StudyResult.study_uid,
)
Index(
    "ix_study_results_bundle_part",
    StudyResult.bundle_name,
    StudyResult.bundle_version,
    StudyResult.body_part,
    StudyResult.label,
    StudyResult.mean_p_fracture,
    StudyResult.study_uid,
)
Index("ix_images_status_study", Image.status, Image.study_uid)
Index("ix_studies_received", Study.last_received_at, Study.study_uid)


metadata = Base.metadata
# Core tables for the ledger's bulk statements (the ORM classes are for schema and migrations).
images: Table = Image.__table__  # type: ignore[assignment]
fingerprints: Table = Fingerprint.__table__  # type: ignore[assignment]
predictions: Table = PredictionRow.__table__  # type: ignore[assignment]
study_results: Table = StudyResult.__table__  # type: ignore[assignment]
studies: Table = Study.__table__  # type: ignore[assignment]
users: Table = User.__table__  # type: ignore[assignment]
reviews: Table = Review.__table__  # type: ignore[assignment]
audit_events: Table = AuditEvent.__table__  # type: ignore[assignment]
deliveries: Table = Delivery.__table__  # type: ignore[assignment]
runs: Table = Run.__table__  # type: ignore[assignment]
