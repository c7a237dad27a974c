"""Only projection radiographs reach the models: a DICOM with no sign of being one, and a matrix
too small for the bundle's input, are refused before the cascade; a dataset without the Part 10
preamble and file meta is read."""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.data import get_testdata_file

from bonewatch.db import query_results
from bonewatch.worker.runner import open_ledger, process_paths
from tests.ingest.archive_factory import dicom_bytes, png_bytes, without_file_meta

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"


def _relabel(data: bytes, **attributes: object) -> bytes:
    import io

    ds = pydicom.dcmread(io.BytesIO(data))
    for keyword, value in attributes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    if "SOPClassUID" in attributes:
        ds.file_meta.MediaStorageSOPClassUID = attributes["SOPClassUID"]
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_only_radiographs_of_a_usable_size_reach_the_models(tmp_path, settings):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    files = {
        "sc_no_modality.dcm": _relabel(
            dicom_bytes("sc"), SOPClassUID=SECONDARY_CAPTURE, Modality=None
        ),
        "scanned_film.dcm": _relabel(dicom_bytes("film"), SOPClassUID=SECONDARY_CAPTURE),
        "dx_processing_no_modality.dcm": _relabel(
            dicom_bytes("dxp"), SOPClassUID=DX_FOR_PROCESSING, Modality=None
        ),
        # the tiny test bundle's input is 16 px: it needs 8 px a side at least
        "tiny.dcm": dicom_bytes("tiny", np.full((7, 6), 0.9, np.float32)),
        "tiny.png": png_bytes(0.9, side=5),
        "no_meta.dcm": without_file_meta(dicom_bytes("bare")),
    }
    for name, data in files.items():
        (inbox / name).write_bytes(data)
    (inbox / "pydicom_no_meta.dcm").write_bytes(open(get_testdata_file("no_meta.dcm"), "rb").read())

    process_paths([inbox], settings)

    rows = {r["path"].rsplit("/", 1)[-1]: r for r in query_results(open_ledger(settings))}
    got = {name: (r["status"], r["reason"], r["body_part"]) for name, r in rows.items()}
    sc = got["sc_no_modality.dcm"]
    assert sc[0] == "unsupported" and sc[2] is None, got
    assert "Secondary Capture Image Storage without a Modality" in sc[1], got
    assert got["scanned_film.dcm"][0] == "done", got  # a digitised film, Modality CR
    assert got["dx_processing_no_modality.dcm"][0] == "done", got
    assert got["tiny.dcm"][:3] == (
        "unsupported",
        "a 7×6 matrix is too small for this bundle's 16 px input (at least 8 px a side)",
        None,
    ), got
    assert got["tiny.png"][0] == "unsupported" and "5×5 matrix" in got["tiny.png"][1], got
    assert got["no_meta.dcm"][0] == "done", got
    # pydicom's no_meta.dcm is CT_small's dataset (after one stray byte): read, then refused
    # for what it is, not for its bytes
    assert got["pydicom_no_meta.dcm"][:2] == (
        "unsupported",
        "modality CT is not a projection radiograph; bonewatch reads CR, DX and RG",
    ), got
