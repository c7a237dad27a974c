"""The SR and the Secondary Capture, built from plain values: dciodvfy-clean, deterministic."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from bonewatch.deliver import (
    BundleInfo,
    ImageOutcome,
    StudyOutcome,
    build_report,
    build_secondary_capture,
    object_uids,
)
from bonewatch.deliver import codes as bw

SOURCE = get_testdata_file("RG3_UNCR.dcm")
BUNDLE = BundleInfo("demo", "1.0.0", "Demonstration only. Not for clinical use.", True)


def _dciodvfy(path: Path) -> str:
    if shutil.which("dciodvfy") is None:
        message = "dciodvfy is missing: install the Debian package dicom3tools"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (CI=true)")
        pytest.skip(message)
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return run.stdout + run.stderr


def _study() -> tuple[pydicom.Dataset, StudyOutcome]:
    header = pydicom.dcmread(SOURCE, stop_before_pixels=True)
    image = ImageOutcome(str(header.SOPInstanceUID), str(header.SOPClassUID), "HAND", 0.81, 0.5)
    study = StudyOutcome(str(header.StudyInstanceUID), "HAND", 0.81, 0.5, "positive", (image,))
    return header, study


def test_report_is_valid_and_holds_the_results(tmp_path: Path) -> None:
    header, study = _study()
    sr = build_report(study, BUNDLE, [header])
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    report = _dciodvfy(path)
    assert "Error" not in report, report
    back = pydicom.dcmread(path)
    assert back.StudyInstanceUID == header.StudyInstanceUID
    assert back.PatientID == header.PatientID
    assert back.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == bw.PRIVATE_SCHEME
    import highdicom as hd

    parsed = hd.sr.srread(path)
    groups = parsed.content.get_image_measurement_groups()
    values = [m.value for g in groups for m in g.get_measurements(name=bw.P_FRACTURE)]
    assert [float(v) for v in values] == [0.81]
    sites = [g.finding_sites[0].value.value for g in groups]
    assert sites[0] == bw.PART_CODES["HAND"].value


def test_secondary_capture_is_valid_and_burned_in(tmp_path: Path) -> None:
    header, study = _study()
    picture = np.zeros((64, 80, 3), np.uint8)
    sc = build_secondary_capture(header, picture, study.images[0], BUNDLE)
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    report = _dciodvfy(path)
    assert "Error" not in report, report
    back = pydicom.dcmread(path)
    assert back.BurnedInAnnotation == "YES"
    assert back.StudyInstanceUID == header.StudyInstanceUID
    assert back.SeriesInstanceUID != header.SeriesInstanceUID
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == header.SOPInstanceUID


def test_uids_are_deterministic_and_change_with_the_bundle_version() -> None:
    a = object_uids("1.2.3", "demo", "1.0.0", "sc", "1.2.3.4")
    assert a == object_uids("1.2.3", "demo", "1.0.0", "sc", "1.2.3.4")
    assert a != object_uids("1.2.3", "demo", "1.0.1", "sc", "1.2.3.4")
    assert a.sop_instance_uid != object_uids("1.2.3", "demo", "1.0.0", "sc", "1.2.3.5")[1]
    assert a.series_uid == object_uids("1.2.3", "demo", "1.0.0", "sc", "1.2.3.5")[0]
    assert len(a.sop_instance_uid) <= 64
