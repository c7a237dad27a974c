"""Embedded ``watch`` and ``listen`` send their studies' results on their own, to Orthanc
(Debian package ``orthanc``; ``listen``'s sender is dcmtk's storescu, Debian package
``dcmtk``)."""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deliver.pacs import BONEWATCH, Orthanc, base_env, free_port, synth
from tests.worker.dicom_net import require_dcmtk, storescu

pytestmark = pytest.mark.slow

DEADLINE = 240.0


def _scored_studies(data: Path) -> set[str]:
    path = data / "bonewatch.sqlite"
    if not path.exists():
        return set()
    try:
        with sqlite3.connect(path) as conn:
            rows = conn.execute(
                "SELECT DISTINCT study_uid FROM study_results WHERE mean_p_fracture IS NOT NULL"
            ).fetchall()
    except sqlite3.OperationalError:  # the ledger is still being created or migrated
        return set()
    return {r[0] for r in rows}


def _wait_for_reports(
    orthanc: Orthanc, data: Path, studies: set[str], proc: subprocess.Popen[bytes], log: Path
) -> set[str]:
    """Wait until Orthanc holds an SR for every scored study of ``studies``; their UIDs."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        scored = _scored_studies(data) & studies
        held = {
            str(s["MainDicomTags"]["StudyInstanceUID"])
            for s in orthanc.get("/studies?expand")
            if any(
                orthanc.get(f"/series/{series}")["MainDicomTags"].get("Modality") == "SR"
                for series in s["Series"]
            )
        }
        if scored and scored <= held:
            return held
        time.sleep(0.5)
    pytest.fail(f"no SR reached Orthanc in {DEADLINE:.0f} s\n{log.read_text()[-3000:]}")


@pytest.fixture
def stop_after() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_watch_sends_the_results_of_the_studies_it_finished(
    orthanc: Orthanc, tmp_path: Path, stop_after: list[subprocess.Popen[bytes]]
) -> None:
    data = tmp_path / "data"
    env = base_env(
        data,
        dicom_destinations=orthanc.destination,
        study_stable_seconds="2",
        settle_seconds="0.2",
        quarantine="true",  # the sources move to done/ before their objects are built
    )
    staged = tmp_path / "staged"
    sources = synth(staged, 2, env, seed=21)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    log = tmp_path / "watch.log"
    proc = subprocess.Popen([*BONEWATCH, "watch", str(inbox)], env=env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)  # fmt: skip
    stop_after.append(proc)
    time.sleep(1.0)
    shutil.copytree(staged, inbox / "batch")
    studies = {str(ds.StudyInstanceUID) for ds in sources.values()}
    held = _wait_for_reports(orthanc, data, studies, proc, log)
    assert held <= studies  # filed in the sources' studies, nowhere else
    assert list((inbox / "done").rglob("*.dcm"))  # built from the moved files
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]


def test_listen_sends_the_results_of_the_studies_it_received(
    orthanc: Orthanc, tmp_path: Path, stop_after: list[subprocess.Popen[bytes]]
) -> None:
    require_dcmtk()
    data = tmp_path / "data"
    port = free_port()
    env = base_env(
        data,
        dicom_destinations=orthanc.destination,
        study_stable_seconds="2",
        dicom_port=str(port),
    )
    sources = synth(tmp_path / "staged", 2, env, seed=22)
    log = tmp_path / "listen.log"
    proc = subprocess.Popen([*BONEWATCH, "listen"], env=env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)  # fmt: skip
    stop_after.append(proc)
    deadline = time.monotonic() + 120
    while "listening on" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    files = sorted((tmp_path / "staged").rglob("*.dcm"))
    sent = storescu(port, files)
    assert sent.returncode == 0 and len(sent.acknowledged) == len(files), sent.output[-2000:]
    studies = {str(ds.StudyInstanceUID) for ds in sources.values()}
    held = _wait_for_reports(orthanc, data, studies, proc, log)
    assert held <= studies
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
