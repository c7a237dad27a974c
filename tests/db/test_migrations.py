"""Tests for db/migrations: upgrading an empty database, on both dialects."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from bonewatch.db import current_revision, make_engine, upgrade
from bonewatch.db.engine import alembic_config, write_transaction
from bonewatch.db.schema import metadata

LEDGER_TABLES = {"images", "fingerprints", "predictions", "study_results", "studies"}


def _head() -> str:
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    assert len(heads) == 1, f"migrations have several heads: {heads}"
    return heads[0]


def test_upgrade_empty_database_to_head(db_url: str) -> None:
    assert current_revision(db_url) is None
    upgrade(db_url)
    assert current_revision(db_url) == _head()
    engine = make_engine(db_url)
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert LEDGER_TABLES <= tables
    assert "alembic_version" in tables


def test_upgrade_twice_is_a_no_op(db_url: str) -> None:
    upgrade(db_url)
    upgrade(db_url)
    assert current_revision(db_url) == _head()


def test_migrations_match_the_models(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            diffs = compare_metadata(context, metadata)
    finally:
        engine.dispose()
    assert diffs == []


def test_downgrade_to_base_and_back(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with write_transaction(engine) as conn:
            command.downgrade(alembic_config(conn), "base")
        assert not LEDGER_TABLES & set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert current_revision(db_url) is None
    upgrade(db_url)
    assert current_revision(db_url) == _head()
