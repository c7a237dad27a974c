"""Statement helpers shared by the ledger's modules, and where SQLite and PostgreSQL differ.

Each public ledger function is one transaction on the given Engine and takes and returns plain
frozen dataclasses or dicts, so callers never see SQLAlchemy objects. The code runs unchanged on
SQLite and PostgreSQL; where they differ (insert-or-ignore, row locking) the dialect is looked up.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Select, Table, and_, bindparam, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from bonewatch.db.schema import images, runs

# Keeps IN lists and multi-row statements well under SQLite's bound-parameter limit.
CHUNK = 500


def chunks(seq: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


def insert(conn: Connection, table: Table) -> Any:
    """An INSERT that supports ``on_conflict_do_nothing`` on this connection's dialect."""
    name = conn.dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"the ledger supports sqlite and postgresql, not {name}")


def locking(conn: Connection, stmt: Select[Any]) -> Select[Any]:
    """Lock the selected rows, skipping ones other workers hold (PostgreSQL).

    SQLite has no row locks; there the surrounding ``BEGIN IMMEDIATE`` already serialises
    writers, which is just as safe for claiming.
    """
    if conn.dialect.name == "postgresql":
        return stmt.with_for_update(skip_locked=True)
    return stmt


def check_choice(value: str, allowed: Iterable[str], what: str) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{what} must be one of {allowed}, not {value!r}")


def lease_expired(now: datetime) -> Any:
    """SQL: the image is ``processing`` under a lease that ran out before ``now``."""
    return and_(images.c.status == "processing", images.c.lease_expires_at < now)


def in_active_run() -> Any:
    """SQL: the image belongs to no run, or to one that is neither paused nor cancelled."""
    stopped = select(runs.c.id).where(runs.c.control != "active")
    return or_(images.c.run_id.is_(None), images.c.run_id.not_in(stopped))


def released(now: datetime) -> dict[str, Any]:
    """Column values of a row whose lease is given up: no holder, no expiry."""
    return {"lease_expires_at": None, "leased_by": None, "updated_at": now}


def finished(now: datetime) -> dict[str, Any]:
    """Column values of a row reaching a final status: lease given up, finish time set."""
    return {**released(now), "finished_at": now}


def update_each(conn: Connection, params: Sequence[dict[str, Any]], **values: Any) -> None:
    """Update the image ``b_id`` of each parameter set to ``values`` (bind parameters welcome)."""
    if params:
        conn.execute(
            update(images).where(images.c.id == bindparam("b_id")).values(**values), list(params)
        )
