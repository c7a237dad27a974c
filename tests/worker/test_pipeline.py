"""The embedded pipeline end to end on real files and a real SQLite ledger."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from bonewatch.db import count_by_status, query_results, query_studies
from bonewatch.ingest import write_dicom, write_png
from bonewatch.worker.runner import open_ledger, process_paths

RG3_J2KR = get_testdata_file("RG3_J2KR.dcm")
RG1_J2KR = get_testdata_file("RG1_J2KR.dcm")


def _png(path: Path, value: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(path, np.full((48, 48), value, np.float32))
    return path


def _ct_slice(path: Path) -> Path:
    """A CR written by bonewatch, re-labelled as CT the way a misrouted series arrives."""
    import pydicom

    write_dicom(
        path,
        np.ones((8, 8), np.float32),
        study_uid="1.2.3",
        series_uid="1.2.3.1",
        sop_uid="1.2.3.1.1",
    )
    ds = pydicom.dcmread(path)
    ds.Modality = "CT"
    ds.SOPClassUID = pydicom.uid.CTImageStorage
    ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
    ds.save_as(path)
    return path


def _truncated(path: Path) -> Path:
    """A copy cut off half-way through its pixel data, as an interrupted transfer leaves it."""
    write_dicom(
        path,
        np.random.default_rng(0).random((64, 64)).astype(np.float32),
        study_uid="1.2.4",
        series_uid="1.2.4.1",
        sop_uid="1.2.4.1.1",
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 4000])
    return path


def _without_pixels(path: Path) -> Path:
    """A DICOM object with a header and no image, like a structured report."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.BasicTextSRStorage
    meta.MediaStorageSOPInstanceUID = "1.2.5.1.1"
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, "1.2.5.1.1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.5", "1.2.5.1", "CR"
    ds.save_as(path, enforce_file_format=True)
    return path


def _by_name(engine) -> dict[str, dict]:
    return {Path(str(r["path"])).name: r for r in query_results(engine)}


def test_good_bad_and_duplicate_files_each_end_as_one_row(tmp_path, settings):
    inbox = tmp_path / "inbox"
    _png(inbox / "bright.png", 1.0)
    _png(inbox / "dark.png", 0.0)
    shutil.copy(inbox / "bright.png", inbox / "copy-of-bright.png")
    (inbox / "empty.dcm").write_bytes(b"")
    (inbox / "notes.txt").write_text("not an image")
    _ct_slice(inbox / "ct.dcm")
    _truncated(inbox / "truncated.dcm")
    _without_pixels(inbox / "no-pixels.dcm")
    before = {p.name: p.read_bytes() for p in inbox.iterdir()}

    registered, drained = process_paths([inbox], settings)

    rows = _by_name(open_ledger(settings))
    assert registered.seen == 8 and len(rows) == 8
    assert rows["bright.png"]["status"] == "done"
    assert rows["bright.png"]["body_part"] == "ELBOW"
    assert rows["bright.png"]["bundle"] == "tiny"
    assert rows["dark.png"]["status"] == "unsupported"
    assert "none of the seven" in rows["dark.png"]["reason"]
    assert rows["copy-of-bright.png"]["status"] == "duplicate"
    assert rows["copy-of-bright.png"]["duplicate_of"] == rows["bright.png"]["id"]
    assert rows["empty.dcm"]["status"] == "failed" and rows["empty.dcm"]["reason"]
    assert rows["notes.txt"]["status"] == "unsupported"
    assert rows["notes.txt"]["reason"] == "a text file, not an image"
    assert rows["ct.dcm"]["status"] == "unsupported" and "CT" in rows["ct.dcm"]["reason"]
    assert rows["truncated.dcm"]["status"] == "failed"
    assert "cut short" in rows["truncated.dcm"]["reason"]
    assert rows["truncated.dcm"]["error_class"] == "TruncatedFileError"
    assert rows["no-pixels.dcm"]["status"] == "unsupported"
    assert rows["no-pixels.dcm"]["reason"].startswith("a structured report (SR), not an image")
    # originals untouched
    assert {p.name: p.read_bytes() for p in inbox.iterdir()} == before


def test_processing_again_adds_nothing(tmp_path, settings):
    inbox = tmp_path / "inbox"
    _png(inbox / "a.png", 1.0)
    process_paths([inbox], settings)
    registered, drained = process_paths([inbox], settings)
    assert registered.new == 0 and drained.finished == 0
    counts = count_by_status(open_ledger(settings))
    assert counts["done"] == 1 and sum(counts.values()) == 1


def test_study_score_is_the_mean_of_its_images(tmp_path, settings):
    study = tmp_path / "inbox" / "XR_ELBOW" / "patient00001" / "study1_positive"
    _png(study / "image1.png", 1.0)
    _png(study / "image2.png", 0.8)
    process_paths([tmp_path / "inbox"], settings)
    engine = open_ledger(settings)
    images = query_results(engine)
    (study_row,) = query_studies(engine)
    assert study_row["n_images"] == 2
    expected = np.mean([r["p_fracture"] for r in images])
    assert abs(study_row["mean_p_fracture"] - expected) < 1e-9


def test_real_cr_radiographs(tmp_path, settings):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(RG1_J2KR, inbox / "RG1_J2KR.dcm")
    shutil.copy(RG3_J2KR, inbox / "RG3_J2KR.dcm")
    process_paths([inbox], settings)
    rows = _by_name(open_ledger(settings))
    chest, extremity = rows["RG1_J2KR.dcm"], rows["RG3_J2KR.dcm"]
    assert chest["status"] == "unsupported" and "CHEST" in chest["reason"]
    assert chest["body_part"] is None  # refused before any model ran
    assert extremity["status"] in {"done", "unsupported"}
    assert extremity["body_part"] is not None and extremity["body_part_examined"] == "EXTREMITY"


def test_unreadable_file_is_recorded_not_fatal(tmp_path, settings):
    if os.geteuid() == 0:
        # root reads everything; a directory named like an image stands in for "cannot open"
        (tmp_path / "inbox" / "x.dcm").mkdir(parents=True)
        _png(tmp_path / "inbox" / "x.dcm" / "inside.png", 1.0)
        process_paths([tmp_path / "inbox"], settings)
        rows = _by_name(open_ledger(settings))
        assert rows["inside.png"]["status"] == "done"
        return
    path = _png(tmp_path / "inbox" / "locked.png", 1.0)
    path.chmod(0)
    process_paths([tmp_path / "inbox"], settings)
    rows = _by_name(open_ledger(settings))
    assert rows["locked.png"]["status"] == "failed" and rows["locked.png"]["reason"]


def test_rows_keep_absolute_paths(tmp_path, settings, monkeypatch):
    _png(tmp_path / "inbox" / "a.png", 1.0)
    monkeypatch.chdir(tmp_path)
    process_paths([Path("inbox")], settings)
    (row,) = query_results(open_ledger(settings))
    assert Path(str(row["path"])).is_absolute()
    assert Path(str(row["path"])) == tmp_path / "inbox" / "a.png"


def test_patient_name_and_id_never_reach_the_ledger(tmp_path, settings, caplog):
    import logging
    import sqlite3

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    write_dicom(
        inbox / "p.dcm",
        np.ones((40, 40), np.float32),
        patient_id="PID-8675309",
        patient_name="Doe^Jane",
        study_uid="1.2.9",
        series_uid="1.2.9.1",
        sop_uid="1.2.9.1.1",
    )
    caplog.set_level(logging.DEBUG)
    process_paths([inbox], settings)
    (row,) = query_results(open_ledger(settings))
    assert row["status"] == "done"
    db_file = settings.data_dir / "bonewatch.sqlite"
    dump = "\n".join(sqlite3.connect(db_file).iterdump())
    assert "8675309" not in dump and "Doe" not in dump and "Jane" not in dump
    assert "8675309" not in caplog.text and "Doe^Jane" not in caplog.text


def _inject_faults(
    monkeypatch, reader: str, faults: dict[str, int], error: Callable[[Path], BaseException]
) -> None:
    """Make the pipeline's ``reader`` raise ``error(path)`` for the named files, as many times
    as ``faults`` says (a dict the test may change later, as a share coming back)."""
    import bonewatch.worker.pipeline as pipeline

    real = getattr(pipeline, reader)

    def faulty(path, **kw):
        name = Path(path).name
        if faults.get(name, 0) > 0:
            faults[name] -= 1
            raise error(Path(path))
        return real(path, **kw)

    monkeypatch.setattr(pipeline, reader, faulty)


def _eio(path: Path) -> OSError:
    return OSError(errno.EIO, "Input/output error", str(path))


@pytest.mark.parametrize(
    ("reader", "error", "shown"),
    [
        ("read_image", RecursionError("decoder recursed too deep"), "RecursionError"),
        ("read_headers", RuntimeError("reader bug"), "reader bug"),
    ],
)
def test_a_reader_crash_costs_one_file_not_the_run(
    tmp_path, settings, monkeypatch, reader, error, shown
):
    inbox = tmp_path / "inbox"
    _png(inbox / "good.png", 1.0)
    _png(inbox / "odd.png", 0.9)
    _inject_faults(monkeypatch, reader, {"odd.png": 99}, lambda _path: error)
    process_paths([inbox], settings)
    rows = _by_name(open_ledger(settings))
    assert rows["good.png"]["status"] == "done"
    assert rows["odd.png"]["status"] == "failed" and shown in rows["odd.png"]["reason"]


def test_a_transient_read_error_is_retried_after_a_backoff(tmp_path, settings, monkeypatch):
    _png(tmp_path / "inbox" / "flaky.png", 1.0)
    _inject_faults(monkeypatch, "read_image", {"flaky.png": 1}, _eio)
    quick = settings.model_copy(update={"retry_backoff_seconds": 0.3})
    process_paths([tmp_path / "inbox"], quick)
    (row,) = query_results(open_ledger(quick))
    assert row["status"] == "done" and row["attempts"] == 2


def test_a_read_error_that_persists_ends_failed_after_the_cap(tmp_path, settings, monkeypatch):
    _png(tmp_path / "inbox" / "gone.png", 1.0)
    failures = {"gone.png": 99}
    _inject_faults(monkeypatch, "read_image", failures, _eio)
    quick = settings.model_copy(update={"retry_backoff_seconds": 0.1, "max_attempts": 3})
    process_paths([tmp_path / "inbox"], quick)
    (row,) = query_results(open_ledger(quick))
    assert row["status"] == "failed" and row["attempts"] == 3
    assert "Input/output error" in row["reason"] and "gave up after 3 attempts" in row["reason"]
    # the share is back: processing the folder again retries the file
    failures["gone.png"] = 0
    registered, drained = process_paths([tmp_path / "inbox"], quick)
    assert registered.new == 0 and drained.finished == 1
    (row,) = query_results(open_ledger(quick))
    assert row["status"] == "done" and row["attempts"] == 1


def test_decoding_processes_record_what_decode_threads_record(tmp_path, settings):
    """BONEWATCH_DECODE_PROCESSES: the same rows and predictions as the decode threads."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(RG3_J2KR, inbox / "RG3_J2KR.dcm")
    _png(inbox / "MURA-v1.1/valid/XR_WRIST/patient1/study1_negative/image1.png", 0.4)
    _truncated(inbox / "cut.dcm")
    results = {}
    for processes in (0, 2):
        run = settings.replace(data_dir=tmp_path / f"data-{processes}", decode_processes=processes)
        process_paths([inbox], run)
        results[processes] = _by_name(open_ledger(run))
    assert results[0].keys() == results[2].keys() and len(results[2]) == 3
    for name, row in results[2].items():
        theirs = results[0][name]
        assert (row["status"], row["error_class"]) == (theirs["status"], theirs["error_class"])
        assert row["p_fracture"] == pytest.approx(theirs["p_fracture"], abs=1e-6)
    assert results[2]["cut.dcm"]["status"] == "failed"
