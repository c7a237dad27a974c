"""Initial ledger: images, fingerprints, predictions, study_results.

Revision ID: 0001
Revises:
Create Date: 2025-01-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen here on purpose: a migration must not change when db/schema.py does.
_STATUSES = "status IN ('queued', 'processing', 'done', 'failed', 'unsupported', 'duplicate')"
_QUEUES = "queue IN ('live', 'bulk')"
_KINDS = "kind IN ('sha256', 'sop')"


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create the four ledger tables and their indexes."""
    op.create_table(
        "images",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("size_bytes", sa.Integer(), nullable=True),
        sa.Column("format", sa.String(16), nullable=True),
        sa.Column("frame_number", sa.Integer(), nullable=True),
        sa.Column("study_uid", sa.String(128), nullable=True),
        sa.Column("series_uid", sa.String(128), nullable=True),
        sa.Column("sop_instance_uid", sa.String(128), nullable=True),
        sa.Column("sop_class_uid", sa.String(128), nullable=True),
        sa.Column("patient_hash", sa.String(64), nullable=True),
        sa.Column("modality", sa.String(16), nullable=True),
        sa.Column("body_part_examined", sa.String(64), nullable=True),
        sa.Column("view_position", sa.String(16), nullable=True),
        sa.Column("rows", sa.Integer(), nullable=True),
        sa.Column("columns", sa.Integer(), nullable=True),
        sa.Column("mura_part", sa.String(32), nullable=True),
        sa.Column("mura_label", sa.Integer(), nullable=True),
        sa.Column("queue", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_expires_at", _utc(), nullable=True),
        sa.Column("retry_after", _utc(), nullable=True),
        sa.Column("leased_by", sa.String(255), nullable=True),
        sa.Column("error_class", sa.String(128), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("duplicate_of", sa.Integer(), nullable=True),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("updated_at", _utc(), nullable=False),
        sa.Column("finished_at", _utc(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_images"),
        sa.ForeignKeyConstraint(
            ["duplicate_of"],
            ["images.id"],
            name="fk_images_duplicate_of_images",
            ondelete="SET NULL",
        ),
        sa.UniqueConstraint("path", "sha256", name="uq_images_path_sha256"),
        sa.CheckConstraint(_STATUSES, name="ck_images_status"),
        sa.CheckConstraint(_QUEUES, name="ck_images_queue"),
    )
    op.create_index(
        "uq_images_path_no_sha",
        "images",
        ["path"],
        unique=True,
        sqlite_where=sa.text("sha256 IS NULL"),
        postgresql_where=sa.text("sha256 IS NULL"),
    )
    op.create_index("ix_images_claim", "images", ["status", "queue", "id"])
    op.create_index("ix_images_study_uid", "images", ["study_uid"])
    op.create_index("ix_images_sop_instance_uid", "images", ["sop_instance_uid"])
    op.create_index("ix_images_sha256", "images", ["sha256"])

    op.create_table(
        "fingerprints",
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("value", sa.String(160), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("kind", "value", name="pk_fingerprints"),
        sa.ForeignKeyConstraint(
            ["image_id"],
            ["images.id"],
            name="fk_fingerprints_image_id_images",
            ondelete="CASCADE",
        ),
        sa.CheckConstraint(_KINDS, name="ck_fingerprints_kind"),
    )
    op.create_index("ix_fingerprints_image_id", "fingerprints", ["image_id"])

    op.create_table(
        "predictions",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("bundle_name", sa.String(128), nullable=False),
        sa.Column("bundle_version", sa.String(64), nullable=False),
        sa.Column("body_part_probs", sa.JSON(), nullable=False),
        sa.Column("body_part", sa.String(32), nullable=True),
        sa.Column("body_part_confidence", sa.Float(), nullable=True),
        sa.Column("body_part_examined", sa.String(64), nullable=True),
        sa.Column("body_part_disagrees", sa.Boolean(), nullable=False),
        sa.Column("p_fracture", sa.Float(), nullable=True),
        sa.Column("label", sa.String(16), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("fracture_model", sa.String(255), nullable=True),
        sa.Column("timings", sa.JSON(), nullable=False),
        sa.Column("heatmap_path", sa.Text(), nullable=True),
        sa.Column("created_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_predictions"),
        sa.ForeignKeyConstraint(
            ["image_id"],
            ["images.id"],
            name="fk_predictions_image_id_images",
            ondelete="CASCADE",
        ),
        sa.UniqueConstraint(
            "image_id",
            "bundle_name",
            "bundle_version",
            name="uq_predictions_image_id_bundle_name_bundle_version",
        ),
    )
    op.create_index("ix_predictions_bundle", "predictions", ["bundle_name", "bundle_version"])

    op.create_table(
        "study_results",
        sa.Column("study_uid", sa.String(128), nullable=False),
        sa.Column("bundle_name", sa.String(128), nullable=False),
        sa.Column("bundle_version", sa.String(64), nullable=False),
        sa.Column("body_part", sa.String(32), nullable=True),
        sa.Column("n_images", sa.Integer(), nullable=False),
        sa.Column("mean_p_fracture", sa.Float(), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("label", sa.String(16), nullable=True),
        sa.Column("updated_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint(
            "study_uid", "bundle_name", "bundle_version", name="pk_study_results"
        ),
    )


def downgrade() -> None:
    """Drop the ledger tables."""
    op.drop_table("study_results")
    op.drop_index("ix_predictions_bundle", table_name="predictions")
    op.drop_table("predictions")
    op.drop_index("ix_fingerprints_image_id", table_name="fingerprints")
    op.drop_table("fingerprints")
    for name in (
        "ix_images_sha256",
        "ix_images_sop_instance_uid",
        "ix_images_study_uid",
        "ix_images_claim",
        "uq_images_path_no_sha",
    ):
        op.drop_index(name, table_name="images")
    op.drop_table("images")
