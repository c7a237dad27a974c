"""Results delivered to a real PACS: Orthanc (Debian package ``orthanc``) on loopback ports."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

BONEWATCH = [sys.executable, "-m", "bonewatch"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Orthanc:
    def __init__(self, folder: Path) -> None:
        self.dicom_port, self.http_port = _free_port(), _free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "orthanc.json"
        plugins = [p for p in ("/usr/share/orthanc/plugins",) if Path(p).is_dir()]
        self.config.write_text(
            json.dumps(
                {
                    "Name": "bonewatch-test",
                    "StorageDirectory": str(folder / "storage"),
                    "IndexDirectory": str(folder / "storage"),
                    "DicomAet": "ORTHANC",
                    "DicomPort": self.dicom_port,
                    "HttpPort": self.http_port,
                    "RemoteAccessAllowed": False,
                    "AuthenticationEnabled": False,
                    "DicomCheckCalledAet": True,
                    "DicomAlwaysAllowStore": True,
                    "Plugins": plugins,
                }
            )
        )
        self.log = folder / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def destination(self) -> str:
        return f"ORTHANC@127.0.0.1:{self.dicom_port}"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(["Orthanc", str(self.config)], stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.get("/system")
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"Orthanc did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None

    def get(self, path: str) -> object:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (loopback)
            return json.loads(response.read())

    def file(self, instance: str) -> bytes:
        url = f"http://127.0.0.1:{self.http_port}/instances/{instance}/file"
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (loopback)
            return response.read()


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    if shutil.which("Orthanc") is None:
        message = "Orthanc is missing: install the Debian package orthanc"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (CI=true, so this is an error, not a skip)", pytrace=False)
        pytest.skip(message)
    server = Orthanc(tmp_path / "orthanc")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BONEWATCH, *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def _status(env: dict[str, str]) -> dict[str, int]:
    run = _run(["status", "--format", "json"], env)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)["deliveries"]


@pytest.mark.slow
def test_results_reach_orthanc_once_across_a_pacs_restart(orthanc: Orthanc, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "BONEWATCH_DATA_DIR": str(tmp_path / "data"),
        "BONEWATCH_DICOM_DESTINATIONS": orthanc.destination,
        "BONEWATCH_SEND_TIMEOUT": "10",
        "BONEWATCH_RETRY_BACKOFF_SECONDS": "0.1",
        "BONEWATCH_SEND_RETRIES": "20",
    }
    inbox = tmp_path / "in"
    assert _run(["synth", str(inbox), "--studies", "4", "--format", "dicom"], env).returncode == 0
    sources = {
        str(ds.SOPInstanceUID): ds
        for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in inbox.rglob("*.dcm"))
    }
    study_uids = {str(ds.StudyInstanceUID) for ds in sources.values()}

    # The PACS is down while `process` runs: it still exits 0, the objects stay pending.
    orthanc.stop()
    run = _run(["process", str(inbox)], env)
    assert run.returncode == 0, run.stdout + run.stderr
    pending = _status(env)
    assert pending["pending"] > 0 and pending["sent"] == 0, pending

    orthanc.start()
    run = _run(["send"], env)
    assert run.returncode == 0, run.stdout + run.stderr
    again = _run(["send"], env)  # nothing left: sends nothing twice
    assert again.returncode == 0
    counts = _status(env)
    print("outbox after the PACS restart:", counts)
    assert counts == {"pending": 0, "sent": pending["pending"], "failed": 0}

    instances = orthanc.get("/instances")
    assert isinstance(instances, list)
    assert len(instances) == counts["sent"]  # each object once
    import highdicom as hd

    from bonewatch.deliver import codes as bw

    reports = 0
    for instance in instances:
        path = tmp_path / f"{instance}.dcm"
        path.write_bytes(orthanc.file(instance))
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID in study_uids  # filed in the source's study
        if ds.Modality == "SR":
            reports += 1
            everything = hd.sr.srread(path).content.get_image_measurement_groups()
            groups = [g for g in everything if g.source_images]  # the study's group has none
            assert len(everything) == len(groups) + 1
            referenced = {g.source_images[0].referenced_sop_instance_uid for g in groups}
            assert referenced <= set(sources)
            values = [m.value for g in groups for m in g.get_measurements(name=bw.P_FRACTURE)]
            assert len(values) == len(referenced) > 0
        else:
            assert ds.BurnedInAnnotation == "YES"
            assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID in sources
    assert reports >= 1
