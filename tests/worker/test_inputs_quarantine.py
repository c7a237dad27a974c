"""Quarantine moves: finished inbox files go to done/ or failed/ only when the user opts in."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path

import numpy as np

from bonewatch.db import query_results
from bonewatch.ingest import write_png
from bonewatch.worker.pipeline import quarantine_finished
from bonewatch.worker.runner import open_ledger, process_paths, watch_inbox
from tests.worker.conftest import wait_for

BRIGHT = np.full((40, 40), 0.9, np.float32)  # the tiny bundle: ELBOW, done
DARK = np.zeros((40, 40), np.float32)  # the tiny bundle: other, unsupported


def _png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(path, pixels)
    return path


def _fingerprint(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def _inbox(root: Path) -> dict[str, tuple[str, int]]:
    """An inbox with a done, an unsupported, a failed and a duplicate file, in a study folder."""
    study = root / "XR_ELBOW" / "patient1" / "study1_positive"
    _png(study / "image1.png", BRIGHT)
    _png(study / "image2.png", DARK)
    # a PNG cut off after its signature: failed (a text file would be unsupported)
    (study / "image3.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16)
    (root / "resent").mkdir()
    (root / "resent" / "image1.png").write_bytes((study / "image1.png").read_bytes())
    return {
        str(p.relative_to(root)): _fingerprint(p) for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_without_opting_in_nothing_moves(tmp_path, settings):
    inbox = tmp_path / "inbox"
    before = _inbox(inbox)
    process_paths([inbox], settings.model_copy(update={"inbox": inbox}))
    after = {str(p.relative_to(inbox)): _fingerprint(p) for p in inbox.rglob("*") if p.is_file()}
    assert after == before
    assert not (inbox / "done").exists() and not (inbox / "failed").exists()


def test_opted_in_files_move_by_status_keeping_their_place_and_bytes(tmp_path, settings):
    inbox = tmp_path / "inbox"
    before = _inbox(inbox)
    # A file of the same name already quarantined earlier: the new one must not replace it.
    _png(inbox / "failed" / "XR_ELBOW" / "patient1" / "study1_positive" / "image3.png", DARK)
    quarantined = settings.model_copy(update={"quarantine": True, "inbox": inbox})

    process_paths([inbox], quarantined)

    rows = {
        Path(str(r["path"])).relative_to(inbox).as_posix(): r
        for r in query_results(open_ledger(quarantined))
    }
    study = "XR_ELBOW/patient1/study1_positive"
    assert {name: row["status"] for name, row in rows.items()} == {
        f"{study}/image1.png": "done",
        f"{study}/image2.png": "unsupported",
        f"{study}/image3.png": "failed",
        "resent/image1.png": "duplicate",
    }
    moved_to = {
        f"{study}/image1.png": f"done/{study}/image1.png",
        f"{study}/image2.png": f"failed/{study}/image2.png",
        f"{study}/image3.png": f"failed/{study}/image3.1.png",
        "resent/image1.png": "done/resent/image1.png",
    }
    for original, target in moved_to.items():
        assert not (inbox / original).exists(), original
        # A rename: the same bytes and the same modification time as before.
        assert _fingerprint(inbox / target) == before[original], target
    # The earlier occupant of the name is untouched.
    assert (inbox / "failed" / study / "image3.png").read_bytes() != b"not an image at all"

    # The moved files are never input again.
    registered, drained = process_paths([inbox], quarantined)
    assert registered.seen == 0 and drained.finished == 0


def test_files_outside_the_inbox_or_already_gone_are_left_alone(tmp_path, settings, caplog):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    archive = _png(tmp_path / "archive" / "a.png", BRIGHT)
    gone = inbox / "gone.png"
    quarantined = settings.model_copy(update={"quarantine": True, "inbox": inbox})
    caplog.set_level(logging.WARNING)

    moved = quarantine_finished([(str(archive), "failed"), (str(gone), "failed")], quarantined)

    assert moved == [] and archive.exists()
    assert not (inbox / "failed").exists() or not any((inbox / "failed").rglob("*.png"))
    assert "gone.png" in caplog.text  # a move that cannot happen is said, not raised
    # Statuses that are not final never move.
    kept = _png(inbox / "kept.png", BRIGHT)
    assert (
        quarantine_finished([(str(kept), "queued"), (str(kept), "processing")], quarantined) == []
    )
    assert kept.exists()


def test_watch_moves_refused_and_finished_files_when_opted_in(tmp_path, settings):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    quarantined = settings.model_copy(update={"quarantine": True})
    stop = threading.Event()
    thread = threading.Thread(
        target=watch_inbox, args=(inbox, quarantined), kwargs={"stop": stop, "on_event": print}
    )
    thread.start()
    try:
        (inbox / "empty.dcm").write_bytes(b"")  # refused at registration
        _png(inbox / "good.png", BRIGHT)  # processed, then moved
        assert wait_for(lambda: (inbox / "done" / "good.png").exists())
        assert wait_for(lambda: (inbox / "failed" / "empty.dcm").exists())
        time.sleep(3 * quarantined.settle_seconds)
        rows = query_results(open_ledger(quarantined))
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
    # One row each, under the path the file arrived with; the moved copies are not new input.
    assert sorted((Path(str(r["path"])).name, r["status"]) for r in rows) == [
        ("empty.dcm", "failed"),
        ("good.png", "done"),
    ]
    assert sorted(p.name for p in inbox.iterdir()) == ["done", "failed"]


def test_quarantine_is_off_unless_asked_for(monkeypatch, tmp_path):
    from bonewatch.worker.settings import Settings

    assert Settings(data_dir=tmp_path).quarantine is False
    monkeypatch.setenv("BONEWATCH_QUARANTINE", "true")
    monkeypatch.setenv("BONEWATCH_INBOX", str(tmp_path / "inbox"))
    opted_in = Settings(data_dir=tmp_path)
    assert opted_in.quarantine is True and opted_in.inbox == tmp_path / "inbox"
