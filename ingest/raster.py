"""PNG and JPEG files: header size and decoding to grey, through Pillow."""

from __future__ import annotations

import io
import logging
import struct
import zlib
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from bonewatch.ingest.errors import (
    CorruptFileError,
    ImageTooLargeError,
    IngestError,
    TruncatedFileError,
    UnsupportedPixelFormatError,
)

logger = logging.getLogger(__name__)

# ITU-R BT.601 luma weights, the same ones Pillow's convert("L") uses.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)

_PILLOW_FORMAT = {"png": "PNG", "jpeg": "JPEG"}
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_COLOUR_MODES = ("RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV")


def luminance(rgb: np.ndarray, max_value: float) -> np.ndarray:
    """Grey float64 in [0, 1] from an (..., 3) colour array whose channels reach ``max_value``."""
    grey = rgb[..., :3].astype(np.float64) @ _LUMA
    return np.clip(grey / max_value, 0.0, 1.0)


def _pillow_error(exc: Exception, fmt: str) -> IngestError:
    """Turn what Pillow raises on bad bytes into the ingest error that says what happened."""
    label = fmt.upper()
    if isinstance(exc, Image.DecompressionBombError):
        return ImageTooLargeError(f"{label} image is too large to decode safely: {exc}")
    message = str(exc)
    if isinstance(exc, ValueError) and "too large" in message:
        # Pillow's cap on decompressed text/ICC chunks: a compressed-chunk bomb.
        return ImageTooLargeError(f"{label} metadata chunk decompresses past Pillow's limit: {exc}")
    if isinstance(exc, EOFError) or "truncated" in message.lower():
        return TruncatedFileError(f"{label} file ends before its image data is complete: {exc}")
    if isinstance(exc, UnidentifiedImageError):
        return CorruptFileError(f"{label} header is damaged and cannot be parsed")
    return CorruptFileError(f"{label} data is damaged: {message or type(exc).__name__}")


# What Pillow and its codecs raise on malformed input. OSError covers "broken data stream" and
# "image file is truncated"; callers hand in in-memory or guarded streams, so an OSError here
# never comes from the disk.
_BAD_BYTES = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    TypeError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)


def read_raster_size(fp: BinaryIO, fmt: str) -> tuple[int, int]:
    """Read (rows, columns) from a PNG or JPEG header without decoding pixels.

    Args:
        fp: Seekable binary stream positioned anywhere; read from its start.
        fmt: ``"png"`` or ``"jpeg"``, as sniffed.

    Returns:
        The image height and width.

    Raises:
        CorruptFileError, TruncatedFileError, ImageTooLargeError: The header is unusable.
    """
    fp.seek(0)
    try:
        with Image.open(fp, formats=[_PILLOW_FORMAT[fmt]]) as im:
            width, height = im.size
    except _BAD_BYTES as exc:
        raise _pillow_error(exc, fmt) from exc
    return height, width


def decode_raster(data: bytes, fmt: str) -> np.ndarray:
    """Decode PNG or JPEG bytes to grey float32 (H, W) in [0, 1].

    Grey 8/16-bit, RGB(A), palette and grey+alpha images become grey; alpha is dropped (x-ray
    exports carry opaque alpha). 16-bit grey divides by 65535. EXIF orientation is applied so
    the pixels are in display orientation.

    Args:
        data: The whole file.
        fmt: ``"png"`` or ``"jpeg"``, as sniffed.

    Raises:
        CorruptFileError, TruncatedFileError, ImageTooLargeError, UnsupportedPixelFormatError.
    """
    formats = [_PILLOW_FORMAT[fmt]]
    try:
        if fmt == "png":
            # Loading a PNG skips the chunk CRCs; verify() checks them all without inflating IDAT.
            with Image.open(io.BytesIO(data), formats=formats) as probe:
                probe.verify()
        with Image.open(io.BytesIO(data), formats=formats) as im:
            im.load()
            oriented = ImageOps.exif_transpose(im)
            grey = _to_grey(oriented)
    except IngestError:
        raise
    except _BAD_BYTES as exc:
        raise _pillow_error(exc, fmt) from exc
    return grey.astype(np.float32)


def _to_grey(im: Image.Image) -> np.ndarray:
    """Grey float64 in [0, 1] from any Pillow mode a PNG or JPEG decodes to."""
    mode = im.mode
    if mode in _SIXTEEN_BIT_MODES:
        return np.asarray(im).astype(np.float64) / 65535.0
    if mode == "I":
        # Older Pillow opens 16-bit grey PNGs as 32-bit "I"; the values are still 16-bit.
        return np.clip(np.asarray(im).astype(np.float64) / 65535.0, 0.0, 1.0)
    if mode == "1":
        return np.asarray(im).astype(np.float64)
    if mode == "L":
        return np.asarray(im).astype(np.float64) / 255.0
    if mode in ("LA", "La"):
        return np.asarray(im.getchannel("L")).astype(np.float64) / 255.0
    if mode in ("P", "PA"):
        return luminance(np.asarray(im.convert("RGB")), 255.0)
    if mode in _COLOUR_MODES:
        return luminance(np.asarray(im.convert("RGB")), 255.0)
    raise UnsupportedPixelFormatError(f"pixel mode {mode} cannot be turned into grey")
