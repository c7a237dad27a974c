from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deliver.pacs import Orthanc, require_orthanc


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """Orthanc on loopback ports, storing under the test's tmp_path."""
    require_orthanc()
    server = Orthanc(tmp_path / "orthanc").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def orthanc_web(tmp_path: Path) -> Iterator[Orthanc]:
    """Orthanc with its DICOMweb plugin (STOW-RS, QIDO-RS) loaded."""
    require_orthanc()
    server = Orthanc(tmp_path / "orthanc-web", dicomweb=True).start()
    try:
        yield server
    finally:
        server.stop()
