"""db/users.py: accounts of the review app, on both dialects."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import IntegrityError

from bonewatch.db.users import (
    UserExistsError,
    add_user,
    count_users,
    get_user,
    list_users,
    remove_user,
    set_password_hash,
)


def test_add_get_list_remove(db_engine):
    assert count_users(db_engine) == 0
    alice = add_user(db_engine, "alice", "$argon2id$hash-a", "admin")
    add_user(db_engine, "bob", "$argon2id$hash-b")
    assert count_users(db_engine) == 2
    found = get_user(db_engine, username="alice")
    assert found is not None and found.id == alice and found.role == "admin"
    assert get_user(db_engine, user_id=alice) == found
    assert [u.username for u in list_users(db_engine)] == ["alice", "bob"]
    assert get_user(db_engine, username="bob").role == "reviewer"
    assert set_password_hash(db_engine, "bob", "$argon2id$new")
    assert get_user(db_engine, username="bob").password_hash == "$argon2id$new"
    assert not set_password_hash(db_engine, "carol", "x")
    assert remove_user(db_engine, "bob") and not remove_user(db_engine, "bob")
    assert get_user(db_engine, username="bob") is None


def test_names_are_unique_and_checked(db_engine):
    add_user(db_engine, "alice", "h")
    with pytest.raises(UserExistsError):
        add_user(db_engine, "alice", "h2")
    for bad in ("", "-x", "a b", "x" * 65, "<b>", "bob'; --"):
        with pytest.raises(ValueError, match="user name"):
            add_user(db_engine, bad, "h")
    with pytest.raises(ValueError, match="role"):
        add_user(db_engine, "carol", "h", "root")


def test_the_schema_refuses_an_unknown_role(db_engine):
    from bonewatch.db.engine import write_transaction
    from bonewatch.db.schema import users, utcnow

    with pytest.raises(IntegrityError), write_transaction(db_engine) as conn:
        conn.execute(
            users.insert().values(
                username="eve", password_hash="h", role="root", created_at=utcnow()
            )
        )
