"""Values that leave the ingest package: what a file is, and its decoded pixels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ImageMeta:
    """What is known about one image file before (and apart from) its pixels.

    Every field but ``path``, ``sha256``, ``format`` and ``size_bytes`` may be ``None`` when the
    source does not carry it (a PNG has no UIDs; a DICOM has no MURA path).
    """

    path: str
    sha256: str
    format: str  # "dicom" | "png" | "jpeg"
    size_bytes: int
    rows: int | None = None
    columns: int | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None
    sop_class_name: str | None = None  # the standard's name of sop_class_uid, when known
    patient_hash: str | None = None  # salted sha256 of PatientID; the ID itself is never kept
    modality: str | None = None
    body_part_examined: str | None = None
    view_position: str | None = None
    photometric: str | None = None
    transfer_syntax: str | None = None
    bits_stored: int | None = None
    number_of_frames: int | None = None  # DICOM NumberOfFrames; None when absent
    # Taken from a MURA-layout path: .../XR_<PART>/patient<N>/study<M>_<positive|negative>/image<K>
    mura_part: str | None = None  # e.g. "ELBOW"
    mura_patient: str | None = None  # e.g. "patient00001"
    mura_study: str | None = None  # e.g. "XR_ELBOW/patient00001/study1_positive"
    mura_label: int | None = None  # 1 positive (abnormal), 0 negative


@dataclass(frozen=True)
class PixelGrid:
    """Where pixels decoded at a reduced resolution sit on the image's full pixel grid.

    ``stages`` are the reductions in the order they were made: ``("j2k-5-3", levels)`` or
    ``("j2k-9-7", levels)`` for JPEG 2000 resolution levels dropped (reversible or irreversible
    wavelet), ``("dct", factor)`` for a JPEG decoded with a scaled inverse DCT, ``("blocks",
    factor)`` for block means. :func:`bonewatch.ingest.resize_as_full` uses them to resize the
    reduced pixels as the full image would have been resized.
    """

    rows: int
    columns: int
    stages: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class DecodedImage:
    """Display-ready grey pixels: float32, shape (H, W), values in [0, 1], 1 = bright (bone).

    ``grid`` is None for pixels of the full image (or a copy averaged down to fit a size);
    set, the pixels were decoded at a reduced resolution (ingest/reduced.py) and preprocessing
    resizes them through it, so a model sees what it would see from the full decode.
    """

    pixels: np.ndarray
    meta: ImageMeta
    grid: PixelGrid | None = None
