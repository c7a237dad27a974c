"""Settings: environment variables, and the per-data-dir PHI salt."""

from __future__ import annotations

import stat
import threading

import pytest
from pydantic import ValidationError

from bonewatch.worker.settings import Settings


def test_environment_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("BONEWATCH_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("BONEWATCH_BATCH_SIZE", "7")
    settings = Settings()
    assert settings.batch_size == 7
    assert (
        settings.resolved_database_url == f"sqlite:///{(tmp_path / 'd').resolve()}/bonewatch.sqlite"
    )
    monkeypatch.setenv("BONEWATCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1/x")
    assert Settings().resolved_database_url.startswith("postgresql+psycopg://")


def test_salt_is_created_once_private_and_shared(tmp_path):
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(Settings(data_dir=tmp_path).salt()))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results[0]) == 64
    mode = stat.S_IMODE((tmp_path / "phi-salt").stat().st_mode)
    assert mode == 0o600


def test_configured_salt_wins(tmp_path):
    assert Settings(data_dir=tmp_path, phi_salt="site-secret").salt() == "site-secret"
    assert not (tmp_path / "phi-salt").exists()


def test_settings_are_frozen_and_changes_are_validated(tmp_path):
    settings = Settings(data_dir=tmp_path)
    with pytest.raises(ValidationError):
        settings.batch_size = 0  # type: ignore[misc]
    assert settings.replace(batch_size=8).batch_size == 8
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        settings.replace(batch_size=0)


def test_an_option_is_validated_like_the_same_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("BONEWATCH_BATCH_SIZE", "0")
    with pytest.raises(ValidationError):
        Settings()
    monkeypatch.delenv("BONEWATCH_BATCH_SIZE")
    with pytest.raises(ValidationError):
        Settings.resolve(batch_size=0)
    assert Settings.resolve(batch_size=None).batch_size == 16  # None: the option was not given


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["process", "--batch-size", "0"], {}, "--batch-size 0"),
        (["process"], {"BONEWATCH_BATCH_SIZE": "0"}, "BONEWATCH_BATCH_SIZE"),
        (["watch", "--settle", "-1"], {}, "--settle -1"),
        (["process", "--batch-size", "5000"], {}, "--batch-size 5000"),
    ],
)
def test_out_of_range_options_are_usage_errors(tmp_path, monkeypatch, args, env, named):
    from typer.testing import CliRunner

    from bonewatch.worker.cli import app

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.png").write_bytes(b"not yet")
    monkeypatch.setenv("BONEWATCH_DATA_DIR", str(tmp_path / "data"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(app, [*args, str(inbox)])
    assert result.exit_code == 2, result.output
    assert named in result.output
    # nothing was registered: the ledger was never opened
    assert not (tmp_path / "data" / "bonewatch.sqlite").exists()


def test_the_phi_key_comes_from_its_file(tmp_path):
    key = tmp_path / "keys" / "phi"
    key.parent.mkdir()
    key.write_text("site-key\n")
    settings = Settings(data_dir=tmp_path / "data", phi_key_file=key, phi_salt="ignored")
    assert settings.salt() == "site-key"
    assert not (tmp_path / "data" / "phi-salt").exists()
    key.write_text("")
    with pytest.raises(RuntimeError, match="is empty"):
        Settings(data_dir=tmp_path / "data", phi_key_file=key).salt()
