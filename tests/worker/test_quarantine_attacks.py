"""Quarantine moves against a hostile inbox: nothing is moved out of it, into it from outside,
through a symlink, or over another file, and a move that cannot be made never stops the caller."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from bonewatch.db import query_results
from bonewatch.ingest import write_png
from bonewatch.worker.pipeline import quarantine_finished
from bonewatch.worker.runner import open_ledger, process_paths
from bonewatch.worker.settings import Settings
from tests.worker.live_watch import live_watch

LONG_NAMES = ["n" * 251 + ".png", "é" * 125 + ".png"]  # 255 and 254 bytes


def _write(path: Path, data: bytes = b"not an image at all") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _tree(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder``, links not followed: file bytes, link targets, folders."""
    found: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            key = str(path.relative_to(folder))
            if path.is_symlink():
                found[key] = "-> " + os.readlink(path)
            elif path.is_dir():
                found[key] = "folder"
            else:
                found[key] = path.read_bytes()
    return found


@pytest.fixture
def place(tmp_path: Path, settings: Settings):
    """An inbox with quarantine on, a folder outside it, and a file to move."""
    inbox, outside = tmp_path / "inbox", tmp_path / "outside"
    inbox.mkdir()
    _write(outside / "kept.txt", b"the outside folder's own file")
    quarantined = settings.replace(quarantine=True, inbox=inbox)
    return inbox, outside, quarantined


@pytest.mark.parametrize("folder", ["failed", "done"])
def test_a_planted_done_or_failed_symlink_is_not_followed(place, folder, caplog):
    inbox, outside, settings = place
    (inbox / folder).symlink_to(outside, target_is_directory=True)
    image = _write(inbox / "XR_WRIST" / "image1.dcm")
    before = _tree(outside)
    caplog.set_level(logging.WARNING)

    moved = quarantine_finished([(str(image), folder)], settings)

    assert moved == []
    assert _tree(outside) == before, "a file was moved out of the inbox through the symlink"
    assert image.read_bytes() == b"not an image at all"
    assert "image1.dcm" in caplog.text


def test_a_symlinked_folder_under_failed_is_not_followed(place):
    inbox, outside, settings = place
    (inbox / "failed").mkdir()
    (inbox / "failed" / "XR_WRIST").symlink_to(outside, target_is_directory=True)
    image = _write(inbox / "XR_WRIST" / "image1.dcm")
    before = _tree(outside)

    assert quarantine_finished([(str(image), "failed")], settings) == []

    assert _tree(outside) == before, "a file was moved out of the inbox through the symlink"
    assert image.exists()


def test_a_folder_swapped_for_a_symlink_during_the_move_is_not_followed(place, monkeypatch):
    """The target folder is made, then replaced by a symlink before the rename."""
    inbox, outside, settings = place
    image = _write(inbox / "XR_WRIST" / "image1.dcm")
    made = inbox / "failed" / "XR_WRIST"
    real_mkdir = os.mkdir

    def mkdir_then_swap(*args, **kwargs):
        real_mkdir(*args, **kwargs)
        if made.is_dir() and not made.is_symlink():
            made.rename(inbox / "failed" / ".swapped")
            made.symlink_to(outside, target_is_directory=True)

    monkeypatch.setattr(os, "mkdir", mkdir_then_swap)
    before = _tree(outside)

    assert quarantine_finished([(str(image), "failed")], settings) == []

    monkeypatch.undo()
    assert _tree(outside) == before, "the rename followed the swapped-in symlink"
    assert image.exists()


def test_a_source_folder_swapped_for_a_symlink_pulls_nothing_into_the_inbox(place):
    """Registered as inbox/XR_WRIST/image1.dcm; then XR_WRIST became a link to outside."""
    inbox, outside, settings = place
    secret = _write(outside / "image1.dcm", b"a file that belongs outside")
    (inbox / "XR_WRIST").symlink_to(outside, target_is_directory=True)
    before = _tree(outside)

    moved = quarantine_finished([(str(inbox / "XR_WRIST" / "image1.dcm"), "failed")], settings)

    assert moved == []
    assert _tree(outside) == before, "an outside file was moved into the inbox"
    assert secret.read_bytes() == b"a file that belongs outside"


def test_recorded_paths_with_dotdot_move_nothing(place, tmp_path):
    inbox, outside, settings = place
    secret = _write(outside / "image1.dcm", b"a file that belongs outside")
    image = _write(inbox / "image2.dcm")
    before = _tree(tmp_path)
    recorded = [
        # lexically under the inbox, really outside: would be pulled in
        (f"{inbox}/../outside/image1.dcm", "failed"),
        (f"{inbox}/XR_WRIST/../../outside/image1.dcm", "done"),
        # really in the inbox, but its target (failed/../../<tmp>/inbox/...) is outside it
        (f"{inbox}/../../{tmp_path.name}/inbox/image2.dcm", "failed"),
    ]

    assert quarantine_finished(recorded, settings) == []

    assert _tree(tmp_path) == before, "a file moved along a '..' path"
    assert secret.exists() and image.exists()


@pytest.mark.parametrize("name", LONG_NAMES, ids=["ascii", "two-byte"])
def test_a_name_at_the_length_limit_gets_a_shortened_number(place, name):
    """The numbered name ``stem.1.suffix`` would pass NAME_MAX: the stem gives way."""
    inbox, _, settings = place
    earlier = _write(inbox / "failed" / "XR" / name, b"quarantined earlier")
    image = _write(inbox / "XR" / name, b"the second file of that name")

    moved = quarantine_finished([(str(image), "failed")], settings)

    (target,) = moved
    assert target.parent == inbox / "failed" / "XR"
    assert len(os.fsencode(target.name)) <= 255
    assert target.name.endswith(".1.png") and target.name[:10] == name[:10]
    assert target.read_bytes() == b"the second file of that name"
    assert earlier.read_bytes() == b"quarantined earlier"
    assert not image.exists()


def test_a_name_taken_during_the_move_is_not_replaced(place, monkeypatch):
    """The target's name is free when looked at and taken by another writer before the rename."""
    inbox, _, settings = place
    image = _write(inbox / "XR" / "image1.dcm", b"ours")
    occupant = inbox / "failed" / "XR" / "image1.dcm"
    real_mkdir = os.mkdir

    def mkdir_then_occupy(*args, **kwargs):
        real_mkdir(*args, **kwargs)
        if occupant.parent.is_dir() and not occupant.exists():
            occupant.write_bytes(b"theirs")

    monkeypatch.setattr(os, "mkdir", mkdir_then_occupy)
    moved = quarantine_finished([(str(image), "failed")], settings)
    monkeypatch.undo()

    assert occupant.read_bytes() == b"theirs"
    assert moved == [inbox / "failed" / "XR" / "image1.1.dcm"]
    assert moved[0].read_bytes() == b"ours"


def test_no_replace_holds_when_the_free_name_check_is_beaten(place, monkeypatch):
    """RENAME_NOREPLACE: even when the check says free, an existing file is not replaced."""
    from bonewatch.worker import quarantine

    inbox, _, settings = place
    image = _write(inbox / "image1.dcm", b"ours")
    occupant = _write(inbox / "failed" / "image1.dcm", b"theirs")
    monkeypatch.setattr(quarantine, "_taken", lambda name, dir_fd: False)

    moved = quarantine_finished([(str(image), "failed")], settings)

    assert occupant.read_bytes() == b"theirs"
    assert moved == [inbox / "failed" / "image1.1.dcm"]


def test_without_renameat2_moves_still_number_taken_names(place, monkeypatch):
    from bonewatch.worker import quarantine

    inbox, _, settings = place
    monkeypatch.setattr(quarantine, "_renameat2", lambda: None)
    occupant = _write(inbox / "failed" / "image1.dcm", b"theirs")
    image = _write(inbox / "image1.dcm", b"ours")

    assert quarantine_finished([(str(image), "failed")], settings) == [
        inbox / "failed" / "image1.1.dcm"
    ]
    assert occupant.read_bytes() == b"theirs"


def test_refused_moves_are_log_lines_and_the_rest_still_move(place, caplog):
    inbox, _, settings = place
    (inbox / "done").write_bytes(b"a file where the done folder should be")
    blocked = _write(inbox / "a.dcm")
    fifo = inbox / "pipe.dcm"
    os.mkfifo(fifo)
    folder = inbox / "folder.dcm"
    folder.mkdir()
    fine = _write(inbox / "b.dcm")
    caplog.set_level(logging.WARNING)

    moved = quarantine_finished(
        [(str(blocked), "done"), (str(fifo), "failed"), (str(folder), "failed")]
        + [(str(fine), "failed")],
        settings,
    )

    assert moved == [inbox / "failed" / "b.dcm"]
    assert blocked.exists() and fifo.exists() and folder.is_dir()
    assert all(name in caplog.text for name in ("a.dcm", "pipe.dcm", "folder.dcm"))


def test_watch_keeps_going_past_a_name_too_long_to_number(tmp_path, settings):
    """Finding 2d: the second refused file of a 255-byte name used to end ``watch``, and again
    at every restart; it must end in failed/ and ``watch`` must take the next file."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    name = LONG_NAMES[0]
    quarantined = settings.replace(quarantine=True)
    with live_watch(inbox, quarantined) as watch:
        _write(inbox / name, b"junk, first of the name")
        assert watch.wait(lambda: (inbox / "failed" / name).exists())
        _write(inbox / name, b"junk, second of the name")
        assert watch.wait(lambda: not (inbox / name).exists())
        write_png(inbox / "after.png", np.full((40, 40), 0.9, np.float32))
        assert watch.wait(lambda: (inbox / "done" / "after.png").exists())
    assert not watch.thread.is_alive() and not watch.errors
    failed = sorted(p.read_bytes() for p in (inbox / "failed").iterdir())
    assert failed == [b"junk, first of the name", b"junk, second of the name"]
    statuses = sorted(str(r["status"]) for r in query_results(open_ledger(quarantined)))
    assert statuses[0] == "done" and set(statuses[1:]) <= {"failed", "unsupported"}, statuses
    assert len(statuses) == 3


def test_a_hard_link_to_an_outside_image_is_failed_unread_and_the_original_stays(place):
    """The review's experiment: another patient's image hard-linked into the inbox was read and
    processed to ``done``. Now the link is failed, unread, and only the link itself moves."""
    inbox, outside, settings = place
    secret = outside / "other patient.png"
    write_png(secret, np.full((64, 64), 0.8, np.float32))
    original = secret.read_bytes()
    os.link(secret, inbox / "scan.png")

    registered, _ = process_paths([inbox], settings)

    (row,) = query_results(open_ledger(settings))
    assert row["status"] == "failed" and row["error_class"] == "UnreadableFileError"
    assert "hard links" in str(row["reason"]) and str(outside) not in str(row["reason"])
    assert row["sha256"] is None, "the outside file's bytes were read to fingerprint it"
    assert registered.refused == 1
    assert secret.read_bytes() == original and secret.stat().st_nlink == 2
    assert (inbox / "failed" / "scan.png").samefile(secret)  # the link moved, inside the inbox
