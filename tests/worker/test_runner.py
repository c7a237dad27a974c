"""`watch` end to end: a real inbox, a real observer, the tiny bundle, a real SQLite ledger."""

from __future__ import annotations

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
