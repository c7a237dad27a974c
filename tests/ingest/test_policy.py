"""Acceptance policy and body part hints."""

from __future__ import annotations

import pytest
from pydicom.data import get_testdata_file

from bonewatch.ingest import (
    ImageMeta,
    ImageTooSmallError,
    UnsupportedBodyPartError,
    UnsupportedModalityError,
    body_part_hint,
    check_acceptance,
    read_header,
)

RG1_J2KR = get_testdata_file("RG1_J2KR.dcm")
RG3_J2KR = get_testdata_file("RG3_J2KR.dcm")


CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _meta(
    modality: str | None = "CR",
    body_part: str | None = None,
    *,
    fmt: str = "dicom",
    sop_class: str | None = CR_IMAGE,
    sop_class_name: str | None = None,
    rows: int | None = None,
    columns: int | None = None,
) -> ImageMeta:
    return ImageMeta(
        path="x",
        sha256="0" * 64,
        format=fmt,
        size_bytes=1,
        modality=modality,
        body_part_examined=body_part,
        sop_class_uid=sop_class,
        sop_class_name=sop_class_name,
        rows=rows,
        columns=columns,
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
    # without a Modality, the CR image SOP class is the sign of a radiograph
    check_acceptance(_meta(modality))


@pytest.mark.parametrize("sop_class", [CR_IMAGE, DX_FOR_PRESENTATION, DX_FOR_PROCESSING])
def test_radiograph_sop_classes_pass_without_a_modality(sop_class: str) -> None:
    check_acceptance(_meta(None, sop_class=sop_class))


def test_a_dicom_with_no_sign_of_a_radiograph_is_refused() -> None:
    sc = _meta(None, sop_class=SECONDARY_CAPTURE, sop_class_name="Secondary Capture Image Storage")
    with pytest.raises(UnsupportedModalityError) as info:
        check_acceptance(sc)
    assert info.value.reason.startswith(
        "a Secondary Capture Image Storage without a Modality shows no sign of being a "
        "projection radiograph"
    )
    with pytest.raises(UnsupportedModalityError, match="without a SOP Class UID"):
        check_acceptance(_meta("", sop_class=None))


def test_a_scanned_film_is_read_and_png_needs_no_modality() -> None:
    check_acceptance(_meta("CR", sop_class=SECONDARY_CAPTURE))  # a digitised film
    check_acceptance(_meta(None, fmt="png", sop_class=None))


def test_a_matrix_under_half_the_bundle_input_is_refused() -> None:
    check_acceptance(_meta(rows=64, columns=80), input_size=128)
    check_acceptance(_meta(rows=40, columns=32))  # no bundle known: no minimum
    with pytest.raises(ImageTooSmallError) as info:
        check_acceptance(_meta(rows=40, columns=32), input_size=128)
    assert info.value.status == "unsupported"
    assert info.value.reason == (
        "a 40×32 matrix is too small for this bundle's 128 px input (at least 64 px a side)"
    )


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
