"""Every transfer syntax a modality sends, decoded; compressed files match their uncompressed twins.

Twins come from pydicom's bundled files and pydicom-data where they exist (the same image stored
twice), and are otherwise made here: a codestream written by an encoder other than the decoder
under test, wrapped in a dataset, next to a native dataset of the same stored values.
"""

from __future__ import annotations

import io
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder, pixel_array
from pydicom.uid import (
    HTJ2K,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSNearLossless,
    generate_uid,
)

from bonewatch.ingest import UnsupportedTransferSyntaxError, read_header, read_image

MR_SMALL = get_testdata_file("MR_small.dcm")  # explicit VR little endian, 16-bit signed
MR_SMALL_IMPLICIT = get_testdata_file("MR_small_implicit.dcm")
MR_SMALL_BIG_ENDIAN = get_testdata_file("MR_small_bigendian.dcm")
MR_SMALL_RLE = get_testdata_file("MR_small_RLE.dcm")
MR_SMALL_J2KR = get_testdata_file("MR_small_jp2klossless.dcm")
MR_SMALL_JLS = get_testdata_file("MR_small_jpeg_ls_lossless.dcm")
IMAGE_DFL = get_testdata_file("image_dfl.dcm")  # deflated, 512x512 8-bit
SC_RGB = get_testdata_file("SC_rgb.dcm")
SC_RGB_RLE = get_testdata_file("SC_rgb_rle.dcm")
SC_RGB_JPEG_YBR = get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")  # baseline, YBR_FULL
SC_RGB_JPEG_RGB = get_testdata_file("SC_rgb_dcmtk_+eb+cr.dcm")  # baseline, RGB components
SC_RGB_JPEG_LOSSLESS = get_testdata_file("SC_rgb_jpeg_gdcm.dcm")  # lossless SV1, RGB
JPEG_EXTENDED = get_testdata_file("JPGExtended.dcm")  # 12-bit lossy, NM 1024x256
JPEG_LOSSLESS = get_testdata_file("JPEG-LL.dcm")  # the same NM image, 16-bit lossless SV1
JPEG_LOSSLESS_8BIT = get_testdata_file("JPGLosslessP14SV1_1s_1f_8b.dcm")
JPEG2000_LOSSY = get_testdata_file("JPEG2000.dcm")
JPEG2000_LOSSY_UNC = get_testdata_file("JPEG2000_UNC.dcm")  # the lossy file, decompressed
RG3_J2KI = get_testdata_file("RG3_J2KI.dcm")  # CR extremity, JPEG 2000 lossy
RG3_UNCI = get_testdata_file("RG3_UNCI.dcm")  # RG3_J2KI, decompressed
SALT = "s"


def _pixels(path: str | Path) -> np.ndarray:
    return read_image(path, salt=SALT).pixels


def _dataset(
    rows: int,
    columns: int,
    *,
    bits_stored: int,
    bits_allocated: int,
    samples: int = 1,
    photometric: str = "MONOCHROME2",
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = samples
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    return ds


def _write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _native_twin(array: np.ndarray, path: Path, *, bits_stored: int) -> Path:
    """A native (uncompressed) dataset holding exactly ``array``'s stored values."""
    bits_allocated = array.dtype.itemsize * 8
    samples = array.shape[2] if array.ndim == 3 else 1
    photometric = "RGB" if samples == 3 else "MONOCHROME2"
    ds = _dataset(
        array.shape[0],
        array.shape[1],
        bits_stored=bits_stored,
        bits_allocated=bits_allocated,
        samples=samples,
        photometric=photometric,
    )
    ds.PixelData = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
    ds["PixelData"].VR = "OB" if bits_allocated == 8 else "OW"
    return _write(ds, path)


def _encapsulated(
    codestream: bytes, tsyntax: UID, path: Path, *, shape: tuple[int, ...], bits_stored: int
) -> Path:
    """A dataset whose pixel data is one encapsulated frame, ``codestream``."""
    samples = shape[2] if len(shape) == 3 else 1
    ds = _dataset(
        shape[0],
        shape[1],
        bits_stored=bits_stored,
        bits_allocated=8 if bits_stored <= 8 else 16,
        samples=samples,
        photometric="RGB" if samples == 3 else "MONOCHROME2",
    )
    ds.file_meta.TransferSyntaxUID = tsyntax
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return _write(ds, path)


def _ramp(rows: int, columns: int, bits: int) -> np.ndarray:
    """Stored values that use the whole range, with detail along both axes."""
    y, x = np.mgrid[0:rows, 0:columns]
    values = (x * 97 + y * 31 + (x * y) % 13) % (2**bits)
    return values.astype(np.uint8 if bits <= 8 else np.uint16)


# --- native and lossless syntaxes: identical pixels -----------------------------------------------


@pytest.mark.parametrize(
    ("path", "tsyntax"),
    [
        (MR_SMALL_IMPLICIT, "1.2.840.10008.1.2"),
        (MR_SMALL_BIG_ENDIAN, "1.2.840.10008.1.2.2"),
        (MR_SMALL_RLE, "1.2.840.10008.1.2.5"),
        (MR_SMALL_J2KR, "1.2.840.10008.1.2.4.90"),
        (MR_SMALL_JLS, "1.2.840.10008.1.2.4.80"),
    ],
    ids=["implicit-le", "explicit-be", "rle", "j2k-lossless", "jpeg-ls-lossless"],
)
def test_lossless_encodings_of_one_image_decode_identically(path: str, tsyntax: str) -> None:
    reference = _pixels(MR_SMALL)
    assert read_header(MR_SMALL, salt=SALT).transfer_syntax == "1.2.840.10008.1.2.1"
    assert read_header(path, salt=SALT).transfer_syntax == tsyntax
    assert reference.std() > 0.05  # a real image, not a flat one that anything would match
    np.testing.assert_array_equal(_pixels(path), reference)


def test_deflated_dataset_decodes_like_its_inflated_twin(tmp_path: Path) -> None:
    ds = pydicom.dcmread(MR_SMALL)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflated = _write(ds, tmp_path / "deflated.dcm")
    assert len(deflated.read_bytes()) < len(Path(MR_SMALL).read_bytes())  # really compressed
    assert read_header(deflated, salt=SALT).transfer_syntax == "1.2.840.10008.1.2.1.99"
    np.testing.assert_array_equal(_pixels(deflated), _pixels(MR_SMALL))


def test_bundled_deflated_file_decodes() -> None:
    image = read_image(IMAGE_DFL, salt=SALT)
    assert image.meta.transfer_syntax == "1.2.840.10008.1.2.1.99"
    assert image.pixels.shape == (512, 512)
    assert image.pixels.std() > 0.05


@pytest.mark.parametrize(
    ("compressed", "native"),
    [
        (SC_RGB_RLE, SC_RGB),
        (get_testdata_file("OBXXXX1A_rle.dcm"), get_testdata_file("OBXXXX1A.dcm")),
        (get_testdata_file("SC_rgb_expb.dcm"), SC_RGB),
        (get_testdata_file("OBXXXX1A_expb.dcm"), get_testdata_file("OBXXXX1A.dcm")),
    ],
    ids=["rle-rgb", "rle-palette", "big-endian-rgb", "big-endian-palette"],
)
def test_colour_images_in_other_encodings_match(compressed: str, native: str) -> None:
    np.testing.assert_array_equal(_pixels(compressed), _pixels(native))


# --- JPEG 2000 and HTJ2K --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lossy", "decompressed"),
    [(RG3_J2KI, RG3_UNCI), (JPEG2000_LOSSY, JPEG2000_LOSSY_UNC)],
    ids=["rg3-cr", "nm"],
)
def test_lossy_jpeg2000_matches_its_decompressed_twin(lossy: str, decompressed: str) -> None:
    assert read_header(lossy, salt=SALT).transfer_syntax == "1.2.840.10008.1.2.4.91"
    np.testing.assert_array_equal(_pixels(lossy), _pixels(decompressed))


def test_htj2k_is_decoded_where_a_plugin_supports_it(tmp_path: Path) -> None:
    stored = _ramp(48, 80, 12)
    # OpenJPH (in imagecodecs) writes the codestreams; pylibjpeg-openjpeg decodes them.
    lossless = imagecodecs.htj2k_encode(stored)
    irreversible = imagecodecs.htj2k_encode(stored, reversible=False)
    assert lossless[:4] == irreversible[:4] == b"\xff\x4f\xff\x51"  # raw codestreams: SOC, SIZ
    twin = _pixels(_native_twin(stored, tmp_path / "native.dcm", bits_stored=12))
    for tsyntax, codestream, tolerance in (
        (HTJ2KLossless, lossless, 0.0),
        (HTJ2K, lossless, 0.0),  # the lossy syntax may carry a reversible stream
        (HTJ2K, irreversible, 2 / 4095),  # the 9/7 wavelet: off by a level or two at most
    ):
        path = _encapsulated(
            codestream, tsyntax, tmp_path / "htj2k.dcm", shape=stored.shape, bits_stored=12
        )
        assert read_header(path, salt=SALT).transfer_syntax == str(tsyntax)
        np.testing.assert_allclose(_pixels(path), twin, rtol=0, atol=tolerance + 1e-7)


# --- JPEG: baseline, extended, lossless -----------------------------------------------------------


@pytest.mark.parametrize("source", [SC_RGB_JPEG_YBR, SC_RGB_JPEG_RGB], ids=["ybr", "rgb"])
def test_jpeg_baseline_colour_matches_the_uncompressed_image(source: str) -> None:
    assert read_header(source, salt=SALT).transfer_syntax == str(JPEGBaseline8Bit)
    # Lossy: the grey of each pixel lands within a few levels of the original's.
    assert np.abs(_pixels(source) - _pixels(SC_RGB)).max() < 6 / 255


def test_jpeg_baseline_grey_written_by_pillow(tmp_path: Path) -> None:
    smooth = (np.mgrid[0:40, 0:64][1] * 4).astype(np.uint8)  # JPEG keeps smooth ramps closely
    buffer = io.BytesIO()
    Image.fromarray(smooth).save(buffer, format="JPEG", quality=95)
    path = _encapsulated(
        buffer.getvalue(), JPEGBaseline8Bit, tmp_path / "b.dcm", shape=smooth.shape, bits_stored=8
    )
    assert np.abs(_pixels(path) - smooth / 255.0).max() < 3 / 255


def test_jpeg_extended_12_bit_matches_the_lossless_copy_of_the_same_image() -> None:
    assert read_header(JPEG_EXTENDED, salt=SALT).transfer_syntax == str(JPEGExtended12Bit)
    assert read_header(JPEG_LOSSLESS, salt=SALT).transfer_syntax == str(JPEGLosslessSV1)
    # Neither file has a window, so the grey value is the stored value over the stored range
    # (PS3.3 C.11.2.1.2): 12-bit unsigned here, 16-bit signed in the lossless copy.
    lossy = np.round(_pixels(JPEG_EXTENDED).astype(np.float64) * 4095)
    lossless = np.round(_pixels(JPEG_LOSSLESS).astype(np.float64) * 65535 - 32768)
    assert lossless.max() > 200  # the image's real range, ~0..278
    assert np.abs(lossy - lossless).mean() < 3
    assert np.corrcoef(lossy.ravel(), lossless.ravel())[0, 1] > 0.98


@pytest.mark.parametrize("bits", [8, 12])
def test_jpeg_extended_made_here_decodes_close_to_its_source(tmp_path: Path, bits: int) -> None:
    smooth = np.mgrid[0:32, 0:48][1] * ((2**bits - 1) // 47)
    stored = smooth.astype(np.uint8 if bits == 8 else np.uint16)
    codestream = imagecodecs.jpeg8_encode(stored, level=95, bitspersample=bits)
    path = _encapsulated(
        codestream, JPEGExtended12Bit, tmp_path / "x.dcm", shape=stored.shape, bits_stored=bits
    )
    assert np.abs(_pixels(path) - stored / (2**bits - 1)).max() < 0.01


@pytest.mark.parametrize("source", [JPEG_LOSSLESS, JPEG_LOSSLESS_8BIT], ids=["16-bit", "8-bit"])
def test_jpeg_lossless_matches_gdcm(tmp_path: Path, source: str) -> None:
    # GDCM is an independent decoder of the same codestream; its stored values, written natively
    # with the same header, must give the very same grey image.
    ds = pydicom.dcmread(source)
    stored = pixel_array(ds, decoding_plugin="gdcm")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = stored.astype(stored.dtype.newbyteorder("<")).tobytes()
    ds["PixelData"].VR = "OB" if stored.dtype.itemsize == 1 else "OW"
    twin = _write(ds, tmp_path / "native.dcm")
    np.testing.assert_array_equal(_pixels(source), _pixels(twin))


def test_jpeg_lossless_colour_matches_the_uncompressed_image() -> None:
    assert read_header(SC_RGB_JPEG_LOSSLESS, salt=SALT).transfer_syntax == str(JPEGLosslessSV1)
    np.testing.assert_array_equal(_pixels(SC_RGB_JPEG_LOSSLESS), _pixels(SC_RGB))


@pytest.mark.parametrize(("tsyntax", "predictor"), [(JPEGLossless, 7), (JPEGLosslessSV1, 1)])
def test_jpeg_lossless_12_bit_is_exact(tmp_path: Path, tsyntax: UID, predictor: int) -> None:
    stored = _ramp(30, 44, 12)
    codestream = imagecodecs.jpeg8_encode(
        stored, lossless=True, predictor=predictor, bitspersample=12
    )
    path = _encapsulated(
        codestream, tsyntax, tmp_path / "ll.dcm", shape=stored.shape, bits_stored=12
    )
    twin = _native_twin(stored, tmp_path / "native.dcm", bits_stored=12)
    np.testing.assert_array_equal(_pixels(path), _pixels(twin))


def test_jpeg_lossless_does_not_need_gdcm(monkeypatch: pytest.MonkeyPatch) -> None:
    # GDCM can abort the whole process on some damaged streams, so it must not be the decoder
    # that lossless JPEG relies on.
    decoder = get_decoder(JPEGLosslessSV1)
    without = {k: v for k, v in decoder._available.items() if k != "gdcm"}
    monkeypatch.setattr(decoder, "_available", without)
    np.testing.assert_array_equal(_pixels(SC_RGB_JPEG_LOSSLESS), _pixels(SC_RGB))


# --- JPEG-LS --------------------------------------------------------------------------------------


def test_jpeg_ls_near_lossless_stays_within_its_error_bound(tmp_path: Path) -> None:
    ds = pydicom.dcmread(MR_SMALL)
    stored = ds.pixel_array
    ds.compress(JPEGLSNearLossless, stored, jls_error=3)
    path = _write(ds, tmp_path / "near.dcm")
    assert read_header(path, salt=SALT).transfer_syntax == str(JPEGLSNearLossless)
    # MR_small's window (c=600, w=1600, LINEAR) has a slope of 1 / (w - 1) per stored level
    # (PS3.3 C.11.2.1.2.1), so an error of at most 3 levels moves grey by at most 3 / 1599.
    difference = np.abs(_pixels(path).astype(np.float64) - _pixels(MR_SMALL))
    assert 0 < difference.max() <= 3 / 1599 + 1e-6


# --- no decoder -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "tsyntax", "remove", "name"),
    [
        (MR_SMALL_J2KR, None, ("pylibjpeg", "pillow", "gdcm"), "JPEG 2000 Image Compression"),
        (JPEG_LOSSLESS, None, ("imagecodecs", "gdcm"), "JPEG Lossless"),
        (None, HTJ2KLossless, ("pylibjpeg",), "High-Throughput JPEG 2000"),
    ],
    ids=["j2k", "jpeg-lossless", "htj2k"],
)
def test_a_syntax_without_an_installed_decoder_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    source: str | None,
    tsyntax: UID | None,
    remove: tuple[str, ...],
    name: str,
) -> None:
    if source is None:
        stored = _ramp(16, 16, 12)
        codestream = imagecodecs.htj2k_encode(stored)
        assert tsyntax is not None
        source = str(
            _encapsulated(codestream, tsyntax, tmp_path / "h.dcm", shape=(16, 16), bits_stored=12)
        )
    uid = UID(read_header(source, salt=SALT).transfer_syntax or "")
    decoder = get_decoder(uid)
    monkeypatch.setattr(
        decoder, "_available", {k: v for k, v in decoder._available.items() if k not in remove}
    )
    assert not decoder.is_available
    with pytest.raises(UnsupportedTransferSyntaxError) as info:
        read_image(source, salt=SALT)
    assert info.value.status == "unsupported"
    assert name in info.value.reason and str(uid) in info.value.reason
