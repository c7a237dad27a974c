"""Decoding only the resolution a model needs: JPEG 2000 resolution levels and JPEG DCT scaling.

A model at 224-320 px never sees a 2,000 px radiograph's full resolution. JPEG 2000 codestreams
hold their image at every power-of-two scale (wavelet resolution levels), and a baseline JPEG
decoder can scale its inverse DCT by 1/2, 1/4 or 1/8; either skips most of the decoding work.
:func:`reduction_for` picks the smallest such scale whose long side still covers ``COVER``
times ``min_side`` (the largest input size the bundle's models declare).

Reduced pixels are not simply a smaller image. A JPEG 2000 level is the wavelet's low-pass
band, whose sample k lies on full pixel ``2**levels * k`` (not on the centre of a block), and a
``ceil(n / factor)`` long side does not cover the same extent as ``n`` full pixels; resized as
if they were a whole image, a 1281 px side came out one row off and moved p by 0.33. So every
reduced decode comes with a :class:`~bonewatch.ingest.types.PixelGrid`, and
:func:`resize_as_full` resizes through it: per axis, the weights that best reproduce, from the
reduced samples, the antialiased bilinear resize (Pillow's) of the full image, in the full
image's geometry (a least-squares fit of the resize's kernel by the codec's low-pass kernels).

Everything here returns None where it does not apply or fails (another syntax, a 12-bit JPEG
Pillow cannot scale, a codestream that refuses the reduction): the caller then decodes in full,
and the first failure of each kind is logged once.
"""

from __future__ import annotations

import io
import logging
import struct
import threading
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

from bonewatch.ingest.types import PixelGrid

log = logging.getLogger(__name__)

# Transfer syntaxes decoded reduced: JPEG 2000 (lossless and lossy) and JPEG baseline (8-bit)
# and extended (12-bit; Pillow decodes 8-bit only, so those fall back to full decoding).
J2K_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"})
JPEG_DCT_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"})
# JPEG's inverse DCT scales by 1/2, 1/4 or 1/8; JPEG 2000 by 2**levels, at most 2**5 here
# (codestreams usually have 5 or 6 decomposition levels; asking for more than it has fails).
MAX_FACTOR = {"jpeg": 8, "j2k": 32}
# How many times the model's input the reduced long side keeps. Resized through its grid, the
# demo bundle's p moved by at most 0.007 at 3.1 times the input (1/4 of a 1,600 px J2K phantom)
# but by 0.058 at 1.6 times (1/8): a low-pass band that close to the input aliases what the
# full image's resize filters out. Two times keeps the tests' margin (tests/ingest/
# test_reduced.py) and still decodes a 2,000 px CR at 1/4 for a 224 px model.
COVER = {"jpeg": 2.0, "j2k": 2.0}

# Analysis low-pass filters of JPEG 2000's wavelets, normalised to a DC gain of 1: the
# reversible 5/3 (lossless) and the irreversible CDF 9/7.
_LOWPASS = {
    "j2k-5-3": np.array([-1.0, 2.0, 6.0, 2.0, -1.0]) / 8.0,
    "j2k-9-7": np.array(
        [
            0.026748757410810,
            -0.016864118442875,
            -0.078223266528990,
            0.266864118442872,
            0.602949018236358,
            0.266864118442872,
            -0.078223266528990,
            -0.016864118442875,
            0.026748757410810,
        ]
    ),
}

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
    up as decoders round it, is still at least ``COVER[codec] * min_side``; 1 when none is."""
    if not min_side or min_side <= 0:
        return 1
    factor, wanted = 1, COVER[codec] * min_side
    while factor * 2 <= MAX_FACTOR[codec] and -(-long_side // (factor * 2)) >= wanted:
        factor *= 2
    return factor


# --- JPEG 2000 ---------------------------------------------------------------------------


def _marker(codestream: bytes, code: bytes) -> int | None:
    """Offset of a main-header marker segment (SIZ, COD), walking segment by segment."""
    at = 2  # after SOC
    while at + 4 <= min(len(codestream), 1 << 16):
        marker = codestream[at : at + 2]
        if marker == code:
            return at
        if marker[:1] != b"\xff" or marker == b"\xff\x90":  # SOT: the main header is over
            return None
        at += 2 + struct.unpack(">H", codestream[at + 2 : at + 4])[0]
    return None


def j2k_levels(codestream: bytes) -> int | None:
    """The decomposition levels the codestream's COD marker declares (None: no COD found);
    a decoder cannot drop more resolution levels than there are."""
    info = j2k_coding(codestream)
    return None if info is None else info[0]


def j2k_coding(codestream: bytes) -> tuple[int, str] | None:
    """(decomposition levels, wavelet) from the COD marker: ``j2k-5-3`` or ``j2k-9-7``."""
    at = _marker(codestream, b"\xff\x52")
    if at is None or len(codestream) < at + 14:
        return None
    return codestream[at + 9], "j2k-5-3" if codestream[at + 13] == 1 else "j2k-9-7"


def _j2k_aligned(codestream: bytes, factor: int) -> bool:
    """Whether the image origin is 0 and every tile starts on a multiple of ``factor``: each
    tile is transformed on its own, so only then do the levels sit on one regular grid."""
    at = _marker(codestream, b"\xff\x51")
    if at is None or len(codestream) < at + 38:
        return False
    xsiz, ysiz, xo, yo, xt, yt, xto, yto = struct.unpack(">8I", codestream[at + 6 : at + 38])
    if xo or yo or xto or yto:
        return False
    return (xt >= xsiz or xt % factor == 0) and (yt >= ysiz or yt % factor == 0)


def _j2k_array(codestream: bytes, factor: int) -> np.ndarray:
    with Image.open(io.BytesIO(codestream), formats=["JPEG2000"]) as im:
        width, height = im.size
        im.reduce = factor.bit_length() - 1  # type: ignore[method-assign,assignment]  # levels
        # Pillow rounds a reduced side to the nearest whole pixel, OpenJPEG (as the standard
        # says) up, and it refuses the tile when they differ ("broken data stream": 1253 px at
        # 1/4). Give it the size its own rounding turns into the codec's.
        half = factor >> 1
        im._size = (  # noqa: SLF001
            -(-width // factor) * factor - half,
            -(-height // factor) * factor - half,
        )
        im.load()
        return np.asarray(im)


def _j2k_reduced(codestream: bytes, factor: int) -> tuple[np.ndarray, int]:
    """The codestream at ``factor``, or at the next smaller one that decodes."""
    while True:
        try:
            return _j2k_array(codestream, factor), factor
        except Exception:
            if factor <= 2:
                raise
            factor //= 2


def _expected(rows: int, columns: int, factor: int) -> tuple[int, int]:
    return -(-rows // factor), -(-columns // factor)


def _dct_factor(full: int, scaled: int) -> int:
    """The scale a JPEG decoder chose, from a side before and after (1 if none fits)."""
    return next((f for f in (8, 4, 2) if -(-full // f) == scaled), 1)


def decode_frame(
    frame: bytes, syntax: str, rows: int, columns: int, bits_stored: int, min_side: int | None
) -> tuple[np.ndarray, PixelGrid] | None:
    """A grey JPEG 2000 or JPEG (8-bit) frame decoded at the smallest scale still covering
    ``min_side``, as the stored values the full decoder gives, with its grid; None when the
    syntax, the image or the codestream does not allow it (decode in full)."""
    if not min_side:
        return None
    if syntax in J2K_SYNTAXES:
        codec = "j2k"
    elif syntax in JPEG_DCT_SYNTAXES:
        codec = "jpeg"
    else:
        return None
    factor = reduction_for(max(rows, columns), min_side, codec)
    if factor == 1:
        return None
    try:
        if codec == "j2k":
            coding = j2k_coding(frame)
            if coding is None:
                _log_once("j2k-cod", "reduced decoding: a JPEG 2000 codestream has no COD marker")
                return None
            levels, wavelet = coding
            factor = min(factor, 1 << levels)
            if factor == 1 or not _j2k_aligned(frame, factor):
                _log_once("j2k-grid", "reduced decoding: a JPEG 2000 codestream does not allow it")
                return None
            arr, factor = _j2k_reduced(frame, factor)
            if arr.dtype == np.uint16 and bits_stored < 16:
                # Pillow scales a codestream's precision up to 16 bits; back to stored values.
                arr = arr >> (16 - bits_stored)
            stage = (wavelet, factor.bit_length() - 1)
        else:
            if bits_stored > 8:
                _log_once("jpeg12", "reduced decoding: %d-bit JPEG decodes in full", bits_stored)
                return None
            with Image.open(io.BytesIO(frame), formats=["JPEG"]) as im:
                im.draft("L", _expected(columns, rows, factor))
                factor = _dct_factor(columns, im.size[0])
                arr = np.asarray(im.convert("L") if im.mode != "L" else im)
            stage = ("dct", factor)
    except Exception as exc:  # noqa: BLE001 - codecs raise anything on streams they refuse
        _log_once(codec, "reduced %s decoding failed, decoding in full: %s", codec, exc)
        return None
    if factor < 2 or arr.shape != _expected(rows, columns, factor):
        _log_once(f"{codec}-shape", "reduced %s decode gave %s, decoding in full", codec, arr.shape)
        return None
    return arr, PixelGrid(rows, columns, (stage,))


def jpeg_file_reduced(data: bytes, min_side: int | None) -> tuple[np.ndarray, PixelGrid] | None:
    """A JPEG file's grey float32 pixels decoded at the smallest DCT scale still covering
    ``min_side``, with their grid; None where no reduction applies (an EXIF orientation other
    than upright included) or it fails."""
    if not min_side:
        return None
    from bonewatch.ingest.raster import _to_grey

    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as im:
            width, height = im.size
            factor = reduction_for(max(width, height), min_side, "jpeg")
            if factor == 1 or im.getexif().get(0x0112, 1) != 1:
                return None
            im.draft(None, _expected(width, height, factor))
            factor = _dct_factor(width, im.size[0])
            if factor < 2 or im.size != _expected(width, height, factor):
                return None
            im.load()
            pixels = _to_grey(im).astype(np.float32)
    except Exception as exc:  # noqa: BLE001 - the full decoder reports the file's fault
        _log_once("jpeg-file", "reduced JPEG decoding failed, decoding in full: %s", exc)
        return None
    return pixels, PixelGrid(height, width, (("dct", factor),))


def with_blocks(grid: PixelGrid | None, factor: int) -> PixelGrid | None:
    """``grid`` after its pixels were averaged over ``factor`` x ``factor`` blocks."""
    if grid is None or factor <= 1:
        return grid
    return PixelGrid(grid.rows, grid.columns, (*grid.stages, ("blocks", factor)))


# --- resizing reduced pixels as the full image --------------------------------------------


def _block_means(n: int, factor: int) -> np.ndarray:
    """(ceil(n / factor), n): means of ``factor`` samples, the last block of what it has."""
    m = -(-n // factor)
    out = np.zeros((m, n))
    for k in range(m):
        stop = min(n, (k + 1) * factor)
        out[k, k * factor : stop] = 1.0 / (stop - k * factor)
    return out


def _lowpass_levels(n: int, levels: int, taps: np.ndarray) -> np.ndarray:
    """(ceil(n / 2**levels), n): the wavelet's low-pass band after ``levels`` levels, each
    filtering with whole-sample symmetric extension (as JPEG 2000 does) and keeping the even
    samples. Built from a slab of unit vectors at a time, each on a window of the axis that
    reaches twice the filters' spread past it: beyond that the slab's signal is zero at every
    level, so cutting the axis there changes nothing (the window starts on a multiple of the
    factor, keeping the samples' parity)."""
    r = len(taps) // 2
    factor = 1 << levels
    spread = r * (factor - 1)
    out = np.zeros((-(-n // factor), n))
    for start in range(0, n, 256):
        stop = min(n, start + 256)
        first = max(0, (start - 2 * spread) // factor * factor)
        last = min(n, stop + 2 * spread)
        x = np.zeros((last - first, stop - start))
        x[np.arange(start, stop) - first, np.arange(stop - start)] = 1.0
        for _ in range(levels):
            if x.shape[0] > r:
                padded = np.pad(x, ((r, r), (0, 0)), mode="reflect")
            else:  # too short to reflect about its end samples
                padded = np.pad(x, ((r, r), (0, 0)), mode="symmetric")
            x = sum(t * padded[i : i + x.shape[0]] for i, t in enumerate(taps))[::2]
        out[first // factor : first // factor + len(x), start:stop] = x
    return out


def _stage_matrix(n: int, stage: tuple[str, int]) -> np.ndarray:
    kind, amount = stage
    if kind in _LOWPASS:
        return _lowpass_levels(n, amount, _LOWPASS[kind])
    if kind in ("dct", "blocks"):
        # A scaled inverse DCT keeps each block's low frequencies: its pixel stands for the
        # block's mean, as a block average's does.
        return _block_means(n, amount)
    raise ValueError(f"unknown reduction stage {kind!r}")


def _bilinear(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in): Pillow's antialiased bilinear resize of a whole axis, as its weights."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    out = np.zeros((n_out, n_in))
    for o in range(n_out):
        centre = (o + 0.5) * scale
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), n_in)
        x = np.arange(lo, hi)
        w = np.maximum(0.0, 1.0 - np.abs((x - centre + 0.5) / support))
        out[o, lo:hi] = w / w.sum()
    return out


# Correlation of neighbouring pixels in the image model the resize weights are fitted for.
# Radiographs are smooth between edges; fitting for uncorrelated pixels instead (white noise)
# left the demo bundle's p up to 0.0078 from the full decode's at 1/4 and 0.063 at 1/8 on the
# J2K phantoms, against 0.0035 and 0.021 with this.
_NEIGHBOUR_CORRELATION = 0.9


def _causal(columns: np.ndarray, block: int = 64) -> np.ndarray:
    """y[i] = sum over j <= i of rho ** (i - j) * x[j], down the rows, a block at a time."""
    rho = _NEIGHBOUR_CORRELATION
    steps = np.arange(block)
    within = np.tril(rho ** (steps[:, None] - steps[None, :]).clip(0))
    within[steps[:, None] < steps[None, :]] = 0.0
    carry_in = rho ** (steps + 1.0)
    out = np.empty_like(columns)
    carry = np.zeros(columns.shape[1])
    for start in range(0, len(columns), block):
        chunk = columns[start : start + block]
        k = len(chunk)
        out[start : start + k] = within[:k, :k] @ chunk + np.outer(carry_in[:k], carry)
        carry = out[start + k - 1]
    return out


def _correlated(columns: np.ndarray) -> np.ndarray:
    """C @ columns for C[i, j] = rho ** |i - j|: one causal pass each way (C is never built)."""
    return _causal(columns) + _causal(columns[::-1])[::-1] - columns


def _banded_product(sparse: np.ndarray, dense: np.ndarray) -> np.ndarray:
    """sparse @ dense where each row of ``sparse`` is zero outside one short run of columns."""
    out = np.empty((sparse.shape[0], dense.shape[1]))
    nonzero = sparse != 0
    firsts = nonzero.argmax(axis=1)
    lasts = sparse.shape[1] - nonzero[:, ::-1].argmax(axis=1)
    for i, (lo, hi) in enumerate(zip(firsts, lasts, strict=True)):
        out[i] = sparse[i, lo:hi] @ dense[lo:hi]
    return out


@lru_cache(maxsize=64)
def _axis_weights(n: int, stages: tuple[tuple[str, int], ...], n_out: int) -> np.ndarray:
    """(n_out, reduced n): the weights W whose W @ (M @ x) best estimates B @ x, where x is a
    full axis, M the reductions and B the bilinear resize: with C the image model's
    covariance, W = B C M' (M C M')^-1 (the linear estimate of least mean square error)."""
    reduce = _stage_matrix(n, stages[0])
    for stage in stages[1:]:
        reduce = _stage_matrix(reduce.shape[0], stage) @ reduce
    cross = _correlated(reduce.T)  # C M', (n, reduced n)
    gram = _banded_product(reduce, cross)
    weights = np.linalg.solve(gram, _banded_product(_bilinear(n, n_out), cross).T).T
    # Rows summing to 1: a flat field stays flat to the edges (the estimate alone dims the
    # outermost output pixels by up to 3 %).
    return weights / weights.sum(axis=1, keepdims=True)


def resize_as_full(pixels: np.ndarray, grid: PixelGrid, height: int, width: int) -> np.ndarray:
    """Reduced ``pixels`` resized to ``height`` x ``width`` as the full image on ``grid``
    would be resized by Pillow's bilinear filter (float32, not clipped)."""
    wy = _axis_weights(grid.rows, grid.stages, height)
    wx = _axis_weights(grid.columns, grid.stages, width)
    if pixels.shape != (wy.shape[1], wx.shape[1]):
        raise ValueError(f"pixels of shape {pixels.shape} do not lie on their grid")
    return (wy @ pixels.astype(np.float64) @ wx.T).astype(np.float32)
