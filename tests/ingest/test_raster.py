"""PNG and JPEG decoding to grey, and damaged raster files."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bonewatch.ingest import (
    CorruptFileError,
    ImageTooLargeError,
    TruncatedFileError,
    read_header,
    read_image,
)

SALT = "s"
GREY8 = np.array([[0, 64, 128], [191, 254, 255]], dtype=np.uint8)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _save(tmp_path: Path, name: str, image: Image.Image, **options) -> Path:
    path = tmp_path / name
    image.save(path, **options)
    return path


def test_8bit_grey_divides_by_255(tmp_path: Path) -> None:
    path = _save(tmp_path, "g.png", Image.fromarray(GREY8))
    image = read_image(path, salt=SALT)
    assert image.meta.format == "png" and (image.meta.rows, image.meta.columns) == (2, 3)
    assert image.pixels.dtype == np.float32
    np.testing.assert_allclose(image.pixels, GREY8 / 255.0, atol=1e-7)


def test_16bit_grey_divides_by_65535(tmp_path: Path) -> None:
    values = np.array([[0, 1, 32768], [40000, 65534, 65535]], dtype=np.uint16)
    path = _save(tmp_path, "g16.png", Image.fromarray(values))
    np.testing.assert_allclose(read_image(path, salt=SALT).pixels, values / 65535.0, atol=1e-7)


def test_rgb_rgba_palette_and_la_become_luminance(tmp_path: Path) -> None:
    rgb = np.zeros((1, 4, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (0, 255, 0)
    rgb[0, 2] = (0, 0, 255)
    rgb[0, 3] = (255, 255, 255)
    expected = np.array([[0.299, 0.587, 0.114, 1.0]])
    rgb_image = Image.fromarray(rgb)
    rgba_image = rgb_image.copy()
    rgba_image.putalpha(128)  # alpha is dropped, not blended
    paths = [
        _save(tmp_path, "rgb.png", rgb_image),
        _save(tmp_path, "rgba.png", rgba_image),
        _save(tmp_path, "p.png", rgb_image.quantize(colors=4, method=Image.Quantize.MAXCOVERAGE)),
    ]
    for path in paths:
        np.testing.assert_allclose(read_image(path, salt=SALT).pixels, expected, atol=2.5e-3)
    la = Image.merge("LA", [Image.fromarray(GREY8), Image.new("L", (3, 2), 7)])
    la_path = _save(tmp_path, "la.png", la)
    np.testing.assert_allclose(read_image(la_path, salt=SALT).pixels, GREY8 / 255.0, atol=1e-7)


def test_jpeg_grey_and_rgb(tmp_path: Path) -> None:
    flat = np.full((16, 16), 200, dtype=np.uint8)
    grey = read_image(_save(tmp_path, "g.jpg", Image.fromarray(flat), quality=95), salt=SALT)
    assert grey.meta.format == "jpeg"
    np.testing.assert_allclose(grey.pixels, 200 / 255.0, atol=2 / 255.0)
    red = Image.new("RGB", (16, 16), (255, 0, 0))
    colour = read_image(_save(tmp_path, "r.jpg", red, quality=95), salt=SALT)
    np.testing.assert_allclose(colour.pixels, 0.299, atol=3 / 255.0)


def test_jpeg_exif_orientation_is_applied(tmp_path: Path) -> None:
    wide = np.zeros((8, 16), dtype=np.uint8)
    wide[:, :8] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    path = _save(tmp_path, "o.jpg", Image.fromarray(wide), exif=exif, quality=95)
    pixels = read_image(path, salt=SALT).pixels
    assert pixels.shape == (16, 8)
    assert pixels[:8].mean() > 0.9 and pixels[8:].mean() < 0.1


def test_bad_crc_is_corrupt(tmp_path: Path, make_png) -> None:
    data = bytearray(make_png().read_bytes())
    idat = data.find(b"IDAT")
    length = struct.unpack(">I", data[idat - 4 : idat])[0]
    data[idat + 4 + length] ^= 0xFF  # first byte of the IDAT CRC
    bad = tmp_path / "crc.png"
    bad.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="checksum"):
        read_image(bad, salt=SALT)


def test_bad_header_crc_is_corrupt(tmp_path: Path, make_png) -> None:
    data = bytearray(make_png().read_bytes())
    data[29] ^= 0xFF  # IHDR CRC
    bad = tmp_path / "ihdr.png"
    bad.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError):
        read_header(bad, salt=SALT)


def test_truncated_png(tmp_path: Path, make_png) -> None:
    data = make_png(pixels=np.random.default_rng(1).random((64, 64))).read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(TruncatedFileError):
        read_image(cut, salt=SALT)


def test_compressed_text_bomb_is_too_large(tmp_path: Path, make_png) -> None:
    data = make_png().read_bytes()
    bomb = _png_chunk(b"zTXt", b"k\x00\x00" + zlib.compress(bytes(4 << 20)))
    path = tmp_path / "bomb.png"
    path.write_bytes(data[:33] + bomb + data[33:])  # right after IHDR
    with pytest.raises(ImageTooLargeError):
        read_image(path, salt=SALT)


@pytest.mark.parametrize(("side", "limit"), [(60000, 100_000_000), (400, 1000)])
def test_png_pixel_limit_from_the_header(tmp_path: Path, make_png, side: int, limit: int) -> None:
    data = bytearray(make_png().read_bytes())
    data[16:24] = struct.pack(">II", side, side)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path = tmp_path / "big.png"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageTooLargeError):
        read_header(path, salt=SALT, max_pixels=limit)
    with pytest.raises(ImageTooLargeError):
        read_image(path, salt=SALT, max_pixels=limit)
