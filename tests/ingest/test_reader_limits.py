"""Size limits: checked from the file size and the header, before anything large is allocated."""

from __future__ import annotations

import struct
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from bonewatch.ingest import (
    ImageTooLargeError,
    IngestError,
    TruncatedFileError,
    read_header,
    read_image,
)

SALT = "s"
READERS = (read_header, read_image)


@pytest.fixture
def small_and_fast() -> Iterator[Callable[[], tuple[int, float]]]:
    """Trace allocations and time from here on; calling the fixture's value reports both."""
    tracemalloc.start()
    started = time.perf_counter()

    def report() -> tuple[int, float]:
        return tracemalloc.get_traced_memory()[1], time.perf_counter() - started

    try:
        yield report
    finally:
        tracemalloc.stop()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _png(width: int, height: int, idat: bytes, extra: bytes = b"") -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + extra
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def test_a_2_gb_file_is_refused_from_its_size_alone(tmp_path: Path, small_and_fast) -> None:
    path = tmp_path / "huge.dcm"
    with open(path, "wb") as fh:
        fh.truncate(2**31)  # sparse: 2 GiB claimed, nothing written
    for read in READERS:
        with pytest.raises(ImageTooLargeError, match="2147483648 bytes, over the limit"):
            read(path, salt=SALT)
    peak, seconds = small_and_fast()
    assert peak < 1_000_000 and seconds < 1.0


def test_a_pixel_element_claiming_2_gb_is_a_truncated_file(
    tmp_path: Path, make_dicom, small_and_fast
) -> None:
    path = make_dicom("claim.dcm", bits_stored=8)
    data = bytearray(path.read_bytes())
    tag = data.rfind(b"\xe0\x7f\x10\x00OB\x00\x00")  # (7FE0,0010) OB, explicit VR
    assert tag > 0
    data[tag + 8 : tag + 12] = struct.pack("<I", 0x7FFFFFF0)
    path.write_bytes(bytes(data))
    with pytest.raises(TruncatedFileError, match="declares 2147483632 bytes but the file holds"):
        read_image(path, salt=SALT)
    peak, seconds = small_and_fast()
    assert peak < 10_000_000 and seconds < 1.0


def test_the_pixel_limit_is_configurable(make_dicom) -> None:
    path = make_dicom(pixels=np.zeros((40, 50)))
    for read in READERS:
        with pytest.raises(ImageTooLargeError, match="40x50 = 2000 pixels, over the limit of 1999"):
            read(path, salt=SALT, max_pixels=1999)
    assert read_image(path, salt=SALT, max_pixels=2000).pixels.shape == (40, 50)


def test_a_png_deflate_bomb_is_refused_without_inflating(tmp_path: Path, small_and_fast) -> None:
    # 12000 x 12000 black pixels: 144 MB once inflated, about 140 kB on disk.
    side = 12000
    compressor = zlib.compressobj(9)
    rows = b"\x00" * (side + 1) * 1000  # a filter byte per row, then the pixels
    idat = b"".join(compressor.compress(rows) for _ in range(side // 1000)) + compressor.flush()
    path = tmp_path / "bomb.png"
    path.write_bytes(_png(side, side, idat))
    assert path.stat().st_size < 1_000_000
    del rows, idat
    tracemalloc.reset_peak()
    for read in READERS:
        with pytest.raises(ImageTooLargeError, match="12000x12000 = 144000000 pixels"):
            read(path, salt=SALT)
    peak, _ = small_and_fast()
    assert peak < 5_000_000


@pytest.mark.parametrize("kind", [b"zTXt", b"iCCP", b"iTXt"])
def test_compressed_metadata_bombs_in_png_are_refused(tmp_path: Path, kind: bytes) -> None:
    flood = zlib.compress(bytes(16 << 20))  # 16 MB of zeros in ~16 kB
    payload = {
        b"zTXt": b"k\x00\x00" + flood,
        b"iCCP": b"icc\x00\x00" + flood,
        b"iTXt": b"k\x00\x01\x00\x00\x00" + flood,
    }[kind]
    idat = zlib.compress(b"\x00" + bytes(4))
    path = tmp_path / "meta-bomb.png"
    path.write_bytes(_png(4, 1, idat, extra=_png_chunk(kind, payload)))
    with pytest.raises(IngestError) as info:
        read_image(path, salt=SALT)
    assert isinstance(info.value, ImageTooLargeError)
