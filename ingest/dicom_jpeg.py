"""A pydicom pixel decoder plugin for 12-bit JPEG Extended and JPEG Lossless, via imagecodecs.

pydicom's Pillow plugin decodes only 8-bit JPEG, and its GDCM plugin refuses 12-bit JPEG
Extended; libjpeg-turbo 3 (inside imagecodecs) decodes 8- and 12-bit lossy JPEG and lossless
JPEG of 2 to 16 bits. ``ingest.dicom`` registers this module with pydicom's decoders; nothing
else imports it. Decoded frames come back raw: no colour conversion, so pydicom's own YBR
handling stays in charge, exactly as with its built-in plugins.
"""

from __future__ import annotations

import struct
from typing import Any

# The transfer syntaxes this plugin decodes, with what it needs (pydicom's plugin contract).
DECODER_DEPENDENCIES: dict[str, tuple[str, ...]] = {
    "1.2.840.10008.1.2.4.51": ("imagecodecs>=2024.1.1",),  # JPEG Extended (Process 2 and 4)
    "1.2.840.10008.1.2.4.57": ("imagecodecs>=2024.1.1",),  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70": ("imagecodecs>=2024.1.1",),  # JPEG Lossless, SV1
}

# Start-of-frame markers (SOF0..SOF15 less DHT, JPG and DAC, which share the range).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers that stand alone, without a length field.
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})


def is_available(uid: str) -> bool:
    """Tell pydicom whether this plugin can decode ``uid`` here."""
    if uid not in DECODER_DEPENDENCIES:
        return False
    try:
        import imagecodecs
    except ImportError:
        return False
    return bool(getattr(imagecodecs, "JPEG8", None) and imagecodecs.JPEG8.available)


def frame_size(src: bytes) -> tuple[int, int, int]:
    """Read (rows, columns, precision) from a JPEG codestream's start-of-frame segment.

    Raises:
        ValueError: No start-of-frame segment before the first scan, or a damaged segment.
    """
    if src[:2] != b"\xff\xd8":
        raise ValueError("the JPEG frame does not start with an SOI marker")
    pos = 2
    while pos + 4 <= len(src):
        if src[pos] != 0xFF:
            raise ValueError(f"expected a JPEG marker at byte {pos}")
        marker = src[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        (length,) = struct.unpack(">H", src[pos + 2 : pos + 4])
        if marker in _SOF_MARKERS:
            if length < 8 or pos + 9 > len(src):
                raise ValueError("the JPEG start-of-frame segment is cut short")
            precision = src[pos + 4]
            rows, columns = struct.unpack(">HH", src[pos + 5 : pos + 9])
            return rows, columns, precision
        if marker == 0xDA:  # start of scan before any frame header
            break
        pos += 2 + length
    raise ValueError("the JPEG frame has no start-of-frame segment")


def _decode_frame(src: bytes, runner: Any) -> bytearray:
    """Decode one JPEG frame for pydicom; the size is checked before libjpeg allocates."""
    import imagecodecs

    rows, columns, precision = frame_size(src)
    if (rows, columns) != (runner.rows, runner.columns):
        # The codestream's own size decides the allocation: a 60000x60000 frame inside a
        # small dataset must not reach the decoder.
        raise ValueError(
            f"the JPEG frame is {rows}x{columns} but the dataset says "
            f"{runner.rows}x{runner.columns}"
        )
    # Item padding (a 0x00) or fill bytes (0xFF) may follow the EOI marker.
    if not src.rstrip(b"\x00\xff").endswith(b"\xff\xd9"):
        # libjpeg fills a scan that stops early with grey and only warns; a radiograph half
        # made of filler must not reach the model.
        raise ValueError("the JPEG frame ends without its EOI marker: the image data is cut short")
    # Same colour space in and out: libjpeg returns the stored components unconverted.
    colour = "RGB" if runner.samples_per_pixel == 3 else None
    try:
        array = imagecodecs.jpeg8_decode(src, colorspace=colour, outcolorspace=colour)
    except imagecodecs.Jpeg8Error as exc:
        raise ValueError(f"libjpeg-turbo: {exc}") from exc
    # The pixel container follows the codestream's precision, as pydicom's own plugins do.
    runner.set_option("bits_allocated", 8 if precision <= 8 else 16)
    runner.set_option("planar_configuration", 0)
    return bytearray(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
