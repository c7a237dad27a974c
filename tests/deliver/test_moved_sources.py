"""A study's objects are built from its sources where ``watch --quarantine`` moved them, even
when the move had to number a name already taken in ``done/``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bonewatch.ingest import make_uid, write_dicom
from bonewatch.worker.delivery import source_file
from bonewatch.worker.pipeline import quarantine_finished
from bonewatch.worker.settings import Settings


def _dicom(path: Path, sop_uid: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_dicom(
        path,
        np.full((64, 64), 0.7, np.float32),
        study_uid=make_uid(sop_uid, "study"),
        series_uid=make_uid(sop_uid, "series"),
        sop_uid=sop_uid,
    )
    return path


def test_a_source_moved_under_a_numbered_name_is_found_by_its_uid(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    settings = Settings(data_dir=tmp_path / "data", inbox=inbox, quarantine=True)
    recorded = inbox / "XR_WRIST" / "p1" / "image1.dcm"
    first, second = make_uid("first"), make_uid("second")
    # Two files arrive at the same name, one after the other; each is moved once finished.
    _dicom(recorded, first)
    assert quarantine_finished([(str(recorded), "done")], settings)
    _dicom(recorded, second)
    assert quarantine_finished([(str(recorded), "done")], settings)
    done = inbox / "done" / "XR_WRIST" / "p1"
    assert sorted(p.name for p in done.iterdir()) == ["image1.1.dcm", "image1.dcm"]
    # Hostile neighbours with numbered names: a link to the second file, and not DICOM at all.
    os.symlink(done / "image1.1.dcm", done / "image1.2.dcm")
    (done / "image1.3.dcm").write_bytes(b"not DICOM")
    assert source_file(str(recorded), settings, first) == str(done / "image1.dcm")
    assert source_file(str(recorded), settings, second) == str(done / "image1.1.dcm")
    # One that was never moved (or moved away since) is looked for where it was recorded.
    assert source_file(str(recorded), settings, make_uid("third")) == str(recorded)
    # Without the quarantine the recorded path is the only place.
    plain = Settings(data_dir=tmp_path / "data", inbox=inbox, quarantine=False)
    assert source_file(str(recorded), plain, second) == str(recorded)
