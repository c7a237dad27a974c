"""Files arriving over time: written slowly, renamed in, re-sent, or gone before they are read."""

from __future__ import annotations

import hashlib
import io
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from bonewatch.db import count_by_status, query_results, query_studies
from bonewatch.ingest import write_dicom, write_png
from bonewatch.models.bundle import load_bundle
from bonewatch.worker.pipeline import Pipeline, register_paths
from bonewatch.worker.runner import drain, open_ledger, process_paths, watch_inbox
from tests.worker.conftest import wait_for
from tests.worker.live_watch import live_watch


def _png_bytes(value: float, side: int = 64) -> bytes:
    pixels = np.random.default_rng(int(value * 100)).random((side, side)) * 0.2 + value
    buffer = io.BytesIO()
    Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_files_arriving_over_time_are_each_taken_once_and_complete(tmp_path, settings):
    inbox, staging = tmp_path / "inbox", tmp_path / "staging"
    inbox.mkdir()
    staging.mkdir()
    slow_bytes = _png_bytes(0.75, side=256)
    stop = threading.Event()
    thread = threading.Thread(
        target=watch_inbox, args=(inbox, settings), kwargs={"stop": stop, "on_event": print}
    )
    thread.start()
    engine = open_ledger(settings)

    def rows() -> dict[str, list[dict]]:
        found: dict[str, list[dict]] = {}
        for row in query_results(engine):
            found.setdefault(Path(str(row["path"])).name, []).append(row)
        return found

    try:
        # 1. Written slowly: 2.4 s in 24 pieces, each sooner than the settle time (0.2 s).
        with open(inbox / "slow.png", "wb") as out:
            for piece in np.array_split(np.frombuffer(slow_bytes, np.uint8), 24):
                out.write(piece.tobytes())
                out.flush()
                time.sleep(0.1)
        # 2. Copied elsewhere, then renamed into the inbox in one step.
        (staging / "moved.png").write_bytes(_png_bytes(0.8))
        (staging / "moved.png").rename(inbox / "moved.png")
        # 3. Written under a temporary name, renamed when complete.
        (inbox / "upload.png.part").write_bytes(_png_bytes(0.85))
        (inbox / "upload.png.part").rename(inbox / "upload.png")
        assert wait_for(lambda: {"slow.png", "moved.png", "upload.png"} <= set(rows()))
        assert wait_for(lambda: count_by_status(engine)["done"] == 3)
        # 4. The same image re-sent under another name, after the first was processed.
        shutil.copy(inbox / "moved.png", inbox / "moved-again.png")
        assert wait_for(lambda: "moved-again.png" in rows())
        time.sleep(5 * settings.settle_seconds)  # room for any second, wrong registration
        final = rows()
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()

    assert sorted(final) == ["moved-again.png", "moved.png", "slow.png", "upload.png"]
    assert all(len(entries) == 1 for entries in final.values()), final
    (slow,) = final["slow.png"]
    assert slow["status"] == "done"
    # Taken complete: the registered hash is that of the whole file, not of a prefix.
    assert slow["sha256"] == hashlib.sha256(slow_bytes).hexdigest()
    (again,) = final["moved-again.png"]
    assert again["status"] == "duplicate"
    assert again["duplicate_of"] == final["moved.png"][0]["id"]


def test_a_file_deleted_before_it_is_read_fails_once_with_a_reason(tmp_path, settings):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    write_png(inbox / "short-lived.png", np.full((32, 32), 0.9, np.float32))
    write_png(inbox / "stays.png", np.full((32, 32), 0.8, np.float32))
    engine = open_ledger(settings)
    with ThreadPoolExecutor(2) as pool:
        register_paths(engine, sorted(inbox.iterdir()), settings, queue="live", pool=pool)
        (inbox / "short-lived.png").unlink()  # registered, then gone before any worker reads it
        pipeline = Pipeline.open(settings, engine, pool, load_bundle(settings.bundle))
        drain(pipeline)
        by_name = {Path(str(r["path"])).name: r for r in query_results(engine)}
        gone = by_name["short-lived.png"]
        assert gone["status"] == "failed" and gone["error_class"] == "FileVanishedError"
        assert "file not found" in str(gone["reason"])
        assert gone["attempts"] == 1
        assert by_name["stays.png"]["status"] == "done"
        # Not retried: nothing is left to claim, now or on a later run over the folder.
        assert (
            drain(Pipeline.open(settings, engine, pool, load_bundle(settings.bundle))).finished == 0
        )
    registered, drained = process_paths([inbox], settings)
    assert registered.new == 0 and drained.finished == 0
    (after,) = [r for r in query_results(engine) if Path(str(r["path"])).name == "short-lived.png"]
    assert after["attempts"] == 1 and after["status"] == "failed"


def test_a_dicom_that_fails_while_written_is_taken_again_as_its_row_once_complete(
    tmp_path, settings
):
    """The issue's case: a copy pauses longer than the settle time half-way, so the cut file is
    read and fails; when the copy completes, the same row is taken again and ends ``done``."""
    inbox, staging = tmp_path / "inbox", tmp_path / "staging"
    inbox.mkdir()
    staging.mkdir()
    write_dicom(
        staging / "whole.dcm",
        (np.random.default_rng(3).random((96, 96)) * 0.2 + 0.75).astype(np.float32),
        study_uid="1.2.826.0.1.77",
        series_uid="1.2.826.0.1.77.1",
        sop_uid="1.2.826.0.1.77.1.1",
    )
    whole = (staging / "whole.dcm").read_bytes()
    engine = open_ledger(settings)

    def rows() -> list[dict]:
        return [r for r in query_results(engine) if Path(str(r["path"])).name == "slow.dcm"]

    with live_watch(inbox, settings) as watch, open(inbox / "slow.dcm", "wb") as out:
        assert watch.started()
        out.write(whole[: len(whole) // 2])  # cut in the pixel data
        out.flush()
        # (an empty file, had the watcher seen one, is taken again the same way)
        cut_sha = hashlib.sha256(whole[: len(whole) // 2]).hexdigest()
        assert watch.wait(
            lambda: [(r["status"], r["sha256"]) for r in rows()] == [("failed", cut_sha)]
        ), rows()
        (cut,) = rows()
        assert cut["error_class"] in ("TruncatedFileError", "CorruptFileError"), cut
        out.write(whole[len(whole) // 2 :])  # the copy goes on
        out.flush()
        assert watch.wait(lambda: [r["status"] for r in rows()] == ["done"]), rows()
        time.sleep(5 * settings.settle_seconds)  # room for a second, wrong registration
        final = rows()
    assert len(final) == 1, final
    (done,) = final
    assert done["id"] == cut["id"], "the complete file got a new row beside the failed one"
    assert done["sha256"] == hashlib.sha256(whole).hexdigest()
    assert done["attempts"] == 1 and done["error_class"] is None
    (study,) = [s for s in query_studies(engine) if s["study_uid"] == "1.2.826.0.1.77"]
    assert study["n_images"] == 1
    said = [line.split()[2] for line in watch.events if "slow.dcm" in line]
    assert said[-2:] == ["failed", "done"], watch.events  # one line each time it finished
