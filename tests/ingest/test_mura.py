"""MURA path layout parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from bonewatch.ingest import MURA_PARTS, parse_mura_path


def test_parts_are_the_seven_upper_limb_parts() -> None:
    assert MURA_PARTS == ("ELBOW", "FINGER", "FOREARM", "HAND", "HUMERUS", "SHOULDER", "WRIST")


def test_positive_study() -> None:
    path = "MURA-v1.1/valid/XR_ELBOW/patient00001/study1_positive/image1.png"
    assert parse_mura_path(path) == {
        "mura_part": "ELBOW",
        "mura_patient": "patient00001",
        "mura_study": "XR_ELBOW/patient00001/study1_positive",
        "mura_label": 1,
    }


@pytest.mark.parametrize("part", MURA_PARTS)
def test_every_part_and_dicom_files(part: str) -> None:
    path = Path("/data") / f"XR_{part}" / "patient11185" / "study3_negative" / "image12.dcm"
    parsed = parse_mura_path(path)
    assert parsed is not None
    assert parsed["mura_part"] == part and parsed["mura_label"] == 0
    assert parsed["mura_study"] == f"XR_{part}/patient11185/study3_negative"


@pytest.mark.parametrize(
    "path",
    [
        "image1.png",
        "XR_ELBOW/patient00001/study1_unknown/image1.png",
        "XR_ELBOW/person00001/study1_positive/image1.png",
        "XR_ELBOW/patient00001/study1_positive/scan1.png",
        "XR_ELBOW/patient00001/study1_positive/extra/image1.png",
        "xr_elbow/patient00001/study1_positive/image1.png",
    ],
)
def test_other_layouts_give_none(path: str) -> None:
    assert parse_mura_path(path) is None


def test_regions_outside_the_seven_keep_their_name() -> None:
    # Phantom datasets hold XR_CHEST/XR_KNEE/XR_PELVIS studies that stage 1 learns to reject.
    parsed = parse_mura_path("XR_KNEE/patient00001/study1_negative/image1.png")
    assert parsed is not None
    assert parsed["mura_part"] == "KNEE" and parsed["mura_part"] not in MURA_PARTS
