"""The outbox of results sent back to PACS: ``deliveries``.

Revision ID: 0004
Revises: 0003
Create Date: 2026-06-20 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen here on purpose: a migration must not change when db/schema.py does.
_STATUSES = "status IN ('pending', 'sent', 'failed')"
_KINDS = "kind IN ('sr', 'sc')"


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create ``deliveries``: one row per (result object, destination)."""
    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("study_uid", sa.String(128), nullable=False),
        sa.Column("bundle_name", sa.String(128), nullable=False),
        sa.Column("bundle_version", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("sop_instance_uid", sa.String(128), nullable=False),
        sa.Column("source_sop_instance_uid", sa.String(128), nullable=True),
        sa.Column("destination", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("next_attempt_at", _utc(), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("updated_at", _utc(), nullable=False),
        sa.Column("sent_at", _utc(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_deliveries"),
        sa.UniqueConstraint(
            "sop_instance_uid", "destination", name="uq_deliveries_sop_instance_uid_destination"
        ),
        sa.CheckConstraint(_STATUSES, name="ck_deliveries_status"),
        sa.CheckConstraint(_KINDS, name="ck_deliveries_kind"),
    )
    op.create_index("ix_deliveries_due", "deliveries", ["status", "next_attempt_at"])
    op.create_index("ix_deliveries_study_uid", "deliveries", ["study_uid"])


def downgrade() -> None:
    """Drop ``deliveries``."""
    op.drop_index("ix_deliveries_study_uid", table_name="deliveries")
    op.drop_index("ix_deliveries_due", table_name="deliveries")
    op.drop_table("deliveries")
