"""The review web app: users, reviews, audit events, and the worklist's indexes.

Revision ID: 0003
Revises: 0002
Create Date: 2026-06-15 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen here on purpose: a migration must not change when db/schema.py does.
_ROLES = "role IN ('reviewer', 'admin')"
_VERDICTS = "verdict IN ('agree', 'disagree')"
_LABELS = "label IN ('positive', 'negative')"


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create ``users``, ``reviews`` and ``audit_events``, and index the worklist's sorts."""
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
        sa.UniqueConstraint("username", name="uq_users_username"),
        sa.CheckConstraint(_ROLES, name="ck_users_role"),
    )
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("study_uid", sa.String(128), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=True),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("reviewer", sa.String(64), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("label", sa.String(16), nullable=False),
        sa.Column("part", sa.String(32), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("bundle_name", sa.String(128), nullable=False),
        sa.Column("bundle_version", sa.String(64), nullable=False),
        sa.Column("model_label", sa.String(16), nullable=True),
        sa.Column("model_score", sa.Float(), nullable=True),
        sa.Column("created_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_reviews"),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], name="fk_reviews_image_id_images", ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_reviews_user_id_users", ondelete="SET NULL"
        ),
        sa.CheckConstraint(_VERDICTS, name="ck_reviews_verdict"),
        sa.CheckConstraint(_LABELS, name="ck_reviews_label"),
    )
    op.create_index("ix_reviews_study_uid", "reviews", ["study_uid", "id"])
    op.create_index("ix_reviews_user_id", "reviews", ["user_id"])
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("username", sa.String(64), nullable=True),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("study_uid", sa.String(128), nullable=True),
        sa.Column("review_id", sa.Integer(), nullable=True),
        sa.Column("client", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_audit_events"),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_audit_events_user_id_users", ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["review_id"],
            ["reviews.id"],
            name="fk_audit_events_review_id_reviews",
            ondelete="SET NULL",
        ),
    )
    op.create_index("ix_audit_events_created_at", "audit_events", ["created_at"])
    op.create_index("ix_audit_events_study_uid", "audit_events", ["study_uid"])
    op.create_index("ix_audit_events_user_id", "audit_events", ["user_id"])
    # The worklist: a bundle version's studies by score, by distance from the threshold and by
    # part and label; images by status; studies by arrival.
    op.create_index(
        "ix_study_results_bundle_score",
        "study_results",
        ["bundle_name", "bundle_version", "mean_p_fracture", "study_uid"],
    )
    op.create_index(
        "ix_study_results_bundle_uncertainty",
        "study_results",
        [
            sa.column("bundle_name"),
            sa.column("bundle_version"),
            sa.func.abs(sa.column("mean_p_fracture") - sa.column("threshold")),
            sa.column("study_uid"),
        ],
    )
    op.create_index(
        "ix_study_results_bundle_part",
        "study_results",
        ["bundle_name", "bundle_version", "body_part", "label", "mean_p_fracture", "study_uid"],
    )
    op.create_index("ix_images_status_study", "images", ["status", "study_uid"])
    op.create_index("ix_studies_received", "studies", ["last_received_at", "study_uid"])


def downgrade() -> None:
    """Drop the review tables and the worklist's indexes."""
    op.drop_index("ix_studies_received", table_name="studies")
    op.drop_index("ix_images_status_study", table_name="images")
    op.drop_index("ix_study_results_bundle_part", table_name="study_results")
    op.drop_index("ix_study_results_bundle_uncertainty", table_name="study_results")
    op.drop_index("ix_study_results_bundle_score", table_name="study_results")
    op.drop_index("ix_audit_events_user_id", table_name="audit_events")
    op.drop_index("ix_audit_events_study_uid", table_name="audit_events")
    op.drop_index("ix_audit_events_created_at", table_name="audit_events")
    op.drop_table("audit_events")
    op.drop_index("ix_reviews_user_id", table_name="reviews")
    op.drop_index("ix_reviews_study_uid", table_name="reviews")
    op.drop_table("reviews")
    op.drop_table("users")
