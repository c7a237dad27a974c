"""Engines for the ledger, and its Alembic migrations run programmatically.

SQLite (embedded mode) is tuned for one machine with several threads or processes: WAL journal,
30 s busy timeout, foreign keys on, ``synchronous=NORMAL``. SQLAlchemy takes over ``BEGIN`` from
the sqlite3 driver so that transactions that write can start with ``BEGIN IMMEDIATE``: they take
the write lock up front instead of failing to upgrade a read snapshot half-way through.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
# Execution option read by the begin hook: this transaction will write.
_WRITE_OPTION = "bonewatch_write"
# A database name create_database accepts: PostgreSQL's 63-byte identifier limit, no oddities.
_DATABASE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,62}")
# SQLSTATEs of a CREATE DATABASE that lost a race to another creator: duplicate database, or,
# past PostgreSQL's friendly check, the unique index on pg_database.datname.
_LOST_THE_RACE = ("42P04", "23505")


def _sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL, or None for in-memory databases."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def _make_sqlite_folder(url: str) -> None:
    """Create the folder of a SQLite URL's database file (none for in-memory databases)."""
    db_file = _sqlite_file(url)
    if db_file is not None:
        db_file.parent.mkdir(parents=True, exist_ok=True)


def _enable_wal(cursor: Any) -> None:
    """Switch to WAL. The switch needs the file to itself and does not wait on the busy
    timeout, so two processes opening a brand-new ledger together retry here."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    delay = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy emit BEGIN itself (see the begin hook) rather than the driver's legacy mode.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        _enable_wal(cursor)
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _on_sqlite_begin(conn: Connection) -> None:
    if conn.get_execution_options().get(_WRITE_OPTION):
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        conn.exec_driver_sql("BEGIN")


def _on_sqlite_read_only_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA query_only = ON")
    finally:
        cursor.close()


def make_engine(url: str, *, read_only: bool = False) -> Engine:
    """Build an Engine for a ledger URL (``sqlite:///...`` or ``postgresql+psycopg://...``).

    For a SQLite file the parent directory is created and the connection pragmas are set on every
    new connection. ``read_only`` opens an existing SQLite file without creating or changing
    anything (for commands that only read: a ledger on read-only media works too).

    Returns:
        A configured Engine; the caller disposes of it.
    """
    sa_url = make_url(url)
    db_file = _sqlite_file(url) if sa_url.get_backend_name() == "sqlite" else None
    if read_only and db_file is not None:
        engine = create_engine(
            f"sqlite:///file:{db_file.absolute()}?mode=ro&uri=true", hide_parameters=True
        )
        event.listen(engine, "connect", _on_sqlite_read_only_connect)
        event.listen(engine, "begin", _on_sqlite_begin)
        return engine
    if sa_url.get_backend_name() == "sqlite":
        _make_sqlite_folder(url)
        engine = create_engine(
            sa_url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            hide_parameters=True,
        )
        event.listen(engine, "connect", _on_sqlite_connect)
        event.listen(engine, "begin", _on_sqlite_begin)
        return engine
    # Long-lived workers outlive server restarts and idle timeouts; check connections on checkout.
    # hide_parameters: an error's message never carries the bound values (file paths, which can
    # name patients) into logs, Celery retry events or Flower.
    return create_engine(sa_url, pool_pre_ping=True, hide_parameters=True)


def create_database(url: str) -> bool:
    """Make sure the database of ``url`` exists on its server, before migrating it.

    PostgreSQL: connects to the server's ``postgres`` maintenance database (same host and
    credentials) and creates the URL's database unless it is there. SQLite: creates the folder
    of the file, which SQLite then creates on first connection.

    Returns:
        True if this call created a PostgreSQL database; False if it was there already (or
        another caller created it at the same moment), and always for SQLite.

    Raises:
        ValueError: the URL names no database, one that is not letters, digits, ``_`` and ``-``
            (at most 63), or a backend other than SQLite and PostgreSQL.
        sqlalchemy.exc.DBAPIError: the server does not answer (OperationalError), or refuses
            the creation (ProgrammingError, for a role without CREATEDB).
    """
    sa_url = make_url(url)
    backend = sa_url.get_backend_name()
    if backend == "sqlite":
        _make_sqlite_folder(url)
        return False
    if backend != "postgresql":
        raise ValueError(f"the ledger supports sqlite and postgresql, not {backend}")
    name = sa_url.database
    if not name or not _DATABASE_NAME.fullmatch(name):
        raise ValueError(
            f"database name {name!r} must be 1 to 63 letters, digits, '_' or '-' "
            "(not starting with '-')"
        )
    admin = create_engine(
        sa_url.set(database="postgres"), isolation_level="AUTOCOMMIT", poolclass=NullPool
    )
    try:
        with admin.connect() as conn:
            there = text("SELECT 1 FROM pg_database WHERE datname = :name")
            if conn.execute(there, {"name": name}).first() is not None:
                return False
            quoted = conn.dialect.identifier_preparer.quote_identifier(name)
            try:
                conn.execute(text(f"CREATE DATABASE {quoted}"))
            except DBAPIError as exc:
                # psycopg 3 names it sqlstate, psycopg2 pgcode
                code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
                if code in _LOST_THE_RACE:
                    return False
                raise
    finally:
        admin.dispose()
    logger.info("created database %s", sa_url.render_as_string())
    return True


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """One transaction that will write: ``BEGIN IMMEDIATE`` on SQLite, a plain one elsewhere.

    Commits on success and rolls back on error.
    """
    with engine.connect() as conn:
        conn.execution_options(**{_WRITE_OPTION: True})
        with conn.begin():
            yield conn


def alembic_config(connection: Connection | None = None) -> Any:
    """An Alembic Config for the ledger's migrations, optionally bound to an open connection."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Run the Alembic migrations on ``url`` up to ``revision`` (``head`` by default)."""
    from alembic import command

    engine = make_engine(url)
    try:
        with write_transaction(engine) as conn:
            command.upgrade(alembic_config(conn), revision)
    finally:
        engine.dispose()
    logger.info("database %s upgraded to %s", make_url(url).render_as_string(), revision)


def current_revision(url: str) -> str | None:
    """The Alembic revision the database at ``url`` is at, or None when it was never migrated."""
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
