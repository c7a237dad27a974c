"""The web app's audit trail: who logged in, who viewed which study, who reviewed it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, Engine, select

from bonewatch.db.engine import write_transaction
from bonewatch.db.records import FromAttrs
from bonewatch.db.schema import audit_events, utcnow

ACTIONS: tuple[str, ...] = (
    "login",
    "login_failed",
    "logout",
    "view_study",
    "review",
)


@dataclass(frozen=True)
class AuditEntry(FromAttrs):
    """One event as the audit page and the tests read it."""

    id: int
    created_at: datetime
    username: str | None
    action: str
    study_uid: str | None
    review_id: int | None
    client: str | None


def _values(
    action: str,
    *,
    user_id: int | None,
    username: str | None,
    study_uid: str | None,
    review_id: int | None,
    client: str | None,
) -> dict[str, object]:
    if action not in ACTIONS:
        raise ValueError(f"audit action must be one of {ACTIONS}, not {action!r}")
    return {
        "created_at": utcnow(),
        "user_id": user_id,
        # Cut to the columns' size: a failed login's name is whatever was typed.
        "username": None if username is None else username[:64],
        "action": action,
        "study_uid": study_uid,
        "review_id": review_id,
        "client": None if client is None else client[:64],
    }


def add_audit_event(
    conn: Connection,
    action: str,
    *,
    user_id: int | None = None,
    username: str | None = None,
    study_uid: str | None = None,
    review_id: int | None = None,
    client: str | None = None,
) -> None:
    """Record an event inside a transaction the caller holds (a review and its event commit
    together)."""
    conn.execute(
        audit_events.insert().values(
            _values(
                action,
                user_id=user_id,
                username=username,
                study_uid=study_uid,
                review_id=review_id,
                client=client,
            )
        )
    )


def record_audit_event(
    engine: Engine,
    action: str,
    *,
    user_id: int | None = None,
    username: str | None = None,
    study_uid: str | None = None,
    client: str | None = None,
) -> None:
    """Record one event in its own transaction."""
    with write_transaction(engine) as conn:
        add_audit_event(
            conn, action, user_id=user_id, username=username, study_uid=study_uid, client=client
        )


def query_audit(
    engine: Engine,
    *,
    study_uid: str | None = None,
    username: str | None = None,
    action: str | None = None,
    limit: int = 200,
) -> list[AuditEntry]:
    """The newest events first, filtered where given."""
    a = audit_events
    stmt = select(a).order_by(a.c.id.desc()).limit(limit)
    if study_uid is not None:
        stmt = stmt.where(a.c.study_uid == study_uid)
    if username is not None:
        stmt = stmt.where(a.c.username == username)
    if action is not None:
        stmt = stmt.where(a.c.action == action)
    with engine.connect() as conn:
        return [AuditEntry.from_attrs(row) for row in conn.execute(stmt)]
