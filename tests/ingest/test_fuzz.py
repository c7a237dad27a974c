"""Mutated DICOM, PNG and JPEG bytes: the readers return an image or an IngestError, nothing else.

Seeds cover every transfer syntax family the reader decodes (native little and big endian,
deflated, RLE, JPEG baseline, 12-bit extended and lossless, JPEG-LS, JPEG 2000, HTJ2K), colour
and palette DICOMs, and PNG and JPEG files. Each DICOM seed carries a patient name and ID, and no
refusal reason may repeat them.

The slow test runs ``BONEWATCH_FUZZ_EXAMPLES`` cases (5,000 unless set); run it with
``--hypothesis-show-statistics`` to see how the outcomes split by seed and error class.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
)

from bonewatch.ingest import (
    TRANSFER_SYNTAXES_WRITABLE,
    DecodedImage,
    IngestError,
    read_header,
    read_image,
    write_dicom,
    write_png,
)

PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-8675309"
PHI = ("Doe", "Jane", "8675309")
LONG_RUN_EXAMPLES = int(os.environ.get("BONEWATCH_FUZZ_EXAMPLES", "5000"))


def _with_patient(ds: Dataset) -> Dataset:
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    return ds


def _to_bytes(ds: Dataset, *, little_endian: bool = True) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True, little_endian=little_endian, implicit_vr=False)
    return buffer.getvalue()


def _encapsulated_seed(codestream: bytes, tsyntax: str, stored: np.ndarray, bits: int) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(SEEDS_BASE["native"]))
    ds.file_meta.TransferSyntaxUID = tsyntax
    ds.Rows, ds.Columns = stored.shape[:2]
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored, ds.HighBit = bits, bits - 1
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return _to_bytes(ds)


def _dicom_seeds(pixels: np.ndarray, tmp: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for i, syntax in enumerate(TRANSFER_SYNTAXES_WRITABLE):
        path = tmp / f"{i}.dcm"
        write_dicom(
            path,
            pixels,
            transfer_syntax=syntax,
            photometric="MONOCHROME1",
            study_uid="1.2.3",
            series_uid="1.2.3.4",
            sop_uid=f"1.2.3.4.{i}",
            patient_id=PATIENT_ID,
            patient_name=PATIENT_NAME,
            body_part="HAND",
        )
        out[syntax] = path.read_bytes()
    return out


def _seeds() -> dict[str, bytes]:
    pixels = np.random.default_rng(0).random((40, 40)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        out = _dicom_seeds(pixels, Path(tmp))
        png = Path(tmp) / "a.png"
        write_png(png, pixels)
        out["png"] = png.read_bytes()
        write_png(png, pixels, bits=16)
        out["png-16"] = png.read_bytes()
    SEEDS_BASE["native"] = out[str(ExplicitVRLittleEndian)]

    grey8 = (pixels * 255).astype(np.uint8)
    grey12 = (pixels * 4095).astype(np.uint16)
    baseline = io.BytesIO()
    Image.fromarray(grey8).save(baseline, format="JPEG", quality=90)
    out["jpeg-baseline"] = _encapsulated_seed(baseline.getvalue(), JPEGBaseline8Bit, grey8, 8)
    out["jpeg-extended-12"] = _encapsulated_seed(
        imagecodecs.jpeg8_encode(grey12, level=90, bitspersample=12), JPEGExtended12Bit, grey12, 12
    )
    out["jpeg-lossless"] = _encapsulated_seed(
        imagecodecs.jpeg8_encode(grey12, lossless=True, predictor=1, bitspersample=12),
        JPEGLosslessSV1,
        grey12,
        12,
    )
    out["htj2k"] = _encapsulated_seed(imagecodecs.htj2k_encode(grey12), HTJ2KLossless, grey12, 12)

    # Big endian, colour and palette objects from pydicom's own test files, with a patient added.
    big = _with_patient(pydicom.dcmread(get_testdata_file("MR_small_bigendian.dcm")))
    out["big-endian"] = _to_bytes(big, little_endian=False)
    rgb = _with_patient(pydicom.dcmread(get_testdata_file("SC_rgb_small_odd.dcm")))
    out["rgb"] = _to_bytes(rgb)
    palette = _with_patient(pydicom.dcmread(get_testdata_file("OBXXXX1A.dcm")))
    crop = np.ascontiguousarray(palette.pixel_array[100:120, 0:48])  # enough to fuzz
    palette.Rows, palette.Columns = crop.shape
    palette.PixelData = crop.tobytes()
    out["palette"] = _to_bytes(palette)
    jpeg_file = io.BytesIO()
    Image.fromarray(grey8).save(jpeg_file, format="JPEG", quality=90)
    out["jpeg-file"] = jpeg_file.getvalue()
    return out


SEEDS_BASE: dict[str, bytes] = {}
SEEDS = _seeds()
_SUFFIX = {"png": ".png", "png-16": ".png", "jpeg-file": ".jpg"}

# Damaged files make pydicom warn about every odd value it meets; that is expected here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_every_seed_reads_cleanly() -> None:
    # A seed that already fails would fuzz nothing but its own refusal.
    with tempfile.TemporaryDirectory() as tmp:
        for kind, data in SEEDS.items():
            path = Path(tmp) / f"seed{_SUFFIX.get(kind, '.dcm')}"
            path.write_bytes(data)
            image = read_image(path, salt="fuzz")
            assert image.pixels.std() > 0.01, kind


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[kind])
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return kind, bytes(data)


def _read_all(tmp: Path, kind: str, data: bytes) -> None:
    path = tmp / f"x{_SUFFIX.get(kind, '.dcm')}"
    path.write_bytes(data)
    for reader in (read_header, read_image):
        try:
            result = reader(path, salt="fuzz")
        except IngestError as exc:
            assert exc.reason and exc.status in {"failed", "unsupported"}
            assert not any(word in exc.reason for word in PHI), exc.reason
            assert exc.reason.isprintable(), exc.reason  # storable: no NUL, no surrogates
            event(f"{reader.__name__}: {exc.error_class}")
            continue
        event(f"{reader.__name__}: read")
        if reader is read_image:
            assert isinstance(result, DecodedImage)
            assert result.pixels.dtype == np.float32 and result.pixels.ndim == 2
            assert np.isfinite(result.pixels).all()
            assert 0.0 <= result.pixels.min() and result.pixels.max() <= 1.0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_files_give_an_image_or_an_ingest_error(tmp_path_factory, case) -> None:
    _read_all(tmp_path_factory.mktemp("fuzz"), *case)


@pytest.mark.slow
@settings(
    max_examples=LONG_RUN_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(mutated())
def test_mutated_files_long_run(tmp_path_factory, case) -> None:
    _read_all(tmp_path_factory.mktemp("fuzz"), *case)
