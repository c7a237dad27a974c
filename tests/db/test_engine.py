"""Tests for db/engine.py: engine configuration per dialect, and creating the database."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, make_url, select, text

from bonewatch.db import create_database, make_engine
from bonewatch.db.engine import write_transaction
from bonewatch.db.schema import images, utcnow


def _sqlite_path(url: str) -> Path:
    return Path(url.removeprefix("sqlite:///"))


def test_sqlite_engine_creates_parent_directory(sqlite_url: str) -> None:
    path = _sqlite_path(sqlite_url)
    assert not path.parent.exists()
    engine = make_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    finally:
        engine.dispose()
    assert path.exists()


def test_sqlite_pragmas_are_set_on_every_connection(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    try:
        # Two connections at once: the pragmas must not depend on which one the pool hands out.
        with engine.connect() as first, engine.connect() as second:
            for conn in (first, second):
                assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
                assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
                assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
                assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    finally:
        engine.dispose()


def test_sqlite_write_transaction_takes_the_write_lock_at_begin(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    try:
        with write_transaction(engine) as conn:
            conn.exec_driver_sql("SELECT 1")
            other = sqlite3.connect(_sqlite_path(sqlite_url), timeout=0, isolation_level=None)
            try:
                with pytest.raises(sqlite3.OperationalError, match="locked"):
                    other.execute("BEGIN IMMEDIATE")
            finally:
                other.close()
        # Once committed the lock is free again.
        other = sqlite3.connect(_sqlite_path(sqlite_url), timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
        finally:
            other.close()
    finally:
        engine.dispose()


def test_sqlite_read_transaction_does_not_block_writers(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    try:
        with engine.connect() as conn, conn.begin():
            conn.exec_driver_sql("SELECT 1")
            other = sqlite3.connect(_sqlite_path(sqlite_url), timeout=0, isolation_level=None)
            try:
                other.execute("BEGIN IMMEDIATE")
                other.execute("ROLLBACK")
            finally:
                other.close()
    finally:
        engine.dispose()


def test_datetimes_come_back_utc_aware(db_engine: Engine) -> None:
    now = utcnow()
    with write_transaction(db_engine) as conn:
        conn.execute(
            images.insert().values(
                path="/x.png", queue="live", status="queued", attempts=0, lease_expires_at=now
            )
        )
    with db_engine.connect() as conn:
        row = conn.execute(select(images.c.created_at, images.c.lease_expires_at)).one()
    for value in row:
        assert value.tzinfo is not None
        assert value.utcoffset().total_seconds() == 0
    assert row.lease_expires_at == now


def test_naive_datetimes_are_refused(db_engine: Engine) -> None:
    naive = utcnow().replace(tzinfo=None)
    with pytest.raises(Exception, match="naive datetime"):
        with write_transaction(db_engine) as conn:
            conn.execute(
                images.insert().values(
                    path="/x.png", queue="live", status="queued", attempts=0, finished_at=naive
                )
            )


@pytest.mark.services
def test_postgres_engine_connects(pg_url: str) -> None:
    engine = make_engine(pg_url)
    try:
        assert engine.dialect.name == "postgresql"
        assert engine.dialect.driver == "psycopg"
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT 1").scalar() == 1
    finally:
        engine.dispose()


def _drop_database(pg_url: str, name: str) -> None:
    admin = create_engine(make_url(pg_url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            quoted = conn.dialect.identifier_preparer.quote_identifier(name)
            conn.execute(text(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"))
    finally:
        admin.dispose()


@pytest.mark.services
def test_create_database_creates_a_missing_postgres_database_once(pg_url: str) -> None:
    # Capitals and a hyphen: the name must be quoted to come out as written.
    name = f"{make_url(pg_url).database}_New-db"
    url = make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    try:
        assert create_database(url) is True
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                assert conn.execute(text("SELECT current_database()")).scalar() == name
        finally:
            engine.dispose()
        assert create_database(url) is False
    finally:
        _drop_database(pg_url, name)


@pytest.mark.services
def test_concurrent_creators_agree_that_one_created_it(pg_url: str) -> None:
    name = f"{make_url(pg_url).database}_raced"
    url = make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    start = threading.Barrier(4)
    outcomes: list[bool | BaseException] = []

    def create() -> None:
        start.wait()
        try:
            outcomes.append(create_database(url))
        except BaseException as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=create) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(outcomes, key=str) == [False, False, False, True]
    finally:
        _drop_database(pg_url, name)


@pytest.mark.parametrize(
    "name", ["", 'x"; DROP DATABASE postgres; --', "-leading-hyphen", "a" * 64, "with space"]
)
def test_create_database_refuses_odd_names_before_connecting(name: str) -> None:
    # Port 9 (discard) has no server: a name refused here never reaches one.
    url = make_url("postgresql+psycopg://postgres@127.0.0.1:9/x").set(database=name)
    with pytest.raises(ValueError, match="database name"):
        create_database(url.render_as_string(hide_password=False))


def test_create_database_on_sqlite_makes_the_folder(sqlite_url: str) -> None:
    path = _sqlite_path(sqlite_url)
    assert create_database(sqlite_url) is False
    assert path.parent.is_dir() and not path.exists()
    assert create_database("sqlite://") is False


def test_database_errors_do_not_carry_bound_values(tmp_path):
    # A path that names a patient must not reach logs or retry events through an error message.
    from sqlalchemy import text
    from sqlalchemy.exc import IntegrityError

    engine = make_engine(f"sqlite:///{tmp_path / 'l.sqlite'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (path TEXT UNIQUE)"))
        conn.execute(text("INSERT INTO t VALUES (:p)"), {"p": "/inbox/DOE_JANE_19450317/im1.dcm"})
    with pytest.raises(IntegrityError) as caught, engine.begin() as conn:
        conn.execute(text("INSERT INTO t VALUES (:p)"), {"p": "/inbox/DOE_JANE_19450317/im1.dcm"})
    assert "DOE_JANE" not in str(caught.value)
    assert "UNIQUE constraint failed" in str(caught.value)
