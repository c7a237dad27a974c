"""The MURA dataset's seven upper-limb parts and its folder layout.

MURA stores each image as ``.../XR_<PART>/patient<N>/study<M>_<positive|negative>/image<K>.png``;
the study folder carries the label (``positive`` means abnormal, not only fracture).
"""

from __future__ import annotations

import re
from pathlib import Path, PurePath

MURA_PARTS: tuple[str, ...] = (
    "ELBOW",
    "FINGER",
    "FOREARM",
    "HAND",
    "HUMERUS",
    "SHOULDER",
    "WRIST",
)

_PART_DIR = re.compile(r"XR_([A-Z]+)")
_PATIENT_DIR = re.compile(r"patient\d+")
_STUDY_DIR = re.compile(r"study\d+_(positive|negative)")
# The extension is free so the same layout works for PNG, JPEG and DICOM copies of a study.
_IMAGE_FILE = re.compile(r"image\d+(\.[A-Za-z0-9]+)?")


def parse_mura_path(path: str | Path) -> dict[str, object] | None:
    """Read the part, patient, study and label that a MURA-layout path encodes.

    Args:
        path: Path of an image file; only its last four components are looked at.

    Returns:
        ``{"mura_part", "mura_patient", "mura_study", "mura_label"}`` (label 1 = positive), or
        ``None`` when the path is not in MURA's layout. A region outside ``MURA_PARTS``
        (``XR_KNEE``) keeps its name: datasets use such studies to teach stage 1 what to reject.
    """
    # PurePath keeps the parse purely lexical: the file need not exist.
    parts = PurePath(path).parts
    if len(parts) < 4:
        return None
    part_dir, patient_dir, study_dir, image_file = parts[-4:]
    part_match = _PART_DIR.fullmatch(part_dir)
    study_match = _STUDY_DIR.fullmatch(study_dir)
    if (
        part_match is None
        or _PATIENT_DIR.fullmatch(patient_dir) is None
        or study_match is None
        or _IMAGE_FILE.fullmatch(image_file) is None
    ):
        return None
    return {
        "mura_part": part_match.group(1),
        "mura_patient": patient_dir,
        "mura_study": f"{part_dir}/{patient_dir}/{study_dir}",
        "mura_label": 1 if study_match.group(1) == "positive" else 0,
    }
