"""A folder with one file of every input class: a row for each, the right status, a reason for
every refusal, the originals untouched, and no patient identifier in the ledger or the logs."""

from __future__ import annotations

import errno
import hashlib
import hmac
import io
import logging
import os
import sqlite3
import stat
import types
from pathlib import Path

import pytest

import bonewatch.ingest.reader as reader_module
from bonewatch.db import count_by_status, query_results
from bonewatch.worker.runner import open_ledger, process_paths
from tests.worker.inputs import PATIENT_ID, PATIENT_NAME, make_every_input

PHI = ("8675309", "Doe", "Jane")


def deny_reading(monkeypatch: pytest.MonkeyPatch, *denied: Path) -> None:
    """Make opening ``denied`` fail with EACCES, as the OS does for a user without read rights.

    Root reads any file whatever its mode, so under root the refusal is played at the one place
    the reader opens files; everything after it (the mapping to a reason, the row) is real.
    """
    blocked = {str(path) for path in denied}

    class _DeniedFileIO(io.FileIO):
        def __init__(self, file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
            if str(file) in blocked:
                raise PermissionError(errno.EACCES, "Permission denied", str(file))
            super().__init__(file, mode, *args, **kwargs)

    shim = types.SimpleNamespace(**{name: getattr(io, name) for name in dir(io)})
    shim.FileIO = _DeniedFileIO
    monkeypatch.setattr(reader_module, "io", shim)


def snapshot(root: Path) -> dict[str, tuple[str, int, int]]:
    """(sha256 or "sparse", size, mtime_ns) of every regular file under ``root``."""
    out = {}
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            st = path.lstat()
            if not stat.S_ISREG(st.st_mode):
                continue
            if st.st_size > 100_000_000 or not st.st_mode & 0o444:
                digest = "not read"  # the sparse 2 GiB file, the locked file: size and mtime
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[str(path.relative_to(root))] = (digest, st.st_size, st.st_mtime_ns)
    return out


def test_one_file_of_every_class_ends_as_one_row_with_a_reason(
    tmp_path, settings, monkeypatch, caplog
):
    inbox = tmp_path / "inbox"
    expected = make_every_input(inbox, tmp_path / "outside")
    if os.geteuid() == 0:
        deny_reading(monkeypatch, inbox / "bad" / "locked.png")
    before = snapshot(inbox)
    caplog.set_level(logging.DEBUG)

    registered, drained = process_paths([inbox], settings)

    engine = open_ledger(settings)
    rows = {str(Path(str(r["path"])).relative_to(inbox)): r for r in query_results(engine)}
    with_rows = {name for name, want in expected.items() if want.statuses}
    assert set(rows) == with_rows
    for name in with_rows:
        row, want = rows[name], expected[name]
        assert row["status"] in want.statuses, (name, row["status"], row["reason"])
        if want.error_class:
            assert row["error_class"] == want.error_class, (name, row["reason"])
        if want.reason:
            assert want.reason in str(row["reason"]), (name, row["reason"])
        if row["status"] in ("failed", "unsupported", "duplicate"):
            assert str(row["reason"]).strip(), name
        assert row["attempts"] <= 1, name  # nothing bad is tried twice
    counts = count_by_status(engine)
    assert counts["queued"] == counts["processing"] == 0
    assert sum(counts.values()) == len(with_rows) == registered.seen

    # The originals: same bytes, same modification time, nothing moved (quarantine is off).
    assert snapshot(inbox) == before

    # PHI: PatientID only as its keyed hash, PatientName nowhere, in the ledger or the logs.
    salted = hmac.new(settings.phi_salt.encode(), PATIENT_ID.encode(), hashlib.sha256).hexdigest()
    ledger = sqlite3.connect(settings.data_dir / "bonewatch.sqlite")
    (stored,) = ledger.execute(
        "SELECT patient_hash FROM images WHERE path = ?", (str(inbox / "good" / "dx.dcm"),)
    ).fetchone()
    assert stored == salted
    dump = "\n".join(ledger.iterdump())
    assert PATIENT_NAME not in dump and not any(word in dump for word in PHI)
    assert not any(word in caplog.text for word in PHI)
