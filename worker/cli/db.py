"""Ledger maintenance: ``db upgrade``."""

from __future__ import annotations

from bonewatch.worker.cli._common import out, settings_from


def upgrade() -> None:
    """Create or migrate the ledger schema to the latest revision."""
    from bonewatch.db import current_revision, upgrade

    url = settings_from().resolved_database_url
    if url.startswith("sqlite"):
        settings_from().data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(url)
    out.print(f"ledger at revision {current_revision(url)}")
