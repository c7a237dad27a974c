"""Fixtures shared by the whole suite: database URLs for both dialects, and Redis.

PostgreSQL and Redis are the real servers on localhost's standard ports. Where one cannot be
reached the test is skipped with the reason, except under ``CI=true``, where that fails the run.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from sqlalchemy import Engine

logger = logging.getLogger(__name__)

PG_ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"
PG_URL_TEMPLATE = "postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
REDIS_URL = "redis://127.0.0.1:6379/15"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test using a server fixture as ``services``, so ``-m "not services"`` works."""
    for item in items:
        if {"pg_url", "redis_url"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.services)


def _unavailable(message: str) -> NoReturn:
    """Skip the test, or fail it under CI where every service must be up."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true, so this is an error, not a skip)", pytrace=False)
    pytest.skip(message)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """URL of a fresh SQLite file (not created yet) under a subfolder of the test's tmp_path."""
    return f"sqlite:///{tmp_path / 'data' / 'bonewatch.db'}"


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """URL of a throwaway PostgreSQL database, created for this session and dropped after it."""
    import psycopg

    name = f"bonewatch_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG_ADMIN_DSN, autocommit=True)
    except psycopg.OperationalError as exc:
        _unavailable(f"PostgreSQL at 127.0.0.1:5432 is not reachable as user postgres: {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    logger.info("created test database %s", name)
    try:
        yield PG_URL_TEMPLATE.format(name=name)
    finally:
        # A fresh connection: a test may have restarted the server in between.
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _empty_pg_database(url: str) -> None:
    """Drop everything in the session's test database so each test starts from nothing."""
    import psycopg
    from sqlalchemy.engine import make_url

    dbname = make_url(url).database
    with psycopg.connect(
        f"host=127.0.0.1 port=5432 user=postgres dbname={dbname}", autocommit=True
    ) as conn:
        # A connection left open by an earlier test must not hang the whole suite.
        conn.execute("SET lock_timeout = '10s'")
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", id="postgresql", marks=pytest.mark.services),
    ]
)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of an empty database, once per dialect: a SQLite file, then PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'data' / 'bonewatch.db'}"
    url: str = request.getfixturevalue("pg_url")
    _empty_pg_database(url)
    return url


@pytest.fixture
def db_engine(db_url: str) -> Iterator[Engine]:
    """An Engine on a database migrated to head, on each dialect; disposed afterwards."""
    from bonewatch.db import make_engine, upgrade

    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        yield engine
    finally:
        engine.dispose()


def flushed_redis(url: str) -> Iterator[str]:
    """``url``, a Redis database on localhost, flushed before and after; for fixtures."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        _unavailable(f"Redis at 127.0.0.1:6379 does not answer PING (Debian: redis-server): {exc}")
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


@pytest.fixture
def redis_url() -> Iterator[str]:
    """URL of Redis database 15 on localhost, flushed before and after the test."""
    yield from flushed_redis(REDIS_URL)
