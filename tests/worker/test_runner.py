"""`watch` end to end: a real inbox, a real observer, the tiny bundle, a real SQLite ledger."""

from __future__ import annotations

import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np

from bonewatch.db import query_results
from bonewatch.ingest import write_png
from bonewatch.worker.runner import open_ledger, watch_inbox
from tests.worker.conftest import wait_for


def test_watch_takes_existing_and_new_files_once(tmp_path, settings):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    write_png(inbox / "before.png", np.ones((32, 32), np.float32))
    stop = threading.Event()
    events: list[str] = []
    thread = threading.Thread(
        target=watch_inbox, args=(inbox, settings), kwargs={"stop": stop, "on_event": events.append}
    )
    thread.start()
    try:
        engine = open_ledger(settings)

        def statuses() -> dict[str, str]:
            return {Path(str(r["path"])).name: str(r["status"]) for r in query_results(engine)}

        assert wait_for(lambda: statuses().get("before.png") == "done")
        # a file written under a temporary name and renamed in is taken once, complete
        write_png(tmp_path / "staging.png", np.ones((40, 40), np.float32))
        shutil.move(tmp_path / "staging.png", inbox / "after.png.part")
        (inbox / "after.png.part").rename(inbox / "after.png")
        (inbox / ".hidden.png").write_bytes((inbox / "after.png").read_bytes())
        assert wait_for(lambda: statuses().get("after.png") == "done")
        time.sleep(3 * settings.settle_seconds)
        assert statuses() == {"before.png": "done", "after.png": "done"}
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert any("watching" in e for e in events)


def test_watch_says_one_line_per_finished_file_and_keeps_batch_summaries_for_v(tmp_path, settings):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    write_png(inbox / "first.png", np.full((32, 32), 0.9, np.float32))
    (inbox / "notes.txt").write_text("a note, not an image\n")
    stop = threading.Event()
    events: list[str] = []
    thread = threading.Thread(
        target=watch_inbox, args=(inbox, settings), kwargs={"stop": stop, "on_event": events.append}
    )
    thread.start()
    try:
        assert wait_for(lambda: any("first.png" in e for e in events))
        write_png(inbox / "second.png", np.full((32, 32), 0.8, np.float32))
        assert wait_for(lambda: any("second.png" in e for e in events))
        time.sleep(3 * settings.settle_seconds)
    finally:
        stop.set()
        thread.join(timeout=30)
    lines = [e for e in events if not e.startswith("watching")]
    by_file = {name: [e for e in lines if name in e] for name in ("first.png", "second.png")}
    assert all(len(found) == 1 for found in by_file.values()), lines  # each file once
    line = by_file["first.png"][0]
    assert re.match(r"^\d\d:\d\d:\d\d  first\.png  done (positive|negative)$", line), line
    assert any("notes.txt" in e for e in lines)  # refused at the door: said too
    assert not any("registered" in e or "ledger:" in e for e in lines)  # summaries are -v's
