"""Runs: ``runs``, each image's ``run_id``, and the image status ``cancelled``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen here on purpose: a migration must not change when db/schema.py does.
_OLD_STATUSES = "status IN ('queued', 'processing', 'done', 'failed', 'unsupported', 'duplicate')"
_STATUSES = (
    "status IN ('queued', 'processing', 'done', 'failed', 'unsupported', 'duplicate', 'cancelled')"
)
_KINDS = "kind IN ('archive', 'watch', 'listen')"
_CONTROLS = "control IN ('active', 'paused', 'cancelled')"
_QUEUES = "queue IN ('live', 'bulk')"


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create ``runs``; give ``images`` its ``run_id`` and the status ``cancelled``.

    SQLite cannot alter a CHECK constraint, so ``images`` is rebuilt there (batch mode);
    PostgreSQL alters it in place.
    """
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("key", sa.String(512), nullable=True),
        sa.Column("queue", sa.String(16), nullable=False),
        sa.Column("paths", sa.JSON(), nullable=False),
        sa.Column("started_by", sa.String(255), nullable=False),
        sa.Column("bundle_name", sa.String(128), nullable=True),
        sa.Column("bundle_version", sa.String(64), nullable=True),
        sa.Column("bulk_window", sa.String(32), nullable=True),
        sa.Column("control", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("updated_at", _utc(), nullable=False),
        sa.Column("sealed_at", _utc(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_runs"),
        sa.UniqueConstraint("key", name="uq_runs_key"),
        sa.CheckConstraint(_KINDS, name="ck_runs_kind"),
        sa.CheckConstraint(_CONTROLS, name="ck_runs_control"),
        sa.CheckConstraint(_QUEUES, name="ck_runs_queue"),
    )
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("run_id", sa.Integer(), nullable=True))
        batch.create_foreign_key(
            "fk_images_run_id_runs", "runs", ["run_id"], ["id"], ondelete="SET NULL"
        )
        batch.drop_constraint("ck_images_status", type_="check")
        batch.create_check_constraint("ck_images_status", sa.text(_STATUSES))
    op.create_index("ix_images_run_id_status", "images", ["run_id", "status"])


def downgrade() -> None:
    """Drop ``runs`` and ``images.run_id``; cancelled images go back to ``queued``."""
    op.drop_index("ix_images_run_id_status", table_name="images")
    op.execute("UPDATE images SET status = 'queued' WHERE status = 'cancelled'")
    with op.batch_alter_table("images") as batch:
        batch.drop_constraint("ck_images_status", type_="check")
        batch.create_check_constraint("ck_images_status", sa.text(_OLD_STATUSES))
        batch.drop_constraint("fk_images_run_id_runs", type_="foreignkey")
        batch.drop_column("run_id")
    op.drop_table("runs")
