"""PNG and JPEG files: header size and decoding to grey, through Pillow; reducing big images."""

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
    without_values,
)

logger = logging.getLogger(__name__)

# ITU-R BT.601 luma weights, the same ones Pillow's convert("L") uses.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)

_PILLOW_FORMAT = {"png": "PNG", "jpeg": "JPEG"}
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_COLOUR_MODES = ("RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV")

# The longest side a decoded image keeps. Radiographs (up to 43 cm at 100 um) are within it and
# decode pixel for pixel; a bigger image is averaged down while it is decoded, so a 10,000 px
# square never exists as float32 (400 MB) when the models look at 224-512 px.
MAX_DECODED_SIDE = 4096
# Pixels converted or averaged at a time when reducing: bounds the float64 intermediates.
_STRIP_PIXELS = 1 << 22


def reduction_factor(height: int, width: int, max_side: int | None) -> int:
    """The smallest whole factor that brings both sides within ``max_side`` (1: none needed)."""
    if max_side is None or max(height, width) <= max_side:
        return 1
    return -(-max(height, width) // max_side)


def reduce_blocks(values: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor`` x ``factor`` blocks of an (H, W) or (H, W, C) array.

    Blocks at the right and bottom edges average the pixels they have, as Pillow's
    ``Image.reduce`` does. Integer input comes back rounded in its own dtype (stored values stay
    stored values, for LUTs), float input as float32. Works in strips of rows, so the only
    full-size array is the input.
    """
    if factor <= 1:
        return values
    height, width = values.shape[:2]
    starts_y, starts_x = np.arange(0, height, factor), np.arange(0, width, factor)
    counts = (np.minimum(starts_y + factor, height) - starts_y)[:, None] * (
        np.minimum(starts_x + factor, width) - starts_x
    )[None, :]
    if values.ndim == 3:
        counts = counts[..., None]
    integer = values.dtype.kind in "iu"
    out = np.empty(
        (len(starts_y), len(starts_x), *values.shape[2:]), values.dtype if integer else np.float32
    )
    accumulator = np.int64 if integer else np.float64
    blocks_per_strip = max(1, _STRIP_PIXELS // (width * factor))
    for first in range(0, len(starts_y), blocks_per_strip):
        last = min(len(starts_y), first + blocks_per_strip)
        strip = values[starts_y[first] : min(height, starts_y[last - 1] + factor)]
        sums = np.add.reduceat(
            strip, starts_y[first:last] - starts_y[first], axis=0, dtype=accumulator
        )
        means = np.add.reduceat(sums, starts_x, axis=1) / counts[first:last]
        out[first:last] = np.rint(means) if integer else means
    return out


def downscale(pixels: np.ndarray, max_side: int) -> np.ndarray:
    """``pixels`` averaged down by the smallest whole factor that fits ``max_side``."""
    height, width = pixels.shape[:2]
    return reduce_blocks(pixels, reduction_factor(height, width, max_side))


def luminance(rgb: np.ndarray, max_value: float) -> np.ndarray:
    """Grey float64 in [0, 1] from an (..., 3) colour array whose channels reach ``max_value``."""
    grey = rgb[..., :3].astype(np.float64) @ _LUMA
    return np.clip(grey / max_value, 0.0, 1.0)


def _pillow_error(exc: Exception, fmt: str) -> IngestError:
    """Turn what Pillow raises on bad bytes into the ingest error that says what happened."""
    label = fmt.upper()
    message = without_values(str(exc))
    if isinstance(exc, Image.DecompressionBombError):
        return ImageTooLargeError(f"{label} image is too large to decode safely: {message}")
    if isinstance(exc, ValueError) and "too large" in message:
        # Pillow's cap on decompressed text/ICC chunks: a compressed-chunk bomb.
        return ImageTooLargeError(
            f"{label} metadata chunk decompresses past Pillow's limit: {message}"
        )
    if isinstance(exc, EOFError) or "truncated" in message.lower():
        return TruncatedFileError(f"{label} file ends before its image data is complete: {message}")
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


def decode_raster(data: bytes, fmt: str, *, max_side: int | None = None) -> np.ndarray:
    """Decode PNG or JPEG bytes to grey float32 (H, W) in [0, 1].

    Grey 8/16-bit, RGB(A), palette and grey+alpha images become grey; alpha is dropped (x-ray
    exports carry opaque alpha). 16-bit grey divides by 65535. EXIF orientation is applied so
    the pixels are in display orientation.

    Args:
        data: The whole file.
        fmt: ``"png"`` or ``"jpeg"``, as sniffed.
        max_side: A longer image is reduced by a whole factor while decoding: a JPEG decodes at
            1/2, 1/4 or 1/8 scale where that is enough (``draft``), and the rest is turned grey
            and averaged block by block a strip of rows at a time, so no float array of the full
            size ever exists. None, or an image within it, decodes pixel for pixel.

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
            width, height = im.size
            factor = reduction_factor(height, width, max_side)
            if factor > 1 and fmt == "jpeg":
                # The decoder scales by 1/2, 1/4 or 1/8 to no less than the size asked for.
                im.draft(None, (-(-width // factor), -(-height // factor)))
            im.load()
            ImageOps.exif_transpose(im, in_place=True)  # in place: no copy of an upright image
            factor = reduction_factor(im.height, im.width, max_side)
            if factor == 1:
                return _to_grey(im).astype(np.float32)
            return _reduced_grey(im, factor)
    except IngestError:
        raise
    except _BAD_BYTES as exc:
        raise _pillow_error(exc, fmt) from exc


def _reduced_grey(im: Image.Image, factor: int) -> np.ndarray:
    """Grey float32 of ``im`` averaged over ``factor`` x ``factor`` blocks, a strip at a time."""
    width, height = im.size
    out = np.empty((-(-height // factor), -(-width // factor)), np.float32)
    rows = factor * max(1, _STRIP_PIXELS // (width * factor))
    for top in range(0, height, rows):
        strip = im.crop((0, top, width, min(height, top + rows)))
        out[top // factor : top // factor + -(-strip.height // factor)] = reduce_blocks(
            _to_grey(strip), factor
        )
    return out


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
