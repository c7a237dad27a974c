"""The web app's accounts: names, roles and password hashes (hashing itself is the caller's)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, delete, func, select
from sqlalchemy.exc import IntegrityError

from bonewatch.db._sql import check_choice
from bonewatch.db.engine import write_transaction
from bonewatch.db.schema import ROLES, users, utcnow

# Account names: letters, digits and . _ @ -, starting with a letter or digit.
USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


@dataclass(frozen=True)
class UserRecord:
    """One account; ``password_hash`` is an encoded argon2 hash, never a password."""

    id: int
    username: str
    role: str
    password_hash: str
    created_at: datetime


class UserExistsError(ValueError):
    """An account of that name is there already."""


def check_username(username: str) -> str:
    """``username`` if it is a valid account name.

    Raises:
        ValueError: it is not 1 to 64 letters, digits, ``.``, ``_``, ``@`` or ``-``.
    """
    if not USERNAME.fullmatch(username):
        raise ValueError(
            f"user name {username!r} must be 1 to 64 letters, digits, '.', '_', '@' or '-', "
            "starting with a letter or digit"
        )
    return username


def _user(row: object) -> UserRecord:
    m = row._mapping  # type: ignore[attr-defined]
    return UserRecord(
        id=int(m["id"]),
        username=str(m["username"]),
        role=str(m["role"]),
        password_hash=str(m["password_hash"]),
        created_at=m["created_at"],
    )


def add_user(engine: Engine, username: str, password_hash: str, role: str = "reviewer") -> int:
    """Create an account and return its id.

    Raises:
        ValueError: a bad name or role.
        UserExistsError: the name is taken.
    """
    check_username(username)
    check_choice(role, ROLES, "role")
    try:
        with write_transaction(engine) as conn:
            return int(
                conn.execute(
                    users.insert()
                    .values(
                        username=username,
                        password_hash=password_hash,
                        role=role,
                        created_at=utcnow(),
                    )
                    .returning(users.c.id)
                ).scalar_one()
            )
    except IntegrityError as exc:
        raise UserExistsError(f"user {username!r} exists already") from exc


def set_password_hash(engine: Engine, username: str, password_hash: str) -> bool:
    """Replace an account's hash (its sessions end with it); False if there is no such user."""
    with write_transaction(engine) as conn:
        done = conn.execute(
            users.update().where(users.c.username == username).values(password_hash=password_hash)
        ).rowcount
    return bool(done)


def remove_user(engine: Engine, username: str) -> bool:
    """Delete an account; its reviews and audit events keep its name. False if none."""
    with write_transaction(engine) as conn:
        return bool(conn.execute(delete(users).where(users.c.username == username)).rowcount)


def get_user(
    engine: Engine, *, username: str | None = None, user_id: int | None = None
) -> UserRecord | None:
    """The account of that name or id, or None."""
    stmt = select(users)
    if username is not None:
        stmt = stmt.where(users.c.username == username)
    elif user_id is not None:
        stmt = stmt.where(users.c.id == user_id)
    else:
        raise TypeError("give username or user_id")
    with engine.connect() as conn:
        row = conn.execute(stmt).first()
    return None if row is None else _user(row)


def list_users(engine: Engine) -> list[UserRecord]:
    """Every account, by name."""
    with engine.connect() as conn:
        return [_user(r) for r in conn.execute(select(users).order_by(users.c.username))]


def count_users(engine: Engine) -> int:
    """How many accounts exist."""
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(users)).scalar_one())
