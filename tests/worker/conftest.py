from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bonewatch.worker.settings import Settings
from tests.models.conftest import build_tiny_bundle


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


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll ``predicate`` every 0.1 s until it holds (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False
