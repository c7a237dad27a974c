"""DICOM decoding: the grey pipeline, real radiographs, and every way a DICOM can be bad."""

from __future__ import annotations

import hashlib
import hmac
import io
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from bonewatch.ingest import (
    CorruptFileError,
    ImageTooLargeError,
    NoPixelDataError,
    TruncatedFileError,
    UnsupportedMultiFrameError,
    UnsupportedTransferSyntaxError,
    check_acceptance,
    read_header,
    read_image,
)
from bonewatch.ingest.dicom import is_dicom

RG3_J2KR = get_testdata_file("RG3_J2KR.dcm")
RG3_UNCR = get_testdata_file("RG3_UNCR.dcm")
SALT = "test-salt"

# 8-bit stored values used by the hand-computed pipeline tests.
STORED = np.array([[0, 50, 100], [149, 150, 255]], dtype=np.uint8)


def test_rg3_lossless_and_uncompressed_decode_identically() -> None:
    uncompressed = read_image(RG3_UNCR, salt=SALT)
    j2k = read_image(RG3_J2KR, salt=SALT)
    assert j2k.pixels.shape == (1760, 1760)
    assert j2k.pixels.dtype == np.float32
    np.testing.assert_array_equal(j2k.pixels, uncompressed.pixels)
    assert j2k.meta.transfer_syntax == "1.2.840.10008.1.2.4.90"


def test_rg3_header_fields() -> None:
    meta = read_header(RG3_J2KR, salt=SALT)
    assert meta.format == "dicom"
    assert (meta.rows, meta.columns, meta.bits_stored) == (1760, 1760, 10)
    assert meta.modality == "CR"
    assert meta.body_part_examined == "EXTREMITY"
    assert meta.photometric == "MONOCHROME1"
    assert meta.view_position == "AP"
    assert meta.sop_class_uid == "1.2.840.10008.5.1.4.1.1.1"
    assert meta.study_uid and meta.series_uid and meta.sop_instance_uid
    with open(RG3_J2KR, "rb") as fh:
        assert meta.sha256 == hashlib.sha256(fh.read()).hexdigest()


def test_rg3_monochrome1_renders_bone_bright() -> None:
    # RG3 is an AP lower leg: the tibia shaft sits near x=840, the unexposed air strip left of
    # the leg near x=530, and the collimated edges are unexposed (white on film).
    pixels = read_image(RG3_UNCR, salt=SALT).pixels
    assert 0.0 <= pixels.min() and pixels.max() <= 1.0
    tibia = pixels[200:600, 810:870].mean()
    soft_tissue = pixels[200:600, 700:760].mean()
    air = pixels[400:800, 500:560].mean()
    assert tibia > soft_tissue + 0.2 > air + 0.4
    assert air < 0.15
    np.testing.assert_array_equal(pixels[:, :300], 1.0)


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_linear_window_matches_the_standard(make_raw_dicom, photometric: str) -> None:
    path = make_raw_dicom(
        "w.dcm", STORED, photometric=photometric, WindowCenter=100, WindowWidth=101
    )
    # PS3.3 C.11.2.1.2.1 with c=100, w=101: x <= 49.5 -> 0, x > 149.5 -> 1,
    # else (x - 99.5) / 100 + 0.5; MONOCHROME1 then inverts.
    expected = np.array([[0.0, 0.005, 0.505], [0.995, 1.0, 1.0]])
    if photometric == "MONOCHROME1":
        expected = 1.0 - expected
    np.testing.assert_allclose(read_image(path, salt=SALT).pixels, expected, atol=1e-6)


def test_window_applies_to_rescaled_values(make_raw_dicom) -> None:
    path = make_raw_dicom(
        "r.dcm",
        STORED,
        RescaleSlope=2,
        RescaleIntercept=-100,
        WindowCenter=100,
        WindowWidth=201,
    )
    # Modality values 2s - 100 = [-100, 0, 100, 198, 200, 410]; window c=100, w=201:
    # x <= -0.5 -> 0, x > 199.5 -> 1, else (x - 99.5) / 200 + 0.5.
    expected = np.array([[0.0, 0.0025, 0.5025], [0.9925, 1.0, 1.0]])
    np.testing.assert_allclose(read_image(path, salt=SALT).pixels, expected, atol=1e-6)


def test_without_window_the_full_stored_range_is_shown(make_raw_dicom) -> None:
    stored = np.array([[0, 1000], [2048, 4095]], dtype=np.uint16)
    path = make_raw_dicom("n.dcm", stored, bits_stored=12)
    expected = stored / 4095.0
    np.testing.assert_allclose(read_image(path, salt=SALT).pixels, expected, atol=1e-6)


def test_voi_lut_sequence_wins_over_window(make_raw_dicom) -> None:
    item = Dataset()
    item.LUTDescriptor = [256, 0, 8]
    item.add_new(0x00283006, "US", [255 - i for i in range(256)])  # LUT Data
    path = make_raw_dicom("lut.dcm", STORED, VOILUTSequence=[item], WindowCenter=10, WindowWidth=2)
    expected = (255.0 - STORED) / 255.0
    np.testing.assert_allclose(read_image(path, salt=SALT).pixels, expected, atol=1e-6)


def test_presentation_lut_shape_inverse_inverts_monochrome2(make_raw_dicom) -> None:
    path = make_raw_dicom("inv.dcm", STORED, PresentationLUTShape="INVERSE")
    expected = 1.0 - STORED / 255.0
    np.testing.assert_allclose(read_image(path, salt=SALT).pixels, expected, atol=1e-6)


def test_rgb_becomes_luminance(make_raw_dicom) -> None:
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (0, 255, 0)
    rgb[1, 0] = (0, 0, 255)
    rgb[1, 1] = (255, 255, 255)
    path = make_raw_dicom("rgb.dcm", rgb, photometric="RGB")
    expected = np.array([[0.299, 0.587], [0.114, 1.0]])
    np.testing.assert_allclose(read_image(path, salt=SALT).pixels, expected, atol=1e-6)


def test_multiframe_is_refused_with_its_frame_count(make_raw_dicom) -> None:
    frames = np.stack([STORED, 255 - STORED, STORED]).astype(np.uint8)
    path = make_raw_dicom("mf.dcm", frames)
    meta = read_header(path, salt=SALT)
    assert meta.number_of_frames == 3
    with pytest.raises(UnsupportedMultiFrameError) as at_the_door:
        check_acceptance(meta)
    with pytest.raises(UnsupportedMultiFrameError) as on_decode:
        read_image(path, salt=SALT)
    for info in (at_the_door, on_decode):
        assert info.value.status == "unsupported"
        assert "3 frames" in info.value.reason
        assert "single-frame radiographs" in info.value.reason


@pytest.mark.parametrize("frames", [None, 1])
def test_a_single_frame_is_read_whether_or_not_it_says_so(make_raw_dicom, frames) -> None:
    extra = {} if frames is None else {"NumberOfFrames": frames}
    path = make_raw_dicom("one.dcm", STORED, **extra)
    meta = read_header(path, salt=SALT)
    assert meta.number_of_frames == frames
    check_acceptance(meta)
    np.testing.assert_allclose(read_image(path, salt=SALT).pixels, STORED / 255.0, atol=1e-6)


@pytest.mark.parametrize(
    "name", ["emri_small.dcm", "emri_small_jpeg_2k_lossless.dcm", "color3d_jpeg_baseline.dcm"]
)
def test_multiframe_test_files_are_refused(name: str) -> None:
    frames = {"emri_small.dcm": 10, "emri_small_jpeg_2k_lossless.dcm": 10}.get(name, 120)
    with pytest.raises(UnsupportedMultiFrameError, match=f"with {frames} frames"):
        read_image(get_testdata_file(name), salt=SALT)


def test_preamble_less_dataset_is_read(tmp_path: Path, make_dicom) -> None:
    ds = pydicom.dcmread(make_dicom("src.dcm", bits_stored=8))
    del ds.file_meta
    ds.preamble = None
    bare = tmp_path / "bare"
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, implicit_vr=True, little_endian=True)
    bare.write_bytes(buffer.getvalue())
    assert bare.read_bytes()[128:132] != b"DICM"
    with bare.open("rb") as fh:
        assert is_dicom(fh)
    image = read_image(bare, salt=SALT)
    assert image.meta.format == "dicom"
    assert image.meta.transfer_syntax == "1.2.840.10008.1.2"
    np.testing.assert_allclose(image.pixels, read_image(tmp_path / "src.dcm", salt=SALT).pixels)


def test_phi_never_reaches_the_meta(make_dicom) -> None:
    path = make_dicom(patient_id="12345", patient_name="Doe^Jane")
    meta = read_header(path, salt=SALT)
    text = repr(meta) + repr(read_image(path, salt=SALT).meta)
    assert "12345" not in text
    assert "Doe" not in text and "Jane" not in text
    assert meta.patient_hash == hmac.new(b"test-salt", b"12345", hashlib.sha256).hexdigest()


def test_the_patient_hash_is_keyed_not_a_salted_digest(make_dicom) -> None:
    # sha256(salt + id) let a 7-digit MRN be recovered in seconds once the salt was known, and
    # one salt-prefix computation served every guess; HMAC needs the key for each one.
    path = make_dicom(patient_id="1234567")
    meta = read_header(path, salt=SALT)
    assert meta.patient_hash != hashlib.sha256(b"test-salt1234567").hexdigest()
    assert meta.patient_hash == hmac.new(b"test-salt", b"1234567", hashlib.sha256).hexdigest()


def test_no_pixel_data_names_the_sop_class(make_raw_dicom) -> None:
    path = make_raw_dicom("sr.dcm", None, sop_class="1.2.840.10008.5.1.4.1.1.88.11", Modality="SR")
    # told from the header already, so such an object is refused at registration
    for read in (read_header, read_image):
        with pytest.raises(NoPixelDataError, match="a structured report.*Basic Text SR") as info:
            read(path, salt=SALT)
        assert info.value.status == "unsupported"


@pytest.mark.parametrize("source", [RG3_UNCR, RG3_J2KR], ids=["native", "j2k"])
def test_truncated_file(tmp_path: Path, source: str) -> None:
    data = Path(source).read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(TruncatedFileError):
        read_image(cut, salt=SALT)


def test_damaged_j2k_codestream_is_corrupt(tmp_path: Path) -> None:
    data = bytearray(Path(RG3_J2KR).read_bytes())
    start = data.find(b"\xff\x4f\xff\x51")  # J2K SOC then SIZ marker
    assert start > 0
    data[start : start + 64] = bytes(64)
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError) as info:
        read_image(bad, salt=SALT)
    assert not isinstance(info.value, TruncatedFileError)


@pytest.mark.parametrize(
    ("uid", "name"),
    [
        ("1.2.840.10008.1.2.4.92", "JPEG 2000 Part 2 Multi-component"),
        ("1.2.3.4.5.6.7", "unknown transfer syntax"),
    ],
)
def test_unsupported_transfer_syntax_is_named(tmp_path: Path, edit_dicom, uid, name) -> None:
    path = tmp_path / "ts.dcm"
    path.write_bytes(Path(RG3_J2KR).read_bytes())

    def relabel(ds: Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = uid

    edit_dicom(path, relabel)
    with pytest.raises(UnsupportedTransferSyntaxError) as info:
        read_image(path, salt=SALT)
    assert name in info.value.reason and uid in info.value.reason
    assert info.value.status == "unsupported"


def test_huge_header_is_refused_before_any_allocation(make_dicom, edit_dicom) -> None:
    path = make_dicom(bits_stored=8)

    def inflate(ds: Dataset) -> None:
        ds.Rows = 60000
        ds.Columns = 60000

    edit_dicom(path, inflate)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        for read in (read_header, read_image):
            with pytest.raises(ImageTooLargeError, match="60000x60000 = 3600000000 pixels"):
                read(path, salt=SALT)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 5.0
    assert peak < 50_000_000  # a decode would need 3.6 GB


def test_a_damaged_value_representation_is_a_corrupt_file(make_dicom) -> None:
    # An unknown VR only surfaces when the element is read; it must still be an IngestError.
    path = make_dicom("vr.dcm", photometric="MONOCHROME2")
    data = path.read_bytes()
    tag = b"\x08\x00\x60\x00CS"  # (0008,0060) Modality, explicit VR
    assert tag in data
    path.write_bytes(data.replace(tag, b"\x08\x00\x60\x00XS"))
    with pytest.raises(CorruptFileError, match="cannot be parsed|inconsistent"):
        read_header(path, salt="s")
    with pytest.raises(CorruptFileError):
        read_image(path, salt="s")


def test_a_copy_cut_off_before_its_pixel_element_is_truncated(tmp_path: Path, make_dicom) -> None:
    data = make_dicom(bits_stored=8).read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: data.rfind(b"\xe0\x7f\x10\x00")])  # everything up to (7FE0,0010)
    assert read_header(cut, salt=SALT).rows == 36
    with pytest.raises(TruncatedFileError, match="ends before its pixel data"):
        read_image(cut, salt=SALT)


def test_an_image_object_cut_off_in_its_header_is_not_called_pixel_less(
    tmp_path: Path, make_dicom
) -> None:
    # Cut before Rows: what is left looks like a CR object without pixels, which CR never is.
    data = make_dicom(bits_stored=8).read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: data.find(b"\x28\x00\x02\x00")])  # before (0028,0002)
    with pytest.raises(CorruptFileError, match="Computed Radiography Image Storage") as info:
        read_image(cut, salt=SALT)
    assert info.value.status == "failed"


def test_a_damaged_transfer_syntax_uid_is_a_corrupt_file(tmp_path: Path, make_dicom) -> None:
    path = make_dicom(bits_stored=8)
    data = path.read_bytes()
    assert data.count(b"1.2.840.10008.1.2.1\x00") == 1
    path.write_bytes(data.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.8#0.10008.1.2.1\x00"))
    with pytest.raises(CorruptFileError, match="transfer syntax UID") as info:
        read_image(path, salt=SALT)
    assert not isinstance(info.value, UnsupportedTransferSyntaxError)
