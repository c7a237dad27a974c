"""The source images' headers, read for the patient and study modules the objects copy."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.dataset import Dataset


def read_header(path: str | Path) -> Dataset:
    """A source DICOM file's header, without its pixel data."""
    return pydicom.dcmread(str(path), stop_before_pixels=True)
