"""Settings: environment variables, and the per-data-dir PHI salt."""

from __future__ import annotations

import stat
import threading

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
