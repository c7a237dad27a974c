"""Password hashing: argon2id through argon2-cffi, its salt and parameters in each hash."""

from __future__ import annotations

from functools import lru_cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

MIN_PASSWORD = 8
MAX_PASSWORD = 1024


@lru_cache(maxsize=1)
def _hasher() -> PasswordHasher:
    return PasswordHasher()  # RFC 9106's low-memory profile: argon2id, t=3, 64 MiB


@lru_cache(maxsize=1)
def _dummy_hash() -> str:
    return _hasher().hash("not a password of anyone")


def check_password_rules(password: str) -> None:
    """Raise ValueError unless ``password`` is 8 to 1024 characters."""
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise ValueError(f"a password is {MIN_PASSWORD} to {MAX_PASSWORD} characters")


def hash_password(password: str) -> str:
    """An encoded argon2id hash of ``password`` with a fresh random salt."""
    check_password_rules(password)
    return _hasher().hash(password)


def verify_password(encoded: str | None, password: str) -> bool:
    """Whether ``password`` matches ``encoded``. With no hash (no such user) a dummy hash is
    checked all the same, so an unknown name takes as long as a wrong password."""
    if len(password) > MAX_PASSWORD:
        return False
    try:
        return _hasher().verify(encoded or _dummy_hash(), password) and encoded is not None
    except (VerificationError, InvalidHashError):
        return False
