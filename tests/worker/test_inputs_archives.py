"""Archives and non-image files in a processed folder: each archive member is a row of its own,
read from the archive when it is decoded; files that are not images are `unsupported` with a
reason saying what they are; --include/--exclude choose the files; skipped links are counted."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from bonewatch.db import count_by_status, query_results
from bonewatch.worker.runner import open_ledger, process_paths
from tests.ingest.archive_factory import (
    DEVICE,
    DS_STORE,
    FOLDER,
    LINK,
    OLE_HEADER,
    dicom_bytes,
    lie_about_size,
    object_without_pixels,
    png_bytes,
    write_tar,
    write_zip,
)

RT_PLAN = "1.2.840.10008.5.1.4.1.1.481.5"
RT_STRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"


def _rows(settings, root: Path) -> dict[str, dict]:
    return {os.path.relpath(str(r["path"]), root): r for r in query_results(open_ledger(settings))}


def _tree(root: Path) -> list[tuple[str, int, int]]:
    """Every path under ``root`` but the ledger's folder, with its size and modification time."""
    return sorted(
        (str(p.relative_to(root)), p.lstat().st_size, p.lstat().st_mtime_ns)
        for p in root.rglob("*")
        if p.relative_to(root).parts[0] != "data"
    )


def test_zip_and_tar_members_are_rows_read_from_the_archive(tmp_path, settings):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    nested = write_zip(tmp_path / "inner.zip", {"x.dcm": dicom_bytes("inner")})
    write_zip(
        inbox / "studies.zip",
        {
            "PAT1/": FOLDER,
            "PAT1/IM0001": dicom_bytes("zip-1"),
            "PAT1/IM0002": png_bytes(0.85),
            "PAT1/notes.txt": b"follow-up in two weeks\n",
            "PAT1/link": LINK,
            "PAT1/inner.zip": nested.read_bytes(),
            "../escape.dcm": dicom_bytes("escape"),
        },
    )
    write_tar(inbox / "scans.tar", {"PAT2/": FOLDER, "PAT2/IM0001": dicom_bytes("tar-1")})
    write_tar(
        inbox / "scans.tar.gz",
        {"PAT3/IM0001": dicom_bytes("tgz-1"), "PAT3/dev": DEVICE, "PAT3/IM0002": png_bytes(0.95)},
        mode="w:gz",
    )
    before = _tree(tmp_path)

    registered, drained = process_paths([inbox], settings)

    rows = _rows(settings, inbox)
    status = {name: (row["status"], row["reason"]) for name, row in rows.items()}
    assert set(status) == {
        "studies.zip!PAT1/IM0001",
        "studies.zip!PAT1/IM0002",
        "studies.zip!PAT1/notes.txt",
        "studies.zip!PAT1/inner.zip",
        "studies.zip!..%2Fescape.dcm",
        "scans.tar!PAT2/IM0001",
        "scans.tar.gz!PAT3/IM0001",
        "scans.tar.gz!PAT3/IM0002",
    }, status
    for name in ("PAT1/IM0001", "PAT1/IM0002"):
        assert status[f"studies.zip!{name}"][0] == "done", status
    assert status["scans.tar!PAT2/IM0001"][0] == "done", status
    assert status["scans.tar.gz!PAT3/IM0001"][0] == "done", status
    assert status["scans.tar.gz!PAT3/IM0002"][0] == "done", status
    assert status["studies.zip!PAT1/notes.txt"] == ("unsupported", "a text file, not an image")
    assert status["studies.zip!PAT1/inner.zip"][0] == "unsupported"
    assert "archive inside an archive" in status["studies.zip!PAT1/inner.zip"][1]
    assert status["studies.zip!..%2Fescape.dcm"][0] == "failed"
    assert "'..'" in status["studies.zip!..%2Fescape.dcm"][1]
    # a member's sha256 is that of its own bytes
    assert (
        rows["studies.zip!PAT1/IM0001"]["sha256"]
        == __import__("hashlib").sha256(dicom_bytes("zip-1")).hexdigest()
    )
    # folders, the link and the device are skipped and counted, not rows
    assert registered.seen == 8 and registered.archive_entries_skipped == 4
    # nothing was extracted anywhere, and the archives are as they were
    assert _tree(tmp_path) == before

    again, drained_again = process_paths([inbox], settings)
    assert again.new == 0 and drained_again.finished == 0
    assert sum(count_by_status(open_ledger(settings)).values()) == 8


def test_archive_limits_apply_to_each_member(tmp_path, settings):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    small = settings.replace(max_file_bytes=100_000)
    zeros = b"\0" * 2_000_000  # deflates to about 2 kB: a small zip bomb
    write_zip(inbox / "bomb.zip", {"big.dcm": zeros, "ok.png": png_bytes(0.9)})
    write_zip(inbox / "liar.zip", {"liar.dcm": zeros[:50_000]})
    lie_about_size(inbox / "liar.zip", "liar.dcm", 1000)  # inflates past what it declares
    write_tar(inbox / "big.tar.gz", {"big.dcm": zeros}, mode="w:gz")

    process_paths([inbox], small)

    rows = _rows(small, inbox)
    assert rows["bomb.zip!big.dcm"]["status"] == "failed"
    assert rows["bomb.zip!big.dcm"]["error_class"] == "ImageTooLargeError"
    assert "2000000 bytes, over the limit of 100000" in rows["bomb.zip!big.dcm"]["reason"]
    assert rows["bomb.zip!ok.png"]["status"] == "done"
    assert rows["liar.zip!liar.dcm"]["status"] == "failed"
    assert rows["big.tar.gz!big.dcm"]["error_class"] == "ImageTooLargeError"


def test_files_that_are_not_images_say_what_they_are(tmp_path, settings):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "notes.txt").write_text("follow-up in two weeks\n")
    (inbox / "worklist.csv").write_text("accession,patient,part\nA1,P1,WRIST\nA2,P2,HAND\n")
    (inbox / "index.html").write_text("<!DOCTYPE html><html><body>CD viewer</body></html>")
    (inbox / "manifest.json").write_text('{"study": "1.2.3", "images": 4}')
    (inbox / "Thumbs.db").write_bytes(OLE_HEADER)
    (inbox / "DS_Store").write_bytes(DS_STORE)  # a .DS_Store under a name the walk takes
    shutil.copy(get_testdata_file("DICOMDIR"), inbox / "DICOMDIR")
    for name, sop_class, modality in (
        ("plan.dcm", RT_PLAN, "RTPLAN"),
        ("structures.dcm", RT_STRUCT, "RTSTRUCT"),
        ("report.dcm", COMPREHENSIVE_SR, "SR"),
        ("gsps.dcm", GSPS, "PR"),
        ("kos.dcm", KOS, "KO"),
        ("report.pdf.dcm", ENCAPSULATED_PDF, "DOC"),
        ("sr_says_cr.dcm", COMPREHENSIVE_SR, "CR"),
    ):
        (inbox / name).write_bytes(object_without_pixels(sop_class, modality))

    process_paths([inbox], settings)

    rows = _rows(settings, inbox)
    expected = {
        "notes.txt": "a text file, not an image",
        "worklist.csv": "a CSV table, not an image",
        "index.html": "an HTML page, not an image",
        "manifest.json": "a JSON file, not an image",
        "Thumbs.db": "a Windows thumbnail cache (Thumbs.db), not an image",
        "DS_Store": "a macOS folder settings file (.DS_Store), not an image",
        "DICOMDIR": "a DICOMDIR media directory, not an image",
        "plan.dcm": "an RT Plan, not an image",
        "structures.dcm": "an RT Structure Set, not an image",
        "report.dcm": "a structured report (SR), not an image",
        "gsps.dcm": "a presentation state, not an image",
        "kos.dcm": "a key object selection (KOS), not an image",
        "report.pdf.dcm": "an encapsulated PDF, not an image",
        "sr_says_cr.dcm": "a structured report (SR), not an image",
    }
    got = {name: (rows[name]["status"], rows[name]["reason"]) for name in expected}
    for name, fragment in expected.items():
        status, reason = got[name]
        assert status == "unsupported" and reason.startswith(fragment), (name, got[name])


def test_include_and_exclude_choose_files_and_members(tmp_path, settings):
    inbox = tmp_path / "inbox"
    (inbox / "scratch").mkdir(parents=True)
    (inbox / "a.dcm").write_bytes(dicom_bytes("a"))
    (inbox / "scratch" / "b.dcm").write_bytes(dicom_bytes("b"))
    (inbox / "notes.txt").write_text("no")
    write_zip(inbox / "cd.zip", {"DICOMDIR": b"x", "IMG/c.dcm": dicom_bytes("c")})
    chosen = settings.replace(include="*.dcm", exclude="*/scratch/*,DICOMDIR")

    registered, _ = process_paths([inbox], chosen)

    assert sorted(_rows(chosen, inbox)) == ["a.dcm", "cd.zip!IMG/c.dcm"]
    assert registered.excluded == 3  # scratch/b.dcm, notes.txt, cd.zip!DICOMDIR


@pytest.fixture
def cli(tmp_path, tiny_bundle_dir, monkeypatch):
    monkeypatch.setenv("BONEWATCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("BONEWATCH_BUNDLE", str(tiny_bundle_dir))
    monkeypatch.setenv("BONEWATCH_PHI_SALT", "cli-test")
    monkeypatch.setenv("COLUMNS", "200")
    from bonewatch.worker.cli import app

    return lambda *args: CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_process_takes_include_exclude_and_counts_links_leading_outside(tmp_path, cli):
    inbox, outside = tmp_path / "inbox", tmp_path / "outside"
    inbox.mkdir()
    outside.mkdir()
    (inbox / "a.dcm").write_bytes(dicom_bytes("a"))
    (inbox / "notes.txt").write_text("no")
    (outside / "elsewhere.dcm").write_bytes(dicom_bytes("elsewhere"))
    (inbox / "link.dcm").symlink_to(outside / "elsewhere.dcm")
    (inbox / "folder-link").symlink_to(outside)

    result = cli("process", "--exclude", "*.txt", str(inbox))

    assert result.exit_code == 0, result.output
    summary = " ".join(result.output.split())
    assert "1 file(s) seen" in summary, summary
    assert "1 excluded by --include/--exclude" in summary, summary
    assert "2 symbolic link(s) leading outside skipped" in summary, summary
