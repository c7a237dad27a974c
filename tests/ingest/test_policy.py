"""Acceptance policy and body part hints."""

from __future__ import annotations

import pytest
from pydicom.data import get_testdata_file

from bonewatch.ingest import (
    ImageMeta,
    UnsupportedBodyPartError,
    UnsupportedModalityError,
    body_part_hint,
    check_acceptance,
    read_header,
)

RG1_J2KR = get_testdata_file("RG1_J2KR.dcm")
RG3_J2KR = get_testdata_file("RG3_J2KR.dcm")


def _meta(modality: str | None = "CR", body_part: str | None = None) -> ImageMeta:
    return ImageMeta(
        path="x",
        sha256="0" * 64,
        format="dicom",
        size_bytes=1,
        modality=modality,
        body_part_examined=body_part,
    )


def test_rg1_chest_is_refused() -> None:
    meta = read_header(RG1_J2KR, salt="s")
    assert meta.body_part_examined == "CHEST"
    with pytest.raises(UnsupportedBodyPartError, match="CHEST") as info:
        check_acceptance(meta)
    assert info.value.status == "unsupported"


def test_rg3_extremity_passes() -> None:
    check_acceptance(read_header(RG3_J2KR, salt="s"))


@pytest.mark.parametrize("modality", ["CR", "DX", "RG", "dx ", None, ""])
def test_projection_modalities_pass(modality: str | None) -> None:
    check_acceptance(_meta(modality))


@pytest.mark.parametrize("modality", ["CT", "MR", "US", "NM", "PT", "MG", "SR", "SEG", "OT", "XA"])
def test_other_modalities_are_refused(modality: str) -> None:
    with pytest.raises(UnsupportedModalityError) as info:
        check_acceptance(_meta(modality))
    assert info.value.reason == (
        f"modality {modality} is not a projection radiograph; bonewatch reads CR, DX and RG"
    )


def test_ct_slice_from_a_file(make_dicom, edit_dicom) -> None:
    def to_ct(ds) -> None:
        ds.Modality = "CT"
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"

    meta = read_header(edit_dicom(make_dicom(), to_ct), salt="s")
    with pytest.raises(UnsupportedModalityError, match="modality CT"):
        check_acceptance(meta)


@pytest.mark.parametrize(
    "body_part",
    [
        "CHEST",
        "KNEE",
        "SKULL",
        "PELVIS",
        "ABDOMEN",
        "CSPINE",
        "LSPINE",
        "TSPINE",
        "HIP",
        "FOOT",
        "ANKLE",
        "LEG",
        "HEAD",
        "ABDOMENPELVIS",
        "lower_leg",
        "KNEE LT",
        "CERVICAL SPINE",
    ],
)
def test_regions_outside_the_upper_limb_are_refused(body_part: str) -> None:
    with pytest.raises(UnsupportedBodyPartError):
        check_acceptance(_meta(body_part=body_part))


@pytest.mark.parametrize(
    "body_part",
    [
        None,
        "",
        "EXTREMITY",
        "UPPER EXTREMITY",
        "UPPER_LIMB",
        "ARM",
        "ARM RIGHT",
        "XYZZY",
        "HAND",
        "WRIST",
        "HAND AND WRIST",
        "CHEST SHOULDER",
        "THUMB",
    ],
)
def test_vague_and_upper_limb_values_pass(body_part: str | None) -> None:
    check_acceptance(_meta(body_part=body_part))


@pytest.mark.parametrize(
    ("value", "part"),
    [
        ("HAND", "HAND"),
        (" hand ", "HAND"),
        ("FINGER", "FINGER"),
        ("THUMB", "FINGER"),
        ("UPPER ARM", "HUMERUS"),
        ("UPPER_ARM", "HUMERUS"),
        ("UPPERARM", "HUMERUS"),
        ("HUMERUS", "HUMERUS"),
        ("FOREARM", "FOREARM"),
        ("LEFT ELBOW", "ELBOW"),
        ("SHOULDER_R", "SHOULDER"),
        ("WRIST", "WRIST"),
    ],
)
def test_body_part_hint(value: str, part: str) -> None:
    assert body_part_hint(value) == part


@pytest.mark.parametrize("value", [None, "", "EXTREMITY", "ARM", "CHEST", "HAND WRIST", "L"])
def test_body_part_hint_none(value: str | None) -> None:
    assert body_part_hint(value) is None
