"""Web app accounts: ``user add``, ``user passwd``, ``user remove``, ``user list``."""

from __future__ import annotations

import getpass
import json
import sys
from enum import StrEnum
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from bonewatch.worker.cli._common import TableOrJson, cell, err, fail, out, settings_from


class Role(StrEnum):
    reviewer = "reviewer"
    admin = "admin"


NameArg = Annotated[str, typer.Argument(help="User name: letters, digits, '.', '_', '@', '-'.")]


def read_password() -> str:
    """The new password: typed twice on a terminal, else the first line of standard input."""
    from bonewatch.web.passwords import check_password_rules

    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != first:
            fail("the two passwords differ")
        password = first
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    try:
        check_password_rules(password)
    except ValueError as exc:
        fail(str(exc))
    return password


def _engine():  # type: ignore[no-untyped-def]
    from bonewatch.worker.runner import open_ledger

    return open_ledger(settings_from())


def add(
    name: NameArg,
    role: Annotated[
        Role, typer.Option(help="reviewer, or admin (also sees /metrics and /audit).")
    ] = (Role.reviewer),
) -> None:
    """Add a web app account.

    The password is read from standard input, or asked for on a terminal.
    """
    from bonewatch.db.users import UserExistsError, add_user, check_username
    from bonewatch.web.passwords import hash_password

    try:
        check_username(name)
    except ValueError as exc:
        fail(str(exc))
    engine = _engine()
    try:
        add_user(engine, name, hash_password(read_password()), role.value)
    except UserExistsError as exc:
        fail(f"{exc}; `bonewatch user passwd {name}` sets a new password", 1)
    err.print(f"added {role.value} {name}")


def passwd(name: NameArg) -> None:
    """Set a new password for an account (its open sessions end)."""
    from bonewatch.db.users import set_password_hash
    from bonewatch.web.passwords import hash_password

    engine = _engine()
    if not set_password_hash(engine, name, hash_password(read_password())):
        fail(f"no user {name!r}", 1)
    err.print(f"new password set for {name}")


def remove(name: NameArg) -> None:
    """Remove an account; its reviews and audit entries keep its name."""
    from bonewatch.db.users import remove_user

    if not remove_user(_engine(), name):
        fail(f"no user {name!r}", 1)
    err.print(f"removed {name}")


def list_users(
    fmt: Annotated[TableOrJson, typer.Option("--format", help="table or json.")] = (
        TableOrJson.table
    ),
) -> None:
    """List the web app's accounts."""
    from bonewatch.db.users import list_users as users

    rows = [
        {"username": u.username, "role": u.role, "created_at": u.created_at.isoformat()}
        for u in users(_engine())
    ]
    if fmt is TableOrJson.json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table()
    for column in ("username", "role", "created_at"):
        table.add_column(column)
    for row in rows:
        table.add_row(*(Text(cell(v)) for v in row.values()))
    out.print(table)
