"""``watch`` against a hostile inbox: nothing in it stops the loop, and a watcher that cannot go
on ends the command with exit code 1, for a supervisor to restart it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bonewatch.db import query_results
from bonewatch.ingest import write_png
from bonewatch.worker import runner
from bonewatch.worker.runner import open_ledger
from tests.hostile import make_deep_tree, remove_deep_tree, unblock_fifo
from tests.worker.live_watch import live_watch

BRIGHT = np.full((40, 40), 0.9, np.float32)  # the tiny bundle: ELBOW, done


def _statuses(settings) -> dict[str, str]:
    return {
        Path(str(r["path"])).name: str(r["status"]) for r in query_results(open_ledger(settings))
    }


def test_a_fifo_renamed_over_a_pending_file_does_not_stop_watch(tmp_path, settings):
    """Finding 2a end to end: the FIFO is skipped with a log line; later files are taken."""
    inbox, staging = tmp_path / "inbox", tmp_path / "staging"
    inbox.mkdir()
    staging.mkdir()
    os.mkfifo(staging / "pipe")
    slow = settings.replace(settle_seconds=1.0, quarantine=True)
    with live_watch(inbox, slow) as watch:
        assert watch.started()
        write_png(inbox / "a.png", BRIGHT)
        time.sleep(0.3)  # seen, and settling
        os.rename(staging / "pipe", inbox / "a.png")
        os.mkfifo(inbox / "b.png")
        time.sleep(2.5)  # past a.png's settle checks
        write_png(inbox / "later.png", BRIGHT * 0.99)
        try:
            assert watch.wait(lambda: _statuses(slow).get("later.png") == "done", timeout=20)
        finally:
            for fifo in (inbox / "a.png", inbox / "b.png"):  # a reader blocked on one goes on
                unblock_fifo(fifo)
    assert set(_statuses(slow)) == {"later.png"}
    assert (inbox / "a.png").exists() and (inbox / "b.png").exists()  # never moved, never read


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_deep_tree_moved_in_does_not_stop_watch(tmp_path, settings):
    """Finding 2b end to end: watchdog's thread dies on the tree; later files are still taken."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    tree = make_deep_tree(tmp_path / "staging" / "tree")
    try:
        with live_watch(inbox, settings) as watch:
            assert watch.started()
            tree.rename(inbox / "tree")
            time.sleep(1.0)
            write_png(inbox / "later.png", BRIGHT)
            assert watch.wait(lambda: _statuses(settings).get("later.png") == "done")
    finally:
        remove_deep_tree(inbox / "tree")
        remove_deep_tree(tree)


def test_watch_ends_with_an_error_when_its_observer_dies_for_good(tmp_path, settings, monkeypatch):
    """Finding 2c: with its observer dead, watch used to run on and never see a file again."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    watchers = []

    class Recorded(runner.InboxWatcher):
        def __enter__(self):
            watchers.append(self)
            return super().__enter__()

    monkeypatch.setattr(runner, "InboxWatcher", Recorded)
    with live_watch(inbox, settings) as watch:
        assert watch.wait(lambda: bool(watchers) and watchers[0]._observer is not None)
        watchers[0]._observer.stop()  # as if its thread had died: polling takes over
        write_png(inbox / "seen.png", BRIGHT)
        assert watch.wait(lambda: _statuses(settings).get("seen.png") == "done")
        watchers[0]._observer.stop()  # and that one dies too
        deadline = time.monotonic() + 15
        while watch.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not watch.running(), "watch kept running after its observer died for good"
    assert [type(e).__name__ for e in watch.errors] == ["InboxWatcherError"]


def test_cli_watch_exits_1_on_one_line_when_the_watcher_stops(
    tmp_path, tiny_bundle_dir, monkeypatch
):
    from bonewatch.ingest.watcher import InboxWatcherError
    from bonewatch.worker.cli import app

    inbox = tmp_path / "a-rather-long-folder-name-for-the-inbox-so-that-the-line-is-long" / "in"
    inbox.mkdir(parents=True)
    message = f"the inbox observer for {inbox} stopped again after falling back to polling"

    def dies(*args, **kwargs):
        raise InboxWatcherError(message)

    monkeypatch.setattr(runner, "watch_inbox", dies)
    monkeypatch.setenv("BONEWATCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("BONEWATCH_BUNDLE", str(tiny_bundle_dir))
    monkeypatch.setenv("BONEWATCH_PHI_SALT", "cli-test")
    result = CliRunner().invoke(app, ["watch", str(inbox)], catch_exceptions=False)
    assert result.exit_code == 1
    assert f"error: {message}" in result.output.splitlines()
