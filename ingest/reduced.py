"""Decoding only the resolution a model needs: JPEG 2000 resolution levels and JPEG DCT scaling.

A model at 224-320 px never sees a 2,000 px radiograph's full resolution. JPEG 2000 codestreams
hold their image at every power-of-two scale (wavelet resolution levels), and a baseline JPEG
decoder can scale its inverse DCT by 1/2, 1/4 or 1/8; either skips most of the decoding work.
:func:`reduction_for` picks the smallest such scale whose long side still covers ``min_side``
(the largest input size the bundle's models declare), so the preprocessing downsizes from at
least that many pixels, as it would from the full image.

Everything here returns None where it does not apply or fails (another syntax, a 12-bit JPEG
Pillow cannot scale, a codestream that refuses the reduction): the caller then decodes in full,
and the first failure of each kind is logged once.
"""

from __future__ import annotations

import io
import logging
import threading
from typing import Any

import numpy as np
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

# Transfer syntaxes decoded reduced: JPEG 2000 (lossless and lossy) and JPEG baseline (8-bit)
# and extended (12-bit; Pillow decodes 8-bit only, so those fall back to full decoding).
J2K_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"})
JPEG_DCT_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"})
# JPEG's inverse DCT scales by 1/2, 1/4 or 1/8; JPEG 2000 by 2**levels, at most 2**5 here
# (codestreams usually have 5 or 6 decomposition levels; asking for more than it has fails).
MAX_FACTOR = {"jpeg": 8, "j2k": 32}
# How many times the input size the reduced long side keeps. JPEG's scaled inverse DCT moved the
# demo bundle's p by up to 0.016 (1/4 scale, 400 px for a 128 px input) and 0.020 (1/2 scale)
# against full decoding on 1,600 px phantoms, over the 0.01 parity limit; so a JPEG is reduced
# only while it keeps four times the input. JPEG 2000's levels are proper low-pass images (RG3:
# 0.0005 at 1/8) and cover the input itself.
COVER = {"jpeg": 4, "j2k": 1}

_logged: set[str] = set()
_logged_lock = threading.Lock()


def _log_once(kind: str, message: str, *args: Any) -> None:
    with _logged_lock:
        if kind in _logged:
            return
        _logged.add(kind)
    log.warning(message + " (logged once)", *args)


def reduction_for(long_side: int, min_side: int | None, codec: str) -> int:
    """The largest power-of-two factor (within the codec's) whose reduced long side, rounded
    up as decoders round it, is still at least ``min_side``; 1 when none is."""
    if not min_side or min_side <= 0:
        return 1
    factor, wanted = 1, COVER[codec] * min_side
    while factor * 2 <= MAX_FACTOR[codec] and -(-long_side // (factor * 2)) >= wanted:
        factor *= 2
    return factor


def j2k_levels(codestream: bytes) -> int | None:
    """The decomposition levels the codestream's COD marker declares (None: no COD found);
    a decoder cannot drop more resolution levels than there are."""
    at = codestream.find(b"\xff\x52", 2, 4096)
    if at < 0 or len(codestream) < at + 10:
        return None
    return codestream[at + 9]


def _j2k_array(codestream: bytes, factor: int) -> np.ndarray:
    with Image.open(io.BytesIO(codestream), formats=["JPEG2000"]) as im:
        im.reduce = factor.bit_length() - 1  # type: ignore[method-assign,assignment]  # levels
        im.load()
        return np.asarray(im)


def _j2k_reduced(codestream: bytes, factor: int) -> tuple[np.ndarray, int]:
    """The codestream at ``factor``, or at the next smaller one that decodes: Pillow refuses
    some levels of some codestreams (a 1539 x 1600 image at 1/8 here) and takes the next."""
    while True:
        try:
            return _j2k_array(codestream, factor), factor
        except Exception:
            if factor <= 2:
                raise
            factor //= 2


def dicom_frame_reduced(ds: Any, min_side: int | None) -> np.ndarray | None:
    """The first frame of a JPEG 2000 or JPEG (8-bit) DICOM dataset, decoded at the smallest
    scale still covering ``min_side``, as the stored values the full decoder gives; None when
    the syntax, the image or the codestream does not allow it (decode in full)."""
    if not min_side:
        return None
    syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if syntax in J2K_SYNTAXES:
        codec = "j2k"
    elif syntax in JPEG_DCT_SYNTAXES:
        codec = "jpeg"
    else:
        return None
    rows, columns = int(ds.Rows), int(ds.Columns)
    factor = reduction_for(max(rows, columns), min_side, codec)
    if factor == 1:
        return None
    if int(ds.get("SamplesPerPixel") or 1) != 1 or int(ds.get("PixelRepresentation") or 0):
        return None  # colour or signed values: the full decoders handle those
    bits_stored = int(ds.get("BitsStored") or ds.BitsAllocated)
    try:
        from pydicom.encaps import generate_frames

        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        if codec == "j2k":
            levels = j2k_levels(frame)
            if levels is not None:
                factor = min(factor, 1 << levels)
            if factor == 1:
                _log_once("j2k-levels", "reduced decoding: a JPEG 2000 codestream has no levels")
                return None
            arr, factor = _j2k_reduced(frame, factor)
            if arr.dtype == np.uint16 and bits_stored < 16:
                # Pillow scales a codestream's precision up to 16 bits; back to stored values.
                arr = arr >> (16 - bits_stored)
        else:
            if bits_stored > 8:
                _log_once("jpeg12", "reduced decoding: %d-bit JPEG decodes in full", bits_stored)
                return None
            with Image.open(io.BytesIO(frame), formats=["JPEG"]) as im:
                im.draft("L", (-(-columns // factor), -(-rows // factor)))
                arr = np.asarray(im.convert("L") if im.mode != "L" else im)
    except Exception as exc:  # noqa: BLE001 - codecs raise anything on streams they refuse
        _log_once(codec, "reduced %s decoding failed, decoding in full: %s", codec, exc)
        return None
    expected = (-(-rows // factor), -(-columns // factor))
    if arr.ndim != 2 or abs(arr.shape[0] - expected[0]) > 1 or abs(arr.shape[1] - expected[1]) > 1:
        _log_once(f"{codec}-shape", "reduced %s decode gave %s, not %s", codec, arr.shape, expected)
        return None
    return arr


def jpeg_file_reduced(data: bytes, min_side: int | None) -> np.ndarray | None:
    """A JPEG file's grey float32 pixels decoded at the smallest DCT scale still covering
    ``min_side`` (EXIF orientation applied); None where no reduction applies or it fails."""
    if not min_side:
        return None
    from bonewatch.ingest.raster import _to_grey

    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as im:
            width, height = im.size
            factor = reduction_for(max(width, height), min_side, "jpeg")
            if factor == 1:
                return None
            im.draft(None, (-(-width // factor), -(-height // factor)))
            im.load()
            ImageOps.exif_transpose(im, in_place=True)
            return _to_grey(im).astype(np.float32)
    except Exception as exc:  # noqa: BLE001 - the full decoder reports the file's fault
        _log_once("jpeg-file", "reduced JPEG decoding failed, decoding in full: %s", exc)
        return None
