"""The inbox watcher against what a hostile inbox holds: FIFOs, deep trees, dying observers."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest

from bonewatch.ingest.watcher import InboxWatcher
from tests.hostile import make_deep_tree, remove_deep_tree, unblock_fifo
from tests.ingest.test_watcher import SETTLE, WAIT, collect, make_watcher, write


@pytest.fixture(params=[False, True], ids=["events", "polling"])
def poll(request: pytest.FixtureRequest) -> bool:
    return request.param


def _ready_within(watcher: InboxWatcher, until, seconds: float, fifos: list[Path]) -> list[Path]:
    """collect() on a thread; fails, after unblocking ``fifos``, if it does not return in time."""
    got: list[Path] = []
    thread = threading.Thread(target=lambda: got.extend(collect(watcher, until=until)), daemon=True)
    thread.start()
    thread.join(seconds)
    blocked = thread.is_alive()
    for fifo in fifos:
        unblock_fifo(fifo)
    thread.join(WAIT)
    assert not blocked, "ready() blocked (it opened a FIFO)"
    return got


def test_a_fifo_renamed_over_a_pending_file_never_blocks_the_watcher(tmp_path, poll, caplog):
    """Finding 2a: the settle check opened the FIFO that replaced a file it was timing."""
    inbox, staging = tmp_path / "inbox", tmp_path / "staging"
    inbox.mkdir()
    staging.mkdir()
    os.mkfifo(staging / "pipe")
    caplog.set_level(logging.INFO, logger="bonewatch.ingest.watcher")
    with make_watcher(inbox, poll, settle=1.0) as watcher:
        pending = write(inbox / "a.dcm")
        deadline = time.monotonic() + WAIT
        while pending not in watcher._pending and time.monotonic() < deadline:
            assert watcher.ready(timeout=0.02) == []
        os.rename(staging / "pipe", pending)  # while the watcher times a.dcm's settling
        time.sleep(2.5)
        later = write(inbox / "b.dcm")
        got = _ready_within(watcher, lambda r: later in r, WAIT, [pending])
    assert got == [later]
    assert "a.dcm" in caplog.text and "not a regular file" in caplog.text


def test_fifos_and_links_to_them_are_never_opened(tmp_path, poll):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    os.mkfifo(inbox / "at_start.dcm")
    with make_watcher(inbox, poll) as watcher:
        os.mkfifo(inbox / "later.dcm")
        (inbox / "link.dcm").symlink_to(inbox / "later.dcm")
        time.sleep(2 * SETTLE)
        last = write(inbox / "z.dcm")
        fifos = [inbox / "at_start.dcm", inbox / "later.dcm"]
        got = _ready_within(watcher, lambda r: last in r, WAIT, fifos)
    assert got == [last]


@pytest.fixture
def deep(tmp_path):
    """Where a deep tree may be made; removed without recursion afterwards."""
    made: list[Path] = []

    def make(top: Path) -> Path:
        made.append(top)
        return make_deep_tree(top)

    yield make
    for top in made:
        remove_deep_tree(top)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_deep_tree_moved_in_does_not_stop_the_watcher(tmp_path, poll, deep, caplog):
    """Finding 2b: watchdog's recursive walk of the tree killed its thread; files that came
    later were never seen."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    tree = deep(tmp_path / "staging" / "tree")
    moved = inbox / "tree"
    try:
        with make_watcher(inbox, poll) as watcher:
            tree.rename(moved)
            time.sleep(3 * SETTLE)
            later = write(inbox / "later.dcm")
            assert collect(watcher, until=lambda r: later in r) == [later]
            assert watcher.alive
    finally:
        remove_deep_tree(moved)
    if not poll:  # watchdog's inotify thread died; polling took over
        assert "stopped" in caplog.text


def test_a_deep_tree_at_start_up_does_not_stop_the_watcher(tmp_path, poll, deep):
    inbox = tmp_path / "inbox"
    deep(inbox / "tree")
    first = write(inbox / "first.dcm")
    with make_watcher(inbox, poll) as watcher:
        assert collect(watcher, until=lambda r: first in r) == [first]
        later = write(inbox / "later.dcm")
        assert collect(watcher, until=lambda r: later in r) == [later]
        assert watcher.alive


def test_files_deeper_than_the_limit_are_not_taken(tmp_path):
    from bonewatch.ingest.watcher import MAX_DEPTH

    inbox = tmp_path / "inbox"
    shallow = write(inbox.joinpath(*["s"] * MAX_DEPTH, "ok.dcm"))
    too_deep = write(inbox.joinpath(*["s"] * (MAX_DEPTH + 1), "no.dcm"))
    with make_watcher(inbox) as watcher:
        got = collect(watcher, until=lambda r: shallow in r)
        got += collect(watcher, until=lambda _: False, timeout=2 * SETTLE)
    assert got == [shallow] and too_deep.exists()


def test_ready_raises_when_the_observer_dies_again_after_the_fallback(tmp_path, caplog):
    """Finding 2c: a dead observer thread left ready() returning nothing for ever."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with make_watcher(inbox) as watcher:
        watcher._observer.stop()  # as if its thread had died
        before = write(inbox / "seen-by-the-fallback.dcm")
        assert collect(watcher, until=lambda r: before in r) == [before]
        assert watcher.polling and "stopped" in caplog.text
        watcher._observer.stop()  # the polling observer dies too
        deadline = time.monotonic() + WAIT
        with pytest.raises(RuntimeError, match="stopped again"):
            while time.monotonic() < deadline:
                watcher.ready(timeout=0.2)


def test_no_inotify_instance_left_means_polling_not_a_crash(tmp_path, monkeypatch):
    """inotify_init fails with EMFILE when the user's instances are used up (by other
    watchers); that used to escape the fallback to polling and end the watcher at start."""
    import errno

    from bonewatch.ingest import watcher as watcher_module

    def no_instance_left():
        raise OSError(errno.EMFILE, "inotify_init: too many open files")

    monkeypatch.setattr(watcher_module, "Observer", no_instance_left)
    inbox = tmp_path / "inbox"
    first = write(inbox / "first.dcm")
    with make_watcher(inbox) as watcher:
        assert watcher.polling
        assert collect(watcher, until=lambda r: first in r) == [first]


def test_a_link_to_a_folder_of_the_inbox_does_not_hand_its_files_out_twice(tmp_path, poll):
    """A link to the inbox itself (or to a folder in it) made the watcher walk the folder again
    through the link: every file came out a second time, under another path."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with make_watcher(inbox, poll) as watcher:
        (inbox / "a").mkdir()
        (inbox / "a" / "loop").symlink_to(inbox, target_is_directory=True)
        (inbox / "b").symlink_to(inbox / "a", target_is_directory=True)
        image = write(inbox / "a" / "x.dcm")
        got = collect(watcher, until=lambda r: image in r)
        time.sleep(SETTLE)
        (inbox / "c").symlink_to(inbox, target_is_directory=True)  # with the file there already
        got += collect(watcher, until=lambda _: False, timeout=3 * SETTLE)
    assert got == [image]
