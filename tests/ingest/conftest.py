"""Factories that write tiny DICOM and PNG files into tmp_path for the ingest tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from bonewatch.ingest import make_uid, write_dicom, write_png

DicomFactory = Callable[..., Path]
EditDicom = Callable[[Path, Callable[[Dataset], None]], Path]


def ramp(rows: int = 36, columns: int = 52) -> np.ndarray:
    """A float [0, 1] test image with every row different (so flips and shifts show)."""
    y, x = np.mgrid[0:rows, 0:columns]
    return ((x + 3 * y) % 97 / 96.0).astype(np.float64)


@pytest.fixture
def make_dicom(tmp_path: Path) -> DicomFactory:
    """Write a CR DICOM through ``write_dicom``; keyword arguments override its defaults."""

    def factory(name: str = "image.dcm", pixels: np.ndarray | None = None, **kwargs: Any) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        options: dict[str, Any] = {
            "study_uid": make_uid("study", name),
            "series_uid": make_uid("series", name),
            "sop_uid": make_uid("sop", name),
        }
        options.update(kwargs)
        write_dicom(path, ramp() if pixels is None else pixels, **options)
        return path

    return factory


@pytest.fixture
def edit_dicom() -> EditDicom:
    """Rewrite a DICOM file after ``mutate(ds)`` changed its dataset."""

    def edit(path: Path, mutate: Callable[[Dataset], None]) -> Path:
        ds = pydicom.dcmread(path)
        mutate(ds)
        ds.save_as(path, enforce_file_format=True)
        return path

    return edit


@pytest.fixture
def make_raw_dicom(tmp_path: Path) -> Callable[..., Path]:
    """Write a DICOM built from scratch: stored ``array`` plus any extra attributes.

    For what ``write_dicom`` deliberately cannot make: other photometrics, windows, LUTs.
    """

    def factory(
        name: str,
        array: np.ndarray | None,
        *,
        photometric: str = "MONOCHROME2",
        bits_stored: int | None = None,
        sop_class: str = "1.2.840.10008.5.1.4.1.1.1",
        **attributes: Any,
    ) -> Path:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.Modality = "CR"
        if array is not None:
            bits = bits_stored or array.dtype.itemsize * 8
            ds.set_pixel_data(array, photometric, bits)
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        path = tmp_path / name
        ds.save_as(path, enforce_file_format=True)
        return path

    return factory


@pytest.fixture
def make_png(tmp_path: Path) -> Callable[..., Path]:
    """Write a grey PNG through ``write_png``."""

    def factory(name: str = "image.png", pixels: np.ndarray | None = None, bits: int = 8) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_png(path, ramp() if pixels is None else pixels, bits=bits)
        return path

    return factory
