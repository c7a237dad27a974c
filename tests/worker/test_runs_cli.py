"""Runs in embedded mode: ``process`` as a run, the bulk window, ``bonewatch runs`` and pause,
resume and cancel, through the real command line (``process`` runs as its own process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, func, select

from bonewatch.db import STATUSES, count_by_status, make_engine
from bonewatch.db.runs import cancel_run, get_run, pause_run
from bonewatch.db.schema import images, predictions
from bonewatch.ingest import write_png
from bonewatch.worker.runs import REPORT_KEYS
from bonewatch.worker.window import BulkWindow, WindowError

TIMEOUT = 180.0


class Embedded:
    """``bonewatch`` commands on one data directory, and its ledger read directly."""

    def __init__(self, root: Path, bundle: Path) -> None:
        self.root = root
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("BONEWATCH_")},
            "BONEWATCH_DATA_DIR": str(root / "data"),
            "BONEWATCH_BUNDLE": str(bundle),
            "BONEWATCH_PHI_SALT": "runs-test",
            "BONEWATCH_BATCH_SIZE": "2",
            "BONEWATCH_DECODE_WORKERS": "1",
            "BONEWATCH_SETTLE_SECONDS": "0.2",
            "COLUMNS": "80",
        }
        self.procs: list[subprocess.Popen[str]] = []
        self._engine: Engine | None = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine(f"sqlite:///{self.root / 'data' / 'bonewatch.sqlite'}")
        return self._engine

    def spawn(self, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bonewatch", *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=(self.root / f"stderr-{len(self.procs)}.log").open("w"),
            text=True,
        )
        self.procs.append(proc)
        return proc

    def stderr(self, proc: subprocess.Popen[str]) -> str:
        return (self.root / f"stderr-{self.procs.index(proc)}.log").read_text(errors="replace")

    def run(self, *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "bonewatch", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert result.returncode == code, result.stdout + result.stderr
        return result

    def counts(self, run_id: int | None = None) -> dict[str, int]:
        from sqlalchemy.exc import OperationalError

        if not (self.root / "data" / "bonewatch.sqlite").exists():
            return dict.fromkeys(STATUSES, 0)
        try:
            return count_by_status(self.engine, run_id=run_id)
        except OperationalError:  # `process` is creating the ledger
            return dict.fromkeys(STATUSES, 0)

    def finished(self) -> int:
        c = self.counts()
        return c["done"] + c["failed"] + c["unsupported"]

    def wait_for(self, check: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            for proc in self.procs:
                if proc.poll() not in (None, 0):
                    pytest.fail(f"a command exited with {proc.returncode} waiting for {what}: "
                                + self.stderr(proc)[-3000:])  # fmt: skip
            time.sleep(0.05)
        pytest.fail(f"timed out waiting for {what}; ledger {self.counts()}")

    def assert_each_image_done_once(self, n: int) -> None:
        assert self.counts()["done"] == n, self.counts()
        with self.engine.connect() as conn:
            per_image = conn.execute(
                select(images.c.id, func.count(predictions.c.id))
                .select_from(images.outerjoin(predictions, predictions.c.image_id == images.c.id))
                .group_by(images.c.id)
            ).all()
        assert len(per_image) == n
        assert {count for _, count in per_image} == {1}, "an image missing or predicted twice"

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._engine is not None:
            self._engine.dispose()


@pytest.fixture
def embedded(tmp_path: Path, tiny_bundle_dir: Path) -> Iterator[Embedded]:
    e = Embedded(tmp_path, tiny_bundle_dir)
    try:
        yield e
    finally:
        e.close()


def make_archive(root: Path, n: int, *, size: int = 96, name: str = "archive") -> Path:
    """``n`` distinct bright PNGs: the tiny bundle calls each an ELBOW and predicts it."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(name) * 1000 + n)
    for i in range(n):
        pixels = (0.6 + 0.4 * rng.random((size, size))).astype(np.float32)
        write_png(folder / f"img{i:04d}.png", pixels)
    return folder


def _window_around(now: datetime, start_hours: float, length_hours: float) -> str:
    local = now.astimezone()
    start = local + timedelta(hours=start_hours)
    end = start + timedelta(hours=length_hours)
    return f"{start:%H:%M}-{end:%H:%M}"


# --------------------------------------------------------------------------- the window itself


@pytest.fixture
def berlin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time is Europe/Berlin (UTC+1 in December, UTC+2 in July)."""
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_the_window_is_local_time_and_may_run_past_midnight(berlin: None) -> None:
    night = BulkWindow.parse("20:00-06:00")
    assert str(night) == "20:00-06:00"
    utc = UTC
    assert night.is_open(datetime(2026, 12, 3, 19, 30, tzinfo=utc))  # 20:30 in Berlin
    assert night.is_open(datetime(2026, 12, 3, 4, 59, tzinfo=utc))  # 05:59
    assert not night.is_open(datetime(2026, 12, 3, 5, 0, tzinfo=utc))  # 06:00
    assert not night.is_open(datetime(2026, 12, 3, 12, 0, tzinfo=utc))
    noon = datetime(2026, 12, 3, 11, 0, tzinfo=utc)  # 12:00 in Berlin
    assert night.opens_at(noon) == datetime(2026, 12, 3, 19, 0, tzinfo=utc)
    assert night.closes_at(noon) == datetime(2026, 12, 4, 5, 0, tzinfo=utc)
    # 12 h of work started at noon: 10 h the first night, 2 h the next
    assert night.finish_time(noon, 12 * 3600) == datetime(2026, 12, 4, 21, 0, tzinfo=utc)
    assert night.finish_time(noon, 0) == night.opens_at(noon)
    summer = datetime(2026, 7, 1, 10, 0, tzinfo=utc)  # 12:00 in Berlin, UTC+2
    assert night.opens_at(summer) == datetime(2026, 7, 1, 18, 0, tzinfo=utc)


@pytest.mark.parametrize("spec", ["20-06", "20:00", "24:00-06:00", "20:60-06:00", "08:00-08:00"])
def test_a_window_that_is_not_one_is_refused(spec: str) -> None:
    with pytest.raises(WindowError):
        BulkWindow.parse(spec)


def test_a_bad_window_is_a_usage_error_naming_the_option(embedded: Embedded) -> None:
    archive = make_archive(embedded.root, 1)
    result = embedded.run("process", str(archive), "--window", "25:00-06:00", code=2)
    assert "--window" in result.stderr and "23:59" in result.stderr
    embedded.env["BONEWATCH_BULK_WINDOW"] = "nonsense"
    result = embedded.run("runs", code=2)
    assert "BONEWATCH_BULK_WINDOW" in result.stderr
    embedded.env["BONEWATCH_BULK_WINDOW"] = "20:00-06:00"
    embedded.env["BONEWATCH_BROKER_URL"] = "redis://127.0.0.1:1/0"
    result = embedded.run("process", str(archive), "--window", "20:00-06:00", code=2)
    assert "bonewatch worker --bulk-window" in result.stderr


# --------------------------------------------------------------------------- process as a run


@pytest.mark.slow
def test_a_closed_window_takes_nothing_until_it_is_moved_to_now(embedded: Embedded) -> None:
    n = 12
    archive = make_archive(embedded.root, n)
    now = datetime.now(UTC)
    closed = _window_around(now, 2, 1)
    proc = embedded.spawn("process", str(archive), "--window", closed)
    embedded.wait_for(lambda: "outside its bulk window" in embedded.stderr(proc), "the wait")
    opens = closed.split("-")[0]
    assert "opens at" in embedded.stderr(proc) and f"{opens} local time" in embedded.stderr(proc)
    report = json.loads(embedded.run("runs", "show", "1", "--format", "json").stdout)
    assert report["state"] == "queued" and report["waits_for_window"] is True
    assert report["bulk_window"] == closed
    assert datetime.fromisoformat(report["window_opens_at"]).astimezone().strftime("%H:%M") == (
        opens
    )
    # a watcher on the same ledger holds the run back too: the window is the run's own
    (embedded.root / "inbox").mkdir()
    watcher = embedded.spawn("watch", str(embedded.root / "inbox"))
    embedded.wait_for(lambda: "watching" in embedded.stderr(watcher), "the watcher")
    time.sleep(3)  # nothing is taken while the window is closed
    assert embedded.counts(1)["queued"] == n
    with embedded.engine.connect() as conn:
        assert conn.execute(select(func.max(images.c.attempts))).scalar_one() == 0
    moved = embedded.run("runs", "window", "1", _window_around(now, -1, 2))
    assert "run 1 takes bulk work" in moved.stdout
    proc.wait(timeout=TIMEOUT)
    assert proc.returncode == 0, embedded.stderr(proc)
    embedded.assert_each_image_done_once(n)
    assert get_run(embedded.engine, 1).state == "done"


def _mid_run(embedded: Embedded, n: int) -> subprocess.Popen[str]:
    archive = make_archive(embedded.root, n, size=128)
    proc = embedded.spawn("process", str(archive))
    embedded.wait_for(lambda: embedded.finished() >= 6, "the run to be under way")
    return proc


def _claimed_when_stopped(embedded: Embedded) -> int:
    """Images finished or in a claimed batch, once a pause or cancel committed: nothing can
    be claimed after it, so this is the most that can ever finish until the run resumes."""
    c = embedded.counts()
    return c["done"] + c["failed"] + c["unsupported"] + c["processing"]


@pytest.mark.slow
def test_pause_mid_run_then_resume_finishes_every_image_once(embedded: Embedded) -> None:
    n = 600
    proc = _mid_run(embedded, n)
    pause_run(embedded.engine, 1, reason="PACS migration")
    bound = _claimed_when_stopped(embedded)
    embedded.wait_for(lambda: embedded.counts()["processing"] == 0, "the claimed batch")
    time.sleep(2)
    assert embedded.finished() <= bound < n, "images were claimed after the pause"
    assert embedded.counts()["queued"] == n - embedded.finished()
    assert proc.poll() is None, "process must wait for the paused run, not end"
    assert "run 1 is paused; waiting for `bonewatch runs resume 1`" in embedded.stderr(proc)
    listed = embedded.run("runs").stdout
    assert "paused" in listed and "archive" in listed
    resumed = embedded.run("runs", "resume", "1")
    assert "run 1 resumed" in resumed.stdout
    assert proc.wait(timeout=TIMEOUT) == 0, embedded.stderr(proc)
    embedded.assert_each_image_done_once(n)
    assert get_run(embedded.engine, 1).state == "done"


@pytest.mark.slow
def test_cancel_mid_run_leaves_nothing_processed_after_it_but_the_claimed_batch(
    embedded: Embedded,
) -> None:
    n = 600
    proc = _mid_run(embedded, n)
    outcome = cancel_run(embedded.engine, 1, reason="wrong folder")
    bound = _claimed_when_stopped(embedded)
    assert outcome.still_processing <= bound
    assert proc.wait(timeout=TIMEOUT) == 0, "process ends once its run is cancelled"
    time.sleep(1)
    counts = embedded.counts()
    assert counts["processing"] == 0 and counts["queued"] == 0
    assert counts["done"] <= bound < n, "an image was processed after the cancel"
    # the rows claimed at the cancel finished; every other row was cancelled by it
    assert counts["cancelled"] == outcome.cancelled == n - counts["done"]
    reasons = json.loads(
        embedded.run("results", "--run", "1", "--status", "cancelled", "--format", "json").stdout
    )
    assert len(reasons) == counts["cancelled"] and {r["reason"] for r in reasons} == {
        "wrong folder"
    }
    # Started again: resume queues the rest; the next `process` takes it.
    assert "queued again" in embedded.run("runs", "resume", "1").stdout
    embedded.run("process", str(embedded.root / "archive"))
    embedded.assert_each_image_done_once(n)
    assert get_run(embedded.engine, 1).state == "done"


# --------------------------------------------------------------------------- bonewatch runs


@pytest.mark.slow
def test_runs_lists_shows_and_filters_in_80_columns(embedded: Embedded) -> None:
    deep = embedded.root / ("a-very-long-folder-name-for-an-archive-of-" + "x" * 60)
    archive = make_archive(deep, 6)
    embedded.run("process", str(archive), str(make_archive(embedded.root, 2, name="more")))
    table = embedded.run("runs").stdout
    assert max(len(line) for line in table.splitlines()) <= 80, table
    assert "done" in table and "…" in table and "+1" in table
    reports = json.loads(embedded.run("runs", "--format", "json").stdout)
    assert [tuple(r) for r in reports] == [REPORT_KEYS]
    (r,) = reports
    assert (r["id"], r["state"], r["kind"], r["queue"], r["done"], r["left"]) == (
        1, "done", "archive", "bulk", 8, 0,
    )  # fmt: skip
    assert r["paths"] == [str(archive), str(embedded.root / "more")]
    assert r["bundle"] == "tiny" and "@" in r["started_by"]
    shown = embedded.run("runs", "show", "1").stdout
    assert max(len(line) for line in shown.splitlines()) <= 80, shown
    assert "state" in shown and "done" in shown
    status = json.loads(embedded.run("status", "--run", "1", "--format", "json").stdout)
    assert status["run_id"] == 1 and status["counts"]["done"] == 8
    rows = json.loads(embedded.run("results", "--run", "1", "--format", "json").stdout)
    assert len(rows) == 8 and {row["run_id"] for row in rows} == {1}
    assert "no run 2" in embedded.run("results", "--run", "2", code=2).stderr
    assert "no run 7" in embedded.run("runs", "show", "7", code=2).stderr
    assert "no run 7" in embedded.run("runs", "pause", "7", code=2).stderr
    assert "no run 7" in embedded.run("status", "--run", "7", code=2).stderr


@pytest.mark.slow
def test_a_watched_folder_is_one_long_lived_run(embedded: Embedded) -> None:
    inbox = embedded.root / "inbox"
    inbox.mkdir()
    pixels = np.full((96, 96), 0.8, np.float32)
    for k in range(2):  # the same run after a restart
        proc = embedded.spawn("watch", str(inbox))
        embedded.wait_for(lambda p=proc: "watching" in embedded.stderr(p), "the watcher")
        write_png(embedded.root / "incoming.png", pixels + 0.01 * k)
        os.rename(embedded.root / "incoming.png", inbox / f"study{k}.png")
        embedded.wait_for(lambda k=k: embedded.counts()["done"] == k + 1, "the new file")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    (report,) = json.loads(embedded.run("runs", "--format", "json").stdout)
    assert (report["kind"], report["queue"], report["state"]) == ("watch", "live", "running")
    assert report["paths"] == [str(inbox)] and report["done"] == 2


def test_the_listener_is_one_long_lived_run(settings) -> None:
    """Instances received over DICOM, in two sessions of the listener, all belong to its one
    run (dcmtk's storescu sends them)."""
    from tests.worker.dicom_net import RG1_UNCR, RG3_UNCR, require_dcmtk, running_listener, storescu

    require_dcmtk()
    for path in (RG3_UNCR, RG1_UNCR):
        with running_listener(settings) as listener:
            assert storescu(listener.address[1], [path], "-xe").acknowledged == [path]
    engine = make_engine(settings.resolved_database_url)
    try:
        (run,) = [get_run(engine, 1)]
        assert (run.kind, run.queue, run.state) == ("listen", "live", "running")
        assert sum(run.counts.values()) == 2 and run.key is not None
        assert run.key.startswith(f"listen:{settings.dicom_ae_title}@")
        with engine.connect() as conn:
            assert conn.execute(select(images.c.run_id).distinct()).scalars().all() == [1]
    finally:
        engine.dispose()
