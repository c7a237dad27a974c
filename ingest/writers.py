"""Writing grey images out as PNG or DICOM files (the synthetic phantoms, test inputs).

Pixels come in as float [0, 1] with 1 = bright, the same convention ``read_image`` returns, so a
written file reads back to the same pixels up to the bit-depth quantisation.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from bonewatch.ingest.dicom import TRANSFER_SYNTAXES_WRITABLE, encode_dicom, make_uid

__all__ = ["TRANSFER_SYNTAXES_WRITABLE", "make_uid", "write_dicom", "write_png"]

_PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")


def _quantise(pixels: np.ndarray, bits: int) -> np.ndarray:
    """Round float [0, 1] (H, W) pixels to integers 0..2**bits-1 (uint8 or uint16)."""
    array = np.asarray(pixels)
    if array.ndim != 2:
        raise ValueError(f"pixels must be 2-D (H, W), got shape {array.shape}")
    if array.size == 0:
        raise ValueError("pixels must not be empty")
    values = array.astype(np.float64)
    if not np.all(np.isfinite(values)) or values.min() < 0.0 or values.max() > 1.0:
        raise ValueError("pixels must be finite floats in [0, 1]")
    dtype = np.uint8 if bits <= 8 else np.uint16
    return np.round(values * (2**bits - 1)).astype(dtype)


def _write_atomically(path: str | Path, data: bytes) -> None:
    """Write a file under a temporary name and rename it into place.

    A watcher on the folder then never sees a half-written image.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_png(path: str | Path, pixels: np.ndarray, *, bits: int = 8) -> None:
    """Write float [0, 1] (H, W) pixels as an 8- or 16-bit grey PNG.

    Raises:
        ValueError: Bad pixels or a bit depth other than 8 or 16.
    """
    if bits not in (8, 16):
        raise ValueError(f"PNG bit depth must be 8 or 16, got {bits}")
    stored = _quantise(pixels, bits)
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="PNG")
    _write_atomically(path, buffer.getvalue())


def write_dicom(
    path: str | Path,
    pixels: np.ndarray,
    *,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    transfer_syntax: str = "1.2.840.10008.1.2.1",
    modality: str = "CR",
    body_part: str | None = None,
    view_position: str | None = None,
    laterality: str | None = None,
    patient_id: str = "",
    patient_name: str = "",
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    study_date: str = "20240101",
    instance_number: int = 1,
    series_number: int = 1,
) -> None:
    """Write float [0, 1] (H, W) pixels (1 = bright) as a CR or DX DICOM file.

    MONOCHROME1 stores inverted values. BitsAllocated is 8 for 8 stored bits and 16 above,
    PixelRepresentation is 0, and the window (center 2**(b-1), width 2**b) maps the stored range
    linearly onto itself, so readers show the pixels as given.

    Args:
        path: Where to write; replaced atomically.
        pixels: Float (H, W) in [0, 1].
        bits_stored: 8..16.
        photometric: ``"MONOCHROME1"`` or ``"MONOCHROME2"``.
        transfer_syntax: One of ``TRANSFER_SYNTAXES_WRITABLE``.
        modality: ``"CR"`` or ``"DX"`` (DX is written as DX For Presentation).
        (others): The DICOM attributes of the same name.

    Raises:
        ValueError: Bad pixels, bit depth, photometric, modality or transfer syntax.
    """
    if not 8 <= bits_stored <= 16:
        raise ValueError(f"bits_stored must be 8..16, got {bits_stored}")
    if photometric not in _PHOTOMETRICS:
        raise ValueError(f"photometric must be one of {_PHOTOMETRICS}, got {photometric}")
    if transfer_syntax not in TRANSFER_SYNTAXES_WRITABLE:
        raise ValueError(f"cannot encode transfer syntax {transfer_syntax}")
    levels = _quantise(pixels, bits_stored)
    top = 2**bits_stored - 1
    # Invert the integers, not the floats, so both photometrics quantise identically.
    stored = (top - levels).astype(levels.dtype) if photometric == "MONOCHROME1" else levels
    # With the LINEAR function (PS3.3 C.11.2.1.2.1) this window maps x to x over 0..top.
    window = (float(2 ** (bits_stored - 1)), float(2**bits_stored))
    data = encode_dicom(
        stored,
        bits_stored=bits_stored,
        photometric=photometric,
        transfer_syntax=transfer_syntax,
        modality=modality,
        window=window,
        body_part=body_part,
        view_position=view_position,
        laterality=laterality,
        patient_id=patient_id,
        patient_name=patient_name,
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid,
        study_date=study_date,
        instance_number=instance_number,
        series_number=series_number,
    )
    _write_atomically(path, data)
