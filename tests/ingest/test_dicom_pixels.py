"""The grey pipeline against the DICOM standard, value by value.

Every expected array here is worked out from the formulas of PS3.3 C.11 (Modality LUT, VOI LUT
and window functions), C.7.6.3 (photometric interpretations, palettes) and C.8.11 (presentation
LUT shape), written out as numbers or as the standard's own formula: never by calling the code
under test or pydicom's apply_* functions. Output convention: float in [0, 1], 1 = bright.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, generate_uid

from bonewatch.ingest import read_image

SALT = "s"
ATOL = 1e-6
# 8-bit stored values shared by several tests.
STORED8 = np.array([[0, 50, 100], [149, 150, 255]], dtype=np.uint8)


def _write(
    path: Path,
    raw: bytes,
    shape: tuple[int, int],
    *,
    bits_allocated: int,
    bits_stored: int,
    signed: bool = False,
    photometric: str = "MONOCHROME2",
    samples: int = 1,
    big_endian: bool = False,
    **attributes: Any,
) -> Path:
    """Write a dataset whose pixel data is exactly ``raw``, with nothing checked or converted."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRBigEndian if big_endian else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = shape
    ds.SamplesPerPixel = samples
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = raw
    ds["PixelData"].VR = "OB" if bits_allocated == 8 else "OW"
    ds.save_as(path, enforce_file_format=True, little_endian=not big_endian, implicit_vr=False)
    return path


def _grey(path: Path) -> np.ndarray:
    return read_image(path, salt=SALT).pixels.astype(np.float64)


def _eight_bit(tmp_path: Path, **attributes: Any) -> Path:
    return _write(
        tmp_path / "p.dcm", STORED8.tobytes(), (2, 3), bits_allocated=8, bits_stored=8, **attributes
    )


# --- MONOCHROME1 / MONOCHROME2 / Presentation LUT Shape ----------------------------------------


@pytest.mark.parametrize(
    ("photometric", "shape", "inverted"),
    [
        ("MONOCHROME2", None, False),
        ("MONOCHROME2", "IDENTITY", False),
        ("MONOCHROME2", "INVERSE", True),
        ("MONOCHROME1", None, True),
        # DX pairs MONOCHROME1 with INVERSE (PS3.3 C.8.11.1.1.1): one inversion, not two.
        ("MONOCHROME1", "INVERSE", True),
    ],
)
def test_monochrome_and_presentation_lut_shape(
    tmp_path: Path, photometric: str, shape: str | None, inverted: bool
) -> None:
    stored = np.array([[0, 1000], [2048, 4095]], dtype="<u2")
    extra = {"PresentationLUTShape": shape} if shape else {}
    path = _write(
        tmp_path / "m.dcm",
        stored.tobytes(),
        (2, 2),
        bits_allocated=16,
        bits_stored=12,
        photometric=photometric,
        **extra,
    )
    # No window, no LUT: the stored range 0..4095 spans black to white (MONOCHROME2), or white
    # to black (MONOCHROME1: "minimum sample value is intended to be displayed as white").
    expected = np.array([[0.0, 1000 / 4095], [2048 / 4095, 1.0]])
    np.testing.assert_allclose(_grey(path), 1.0 - expected if inverted else expected, atol=ATOL)


# --- Modality LUT: rescale and sequence ----------------------------------------------------------


def test_negative_rescale_slope_without_a_window(tmp_path: Path) -> None:
    path = _eight_bit(tmp_path, RescaleSlope=-1, RescaleIntercept=255)
    # Modality values 255 - x over their range 0..255: the highest stored value is darkest.
    expected = (255.0 - STORED8) / 255.0
    np.testing.assert_allclose(_grey(path), expected, atol=ATOL)


def test_negative_rescale_slope_then_a_window(tmp_path: Path) -> None:
    path = _eight_bit(
        tmp_path, RescaleSlope=-2, RescaleIntercept=300, WindowCenter=100, WindowWidth=101
    )
    # Modality values 300 - 2x = [[300, 200, 100], [2, 0, -210]]. Window c=100, w=101 (LINEAR):
    # v <= 49.5 -> 0, v > 149.5 -> 1, else (v - 99.5) / 100 + 0.5.
    expected = np.array([[1.0, 1.0, 0.505], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(_grey(path), expected, atol=ATOL)


def _lut_item(descriptor: list[int], data: list[int]) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = descriptor
    item.add_new(0x00283006, "US", data)  # LUT Data
    return item


def test_modality_lut_sequence_then_a_window(tmp_path: Path) -> None:
    stored = np.array([[5, 10, 11], [12, 13, 200]], dtype=np.uint8)
    lut = _lut_item([4, 10, 16], [100, 200, 300, 400])
    path = _write(
        tmp_path / "mlut.dcm",
        stored.tobytes(),
        (2, 3),
        bits_allocated=8,
        bits_stored=8,
        ModalityLUTSequence=[lut],
        WindowCenter=250,
        WindowWidth=301,
    )
    # LUT (PS3.3 C.11.1.1): below the first mapped value (10) -> first entry, above the last
    # (10 + 3) -> last entry: v = [[100, 100, 200], [300, 400, 400]].
    # Window c=250, w=301: v <= 99.5 -> 0, v > 399.5 -> 1, else (v - 249.5) / 300 + 0.5.
    expected = np.array(
        [
            [(100 - 249.5) / 300 + 0.5] * 2 + [(200 - 249.5) / 300 + 0.5],
            [(300 - 249.5) / 300 + 0.5, 1.0, 1.0],
        ]
    )
    np.testing.assert_allclose(_grey(path), expected, atol=ATOL)


def test_modality_lut_sequence_alone_spans_its_output_depth(tmp_path: Path) -> None:
    stored = np.array([[0, 1], [2, 3]], dtype=np.uint8)
    lut = _lut_item([4, 0, 12], [0, 1000, 3000, 4095])
    path = _write(
        tmp_path / "mlut.dcm",
        stored.tobytes(),
        (2, 2),
        bits_allocated=8,
        bits_stored=8,
        ModalityLUTSequence=[lut],
    )
    # Entries are 12-bit (third descriptor value), so the output range is 0..4095.
    expected = np.array([[0.0, 1000 / 4095], [3000 / 4095, 1.0]])
    np.testing.assert_allclose(_grey(path), expected, atol=ATOL)


# --- VOI: LUT sequence and window functions ----------------------------------------------------


def test_voi_lut_sequence_with_an_offset_first_value(tmp_path: Path) -> None:
    stored = np.array([[0, 2, 3], [4, 5, 9]], dtype=np.uint8)
    lut = _lut_item([4, 2, 12], [0, 1000, 2000, 4095])
    path = _write(
        tmp_path / "voi.dcm",
        stored.tobytes(),
        (2, 3),
        bits_allocated=8,
        bits_stored=8,
        VOILUTSequence=[lut],
    )
    # First mapped value 2: x < 2 -> entry 0, x > 5 -> entry 3; 12-bit output over 0..4095.
    expected = np.array([[0, 0, 1000], [2000, 4095, 4095]]) / 4095
    np.testing.assert_allclose(_grey(path), expected, atol=ATOL)


def test_window_linear_exact(tmp_path: Path) -> None:
    stored = np.array([[0, 75, 80], [100, 110, 126]], dtype=np.uint8)
    path = _write(
        tmp_path / "le.dcm",
        stored.tobytes(),
        (2, 3),
        bits_allocated=8,
        bits_stored=8,
        WindowCenter=100,
        WindowWidth=50,
        VOILUTFunction="LINEAR_EXACT",
    )
    # C.11.2.1.3.2: x <= c - w/2 (75) -> 0, x > c + w/2 (125) -> 1, else (x - c) / w + 0.5.
    expected = np.array([[0.0, 0.0, 0.1], [0.5, 0.7, 1.0]])
    np.testing.assert_allclose(_grey(path), expected, atol=ATOL)


def test_window_sigmoid(tmp_path: Path) -> None:
    stored = np.array([[0, 50, 100], [125, 150, 255]], dtype=np.uint8)
    path = _write(
        tmp_path / "sig.dcm",
        stored.tobytes(),
        (2, 3),
        bits_allocated=8,
        bits_stored=8,
        WindowCenter=100,
        WindowWidth=50,
        VOILUTFunction="SIGMOID",
    )
    # C.11.2.1.3.1: y = 1 / (1 + exp(-4 (x - c) / w)) over the output range, here [0, 1].
    x = stored.astype(np.float64)
    expected = 1.0 / (1.0 + np.exp(-4.0 * (x - 100.0) / 50.0))
    assert expected[0, 2] == 0.5  # the centre maps to mid-grey
    np.testing.assert_allclose(_grey(path), expected, atol=ATOL)


# --- stored bits and signed values ---------------------------------------------------------------


def test_bits_above_bits_stored_are_not_part_of_the_value(tmp_path: Path) -> None:
    # 12 of 16 bits stored; the top 4 bits carry junk (old overlay planes): C.7.6.1.1.4 keeps
    # only bits HighBit..HighBit-BitsStored+1.
    raw = np.array([[0x0000, 0x0FFF], [0xF800, 0x1001]], dtype="<u2")
    path = _write(tmp_path / "b.dcm", raw.tobytes(), (2, 2), bits_allocated=16, bits_stored=12)
    expected = np.array([[0, 4095], [0x800, 1]]) / 4095
    np.testing.assert_allclose(_grey(path), expected, atol=ATOL)


def test_signed_12_bit_values_with_and_without_sign_extension(tmp_path: Path) -> None:
    # -5 written as its 12-bit two's complement 0xFFB (not sign-extended) and as 0xFFFB
    # (sign-extended); -2048 and 2047 are the ends of the signed 12-bit range.
    raw = np.array([[0x0FFB, 0xFFFB, 0x0005], [0x0800, 0x07FF, 0x0000]], dtype="<u2")
    path = _write(
        tmp_path / "s.dcm", raw.tobytes(), (2, 3), bits_allocated=16, bits_stored=12, signed=True
    )
    values = np.array([[-5, -5, 5], [-2048, 2047, 0]])
    expected = (values + 2048) / 4095  # the signed range -2048..2047 spans black to white
    np.testing.assert_allclose(_grey(path), expected, atol=ATOL)


def test_signed_16_bit_rescaled_and_windowed(tmp_path: Path) -> None:
    values = np.array([[-1024, -24], [976, 2000]], dtype="<i2")
    path = _write(
        tmp_path / "s16.dcm",
        values.tobytes(),
        (2, 2),
        bits_allocated=16,
        bits_stored=16,
        signed=True,
        RescaleSlope=1,
        RescaleIntercept=24,
        WindowCenter=0,
        WindowWidth=2001,
    )
    # Modality: [[-1000, 0], [1000, 2024]]; window c=0, w=2001: v <= -1000.5 -> 0,
    # v > 999.5 -> 1, else (v + 0.5) / 2000 + 0.5.
    expected = np.array([[(-1000 + 0.5) / 2000 + 0.5, 0.50025], [1.0, 1.0]])
    np.testing.assert_allclose(_grey(path), expected, atol=ATOL)


# --- colour to grey ------------------------------------------------------------------------------

# BT.601 luma: grey = 0.299 R + 0.587 G + 0.114 B.
LUMA = np.array([0.299, 0.587, 0.114])


def test_rgb_16_bit(tmp_path: Path) -> None:
    rgb = np.array([[[65535, 0, 0], [0, 65535, 0]], [[0, 0, 65535], [6553, 6553, 6553]]], "<u2")
    path = _write(
        tmp_path / "rgb16.dcm",
        rgb.tobytes(),
        (2, 2),
        bits_allocated=16,
        bits_stored=16,
        photometric="RGB",
        samples=3,
    )
    expected = np.array([[0.299, 0.587], [0.114, 6553 / 65535]])
    np.testing.assert_allclose(_grey(path), expected, atol=ATOL)


# (Y, Cb, Cr) triples that stay inside 0..255 once converted to RGB.
YBR = np.array([[[16, 128, 128], [128, 100, 160]], [[200, 140, 110], [235, 128, 128]]], np.uint8)


def test_ybr_full_becomes_its_luma(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "ybr.dcm",
        YBR.tobytes(),
        (2, 2),
        bits_allocated=8,
        bits_stored=8,
        photometric="YBR_FULL",
        samples=3,
    )
    # C.7.6.3.1.2 YBR_FULL: R = Y + 1.402 (Cr - 128), G = Y - 0.344136 (Cb - 128)
    # - 0.714136 (Cr - 128), B = Y + 1.772 (Cb - 128); the BT.601 luma of that RGB is Y itself.
    y, cb, cr = (YBR[..., i].astype(np.float64) for i in range(3))
    rgb = np.stack(
        [
            y + 1.402 * (cr - 128),
            y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
            y + 1.772 * (cb - 128),
        ],
        axis=-1,
    )
    np.testing.assert_allclose(rgb @ LUMA, y, atol=1e-3)
    # The decoder rounds each RGB channel to 8 bits: at most half a level per channel.
    np.testing.assert_allclose(_grey(path), y / 255, atol=0.5 / 255)


def test_ybr_full_422_uncompressed(tmp_path: Path) -> None:
    # Two horizontally adjacent pixels share Cb and Cr: bytes Y1 Y2 Cb Cr (C.7.6.3.1.2).
    luma = np.array([[20, 60, 100, 140], [180, 220, 30, 90]], dtype=np.uint8)
    raw = bytearray()
    for row in luma:
        for left, right in zip(row[0::2], row[1::2], strict=True):
            raw += bytes([left, right, 128, 128])
    path = _write(
        tmp_path / "422.dcm",
        bytes(raw),
        (2, 4),
        bits_allocated=8,
        bits_stored=8,
        photometric="YBR_FULL_422",
        samples=3,
    )
    np.testing.assert_allclose(_grey(path), luma / 255, atol=0.5 / 255)


def _palette_file(path: Path, *, depth: int, big_endian: bool) -> Path:
    # Indices 0..9; the LUT maps from first value 1, four entries, so index 0 takes entry 0 and
    # indices above 4 take entry 3 (C.7.6.3.1.5).
    stored = np.array([[0, 1, 2], [3, 4, 9]], dtype=np.uint8)
    top, half, grey = 2**depth - 1, 2 ** (depth - 1), 161 << (depth - 8)
    # Entries: black, red, half green, grey; 16-bit values that read differently byte-swapped.
    red, green, blue = [0, top, 0, grey], [0, 0, half, grey], [0, 0, 0, grey]
    dtype = ">u2" if big_endian else "<u2"
    entries = {
        f"{colour}PaletteColorLookupTableData": np.array(data, dtype=dtype).tobytes()
        if depth == 16
        else np.array(data, dtype=np.uint8).tobytes()
        for colour, data in (("Red", red), ("Green", green), ("Blue", blue))
    }
    descriptors = {
        f"{colour}PaletteColorLookupTableDescriptor": [4, 1, depth]
        for colour in ("Red", "Green", "Blue")
    }
    return _write(
        path,
        stored.tobytes(),
        (2, 3),
        bits_allocated=8,
        bits_stored=8,
        photometric="PALETTE COLOR",
        big_endian=big_endian,
        **descriptors,
        **entries,
    )


@pytest.mark.parametrize(
    ("depth", "big_endian"), [(16, False), (16, True), (8, False)], ids=["16-le", "16-be", "8-le"]
)
def test_palette_colour_becomes_luminance(tmp_path: Path, depth: int, big_endian: bool) -> None:
    path = _palette_file(tmp_path / "pal.dcm", depth=depth, big_endian=big_endian)
    top, half, grey = 2**depth - 1, 2 ** (depth - 1), 161 << (depth - 8)
    # Each entry over the LUT's full scale (2**depth - 1), then BT.601 luma; indices 0 and 1 take
    # the first entry, 4 and 9 the last.
    first, red, green, last = 0.0, 0.299, 0.587 * half / top, grey / top
    expected = np.array([[first, first, red], [green, last, last]])
    np.testing.assert_allclose(_grey(path), expected, atol=ATOL)
