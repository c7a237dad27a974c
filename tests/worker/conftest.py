from __future__ import annotations

from pathlib import Path

import pytest

from tests.models.conftest import build_tiny_bundle
from worker.settings import Settings


@pytest.fixture(scope="session")
def tiny_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("worker-bundles") / "tiny")


@pytest.fixture
def settings(tmp_path: Path, tiny_bundle_dir: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        bundle=tiny_bundle_dir,
        batch_size=4,
        phi_salt="test-salt",
        settle_seconds=0.2,
    )
