"""The imagecodecs JPEG plugin: frame headers, and frames whose size disagrees with the dataset."""

from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
from pydicom.uid import JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1

from bonewatch.ingest import CorruptFileError, read_image
from bonewatch.ingest.dicom_jpeg import frame_size, is_available
from tests.ingest.test_dicom_syntaxes import _encapsulated

SALT = "s"


def _twelve_bit(rows: int = 32, columns: int = 48, **options) -> tuple[np.ndarray, bytes]:
    stored = (np.arange(rows * columns).reshape(rows, columns) * 3 % 4096).astype(np.uint16)
    return stored, imagecodecs.jpeg8_encode(stored, bitspersample=12, **options)


def test_plugin_covers_the_syntaxes_pillow_and_gdcm_leave_open() -> None:
    assert is_available(JPEGExtended12Bit)
    assert is_available(JPEGLossless) and is_available(JPEGLosslessSV1)
    assert not is_available(JPEGBaseline8Bit)  # Pillow keeps baseline, with its colour handling


@pytest.mark.parametrize("lossless", [False, True])
def test_frame_size_reads_the_start_of_frame(lossless: bool) -> None:
    _, codestream = _twelve_bit(30, 44, lossless=lossless)
    assert frame_size(codestream) == (30, 44, 12)


@pytest.mark.parametrize(
    "codestream",
    [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xda\x00\x02", b"\xff\xd8\xff\xc1\x00\x11\x0c"],
    ids=["empty", "not-jpeg", "scan-before-frame", "cut-in-frame-header"],
)
def test_frame_size_refuses_what_has_no_usable_frame_header(codestream: bytes) -> None:
    with pytest.raises(ValueError):
        frame_size(codestream)


def test_a_frame_larger_than_the_dataset_is_refused_before_decoding(tmp_path: Path) -> None:
    stored, codestream = _twelve_bit()
    sof = codestream.find(b"\xff\xc1")
    assert sof > 0
    bomb = bytearray(codestream)
    bomb[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)  # 7.2 GB once decoded
    path = _encapsulated(
        bytes(bomb), JPEGExtended12Bit, tmp_path / "bomb.dcm", shape=stored.shape, bits_stored=12
    )
    tracemalloc.start()
    try:
        with pytest.raises(CorruptFileError, match="60000x60000 but the dataset says 32x48"):
            read_image(path, salt=SALT)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda stream, scan: stream[: scan + 20], "cut short"),
        (lambda stream, scan: stream[:scan] + b"\xff\xd9", "no image|Jpeg8|libjpeg"),
    ],
    ids=["scan-cut-short", "no-scan"],
)
def test_a_damaged_frame_is_a_corrupt_file(tmp_path: Path, damage, message: str) -> None:
    stored, codestream = _twelve_bit(lossless=True)
    damaged = damage(codestream, codestream.find(b"\xff\xda"))
    path = _encapsulated(
        damaged, JPEGLossless, tmp_path / "cut.dcm", shape=stored.shape, bits_stored=12
    )
    with pytest.raises(CorruptFileError, match=message):
        read_image(path, salt=SALT)


def test_a_trailing_pad_byte_after_the_eoi_marker_is_fine(tmp_path: Path) -> None:
    stored, codestream = _twelve_bit(lossless=True)
    padded = codestream + b"\x00" if len(codestream) % 2 else codestream + b"\x00\x00"
    path = _encapsulated(
        padded, JPEGLossless, tmp_path / "pad.dcm", shape=stored.shape, bits_stored=12
    )
    np.testing.assert_allclose(read_image(path, salt=SALT).pixels, stored / 4095, atol=1e-6)
