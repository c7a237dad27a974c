"""Study arrivals: when each study's instances came in, and when it counted as complete.

Revision ID: 0002
Revises: 0001
Create Date: 2026-06-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create ``studies`` and fill it from the images already registered."""
    op.create_table(
        "studies",
        sa.Column("study_uid", sa.String(128), nullable=False),
        sa.Column("first_received_at", _utc(), nullable=False),
        sa.Column("last_received_at", _utc(), nullable=False),
        sa.Column("n_received", sa.Integer(), nullable=False),
        sa.Column("stable_at", _utc(), nullable=True),
        sa.PrimaryKeyConstraint("study_uid", name="pk_studies"),
    )
    op.create_index("ix_studies_unstable", "studies", ["stable_at", "last_received_at"])
    # Studies registered before this revision: arrival times from their images' rows; the
    # next sweep marks them stable.
    op.execute(
        "INSERT INTO studies (study_uid, first_received_at, last_received_at, n_received) "
        "SELECT study_uid, MIN(created_at), MAX(created_at), COUNT(*) FROM images "
        "WHERE study_uid IS NOT NULL AND status != 'duplicate' GROUP BY study_uid"
    )


def downgrade() -> None:
    """Drop ``studies``."""
    op.drop_index("ix_studies_unstable", table_name="studies")
    op.drop_table("studies")
