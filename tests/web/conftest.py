"""A real ledger for the review app: phantom studies (PNG and DICOM) processed by the shipped
demo bundle through `bonewatch process`, with heatmaps stored for the positives; and clients of
the app over a copy of it, with two accounts."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from bonewatch.db import make_engine, upgrade
from bonewatch.db.users import add_user
from bonewatch.web import WebConfig, create_app
from bonewatch.web.passwords import hash_password

ADMIN = ("alice", "alice's long password")
REVIEWER = ("bob", "bob's long password")
SECRET = "test-session-secret-" + "x" * 32


@dataclass(frozen=True)
class Ledger:
    """A processed ledger: its SQLite file, the heatmap folder, where the studies came from."""

    data_dir: Path
    sqlite: Path
    heatmaps: Path
    inbox: Path


@pytest.fixture(scope="session")
def processed_ledger(tmp_path_factory: pytest.TempPathFactory) -> Ledger:
    from bonewatch.worker.cli import app
    from bonewatch.worker.synth import synthesize

    root = tmp_path_factory.mktemp("review")
    inbox, data = root / "inbox", root / "data"
    synthesize(inbox, studies=14, fmt="both", seed=7, size=512)
    env = {
        "BONEWATCH_DATA_DIR": str(data),
        "BONEWATCH_HEATMAPS": "true",
        "BONEWATCH_PHI_SALT": "review-tests",
        "BONEWATCH_BATCH_SIZE": "8",
    }
    result = CliRunner().invoke(app, ["process", str(inbox)], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    ledger = Ledger(data, data / "bonewatch.sqlite", data / "heatmaps", inbox)
    assert any(ledger.heatmaps.rglob("*.png")), "the demo bundle found no positive to explain"
    return ledger


@pytest.fixture(scope="session")
def password_hashes() -> dict[str, str]:
    return {name: hash_password(password) for name, password in (ADMIN, REVIEWER)}


@pytest.fixture
def web_url(tmp_path: Path, processed_ledger: Ledger, password_hashes: dict[str, str]) -> str:
    """A copy of the processed ledger, migrated, with alice (admin) and bob (reviewer)."""
    copy = tmp_path / "ledger.sqlite"
    # The backup API, not a file copy: the ledger's newest pages may still be in its WAL file.
    with closing(sqlite3.connect(processed_ledger.sqlite)) as source:
        with closing(sqlite3.connect(copy)) as target:
            source.backup(target)
    url = f"sqlite:///{copy}"
    upgrade(url)
    engine = make_engine(url)
    try:
        add_user(engine, ADMIN[0], password_hashes[ADMIN[0]], "admin")
        add_user(engine, REVIEWER[0], password_hashes[REVIEWER[0]], "reviewer")
    finally:
        engine.dispose()
    return url


@pytest.fixture
def web_config(web_url: str, processed_ledger: Ledger) -> WebConfig:
    return WebConfig(
        database_url=web_url,
        session_secret=SECRET,
        heatmap_dir=processed_ledger.heatmaps,
        login_attempts=3,
        login_lockout_seconds=60,
        metrics_token="metrics-token-0123456789",
    )


@pytest.fixture
def web_engine(web_url: str) -> Iterator[object]:
    engine = make_engine(web_url)
    yield engine
    engine.dispose()


@pytest.fixture
def client(web_config: WebConfig, web_engine) -> Iterator[TestClient]:
    with TestClient(create_app(web_config, engine=web_engine)) as test_client:
        yield test_client


def form_token(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "no CSRF token in the page"
    return found[1]


def log_in(client: TestClient, account: tuple[str, str] = REVIEWER, next_path: str = "/studies"):
    page = client.get("/login")
    return client.post(
        "/login",
        data={
            "username": account[0],
            "password": account[1],
            "csrf_token": form_token(page.text),
            "next": next_path,
        },
        follow_redirects=False,
    )


@pytest.fixture
def reviewer(client: TestClient) -> TestClient:
    response = log_in(client, REVIEWER)
    assert response.status_code == 303, response.text
    return client


@pytest.fixture
def admin(client: TestClient) -> TestClient:
    response = log_in(client, ADMIN)
    assert response.status_code == 303, response.text
    return client
