"""PNG/DICOM writers: round trips through the readers and what the files contain."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import UID

from bonewatch.ingest import (
    TRANSFER_SYNTAXES_WRITABLE,
    make_uid,
    read_header,
    read_image,
    write_dicom,
    write_png,
)

SALT = "s"
PIXELS = np.random.default_rng(3).random((33, 47))  # odd sizes catch codec padding bugs
REQUIRED_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
)


def _quantised(pixels: np.ndarray, bits: int) -> np.ndarray:
    top = 2**bits - 1
    return np.round(pixels * top) / top


def test_required_syntaxes_are_writable() -> None:
    assert set(REQUIRED_SYNTAXES) <= set(TRANSFER_SYNTAXES_WRITABLE)


@pytest.mark.parametrize("bits", [8, 12, 16])
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("syntax", TRANSFER_SYNTAXES_WRITABLE)
def test_dicom_round_trip(make_dicom, syntax: str, photometric: str, bits: int) -> None:
    path = make_dicom(
        pixels=PIXELS, transfer_syntax=syntax, photometric=photometric, bits_stored=bits
    )
    image = read_image(path, salt=SALT)
    assert image.meta.transfer_syntax == syntax
    assert image.meta.photometric == photometric
    np.testing.assert_allclose(image.pixels, _quantised(PIXELS, bits), atol=1e-6)


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_stored_values_follow_the_photometric(make_dicom, photometric: str) -> None:
    pixels = np.array([[0.0, 0.25], [0.5, 1.0]])
    ds = pydicom.dcmread(make_dicom(pixels=pixels, photometric=photometric, bits_stored=12))
    levels = np.array([[0, 1024], [2048, 4095]])  # round(p * 4095)
    expected = 4095 - levels if photometric == "MONOCHROME1" else levels
    np.testing.assert_array_equal(ds.pixel_array, expected)
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (2048.0, 4096.0)


def test_eight_bits_allocate_eight(make_dicom) -> None:
    ds = pydicom.dcmread(make_dicom(bits_stored=8))
    assert (ds.BitsAllocated, ds.BitsStored) == (8, 8)


def test_cr_file_contents(make_dicom) -> None:
    path = make_dicom(
        patient_id="P1",
        patient_name="Doe^Jane",
        body_part="HAND",
        view_position="PA",
        laterality="L",
        study_uid="1.2.3",
        series_uid="1.2.3.4",
        sop_uid="1.2.3.4.5",
        study_date="20230405",
        instance_number=3,
        series_number=2,
    )
    ds = pydicom.dcmread(path)
    assert ds.preamble is not None and path.read_bytes()[128:132] == b"DICM"
    assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.1"
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4.5"
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID) == ("1.2.3", "1.2.3.4")
    assert (ds.Modality, ds.BodyPartExamined, ds.ViewPosition, ds.Laterality) == (
        "CR",
        "HAND",
        "PA",
        "L",
    )
    assert (ds.PatientID, str(ds.PatientName), ds.StudyDate) == ("P1", "Doe^Jane", "20230405")
    assert (ds.InstanceNumber, ds.SeriesNumber) == (3, 2)
    meta = read_header(path, salt=SALT)
    assert (meta.modality, meta.body_part_examined, meta.view_position) == ("CR", "HAND", "PA")


@pytest.mark.parametrize(
    ("photometric", "shape"), [("MONOCHROME1", "INVERSE"), ("MONOCHROME2", "IDENTITY")]
)
def test_dx_file_contents(make_dicom, photometric: str, shape: str) -> None:
    path = make_dicom(pixels=PIXELS, modality="DX", photometric=photometric, laterality="R")
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1"  # DX For Presentation
    assert ds.PresentationIntentType == "FOR PRESENTATION"
    assert ds.PresentationLUTShape == shape
    assert ds.ImageLaterality == "R"
    # MONOCHROME1 + INVERSE is one inversion, not two.
    pixels = read_image(path, salt=SALT).pixels
    np.testing.assert_allclose(pixels, _quantised(PIXELS, 12), atol=1e-6)


@pytest.mark.parametrize(
    "options",
    [
        {"bits_stored": 7},
        {"bits_stored": 17},
        {"photometric": "RGB"},
        {"modality": "CT"},
        {"transfer_syntax": "1.2.840.10008.1.2.4.50"},
    ],
)
def test_write_dicom_refuses_what_it_cannot_write(make_dicom, options) -> None:
    with pytest.raises(ValueError):
        make_dicom(**options)


def test_jpeg2000_refuses_images_under_32_pixels(make_dicom) -> None:
    with pytest.raises(ValueError, match="at least 32"):
        make_dicom(pixels=np.zeros((31, 64)), transfer_syntax="1.2.840.10008.1.2.4.90")


@pytest.mark.parametrize("bad", [np.full((2, 2), 1.5), np.full((2, 2), np.nan), np.zeros(4)])
def test_writers_refuse_bad_pixels(tmp_path: Path, bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        write_png(tmp_path / "x.png", bad)
    with pytest.raises(ValueError):
        write_dicom(tmp_path / "x.dcm", bad, study_uid="1.2", series_uid="1.3", sop_uid="1.4")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bits", [8, 16])
def test_png_round_trip(tmp_path: Path, bits: int) -> None:
    path = tmp_path / "x.png"
    write_png(path, PIXELS, bits=bits)
    with Image.open(path) as im:
        assert im.mode == ("L" if bits == 8 else "I;16")
    pixels = read_image(path, salt=SALT).pixels
    np.testing.assert_allclose(pixels, _quantised(PIXELS, bits), atol=1e-6)


def test_writes_leave_no_temporary_files(tmp_path: Path, make_dicom) -> None:
    write_png(tmp_path / "a.png", PIXELS)
    make_dicom("b.dcm", transfer_syntax="1.2.840.10008.1.2.4.90")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.dcm"]


def test_make_uid_is_deterministic_and_valid() -> None:
    uid = make_uid("study", "7")
    assert uid == make_uid("study", "7")
    assert uid != make_uid("study", "8") != make_uid("study7")
    assert UID(uid).is_valid and len(uid) <= 64
    with pytest.raises(ValueError):
        make_uid()
