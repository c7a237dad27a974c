"""Helpers for the DICOM network tests: dcmtk as the sending client, phantom instances, and a
listener running on a thread of the test process.

dcmtk (Debian package ``dcmtk``) is a client no one here wrote. Without it the tests skip with
a message naming the package, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file

from bonewatch.ingest import make_uid, write_dicom
from bonewatch.ingest.listener import StorageListener, TLSFiles
from bonewatch.worker.settings import Settings
from tests.conftest import _unavailable

DCMTK_TOOLS = ("storescu", "echoscu", "storescp")
RG1_UNCR = get_testdata_file("RG1_UNCR.dcm")
RG3_UNCR = get_testdata_file("RG3_UNCR.dcm")
RG1_J2KR = get_testdata_file("RG1_J2KR.dcm")
RG3_J2KR = get_testdata_file("RG3_J2KR.dcm")
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
AE_TITLE = "BONEWATCH"


def require_dcmtk() -> None:
    missing = [tool for tool in DCMTK_TOOLS if shutil.which(tool) is None]
    if missing:
        _unavailable(
            f"dcmtk is not installed ({', '.join(missing)} not found): install the Debian "
            "package dcmtk (apt-get install dcmtk)"
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class StoreRun:
    """One storescu run: its exit code, its output, and the files it heard Success for."""

    returncode: int
    output: str
    acknowledged: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


_SENDING = re.compile(r"Sending file: (.+)$")


def parse_storescu(returncode: int, output: str) -> StoreRun:
    run = StoreRun(returncode, output)
    current: str | None = None
    for line in output.splitlines():
        if match := _SENDING.search(line):
            current = match.group(1).strip()
        elif "Received Store Response" in line and current is not None:
            (run.acknowledged if "(Success" in line else run.failed).append(current)
            current = None
    return run


def storescu_command(
    port: int, files: Sequence[Path | str], *options: str, aec: str = AE_TITLE
) -> list[str]:
    # -v: one line per file sent and per response; -to/-ta/-td: bounded waits
    return [
        "storescu", "-v", "-to", "20", "-ta", "20", "-td", "30", "-aec", aec, *options,
        "127.0.0.1", str(port), *map(str, files),
    ]  # fmt: skip


def storescu(
    port: int,
    files: Sequence[Path | str],
    *options: str,
    aec: str = AE_TITLE,
    timeout: float = 180,
) -> StoreRun:
    proc = subprocess.run(
        storescu_command(port, files, *options, aec=aec),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return parse_storescu(proc.returncode, proc.stdout + proc.stderr)


def echoscu(port: int, *options: str, aec: str = AE_TITLE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["echoscu", "-v", "-to", "10", "-ta", "10", "-td", "10", "-aec", aec, *options,
         "127.0.0.1", str(port)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def phantom_instances(
    folder: Path,
    count: int,
    *,
    studies: int = 1,
    size: int = 64,
    transfer_syntax: str = "1.2.840.10008.1.2.1",
    tag: str = "net",
) -> list[Path]:
    """``count`` small bright CR wrist instances (the tiny test bundle says ELBOW), spread over
    ``studies`` studies, each with its own SOP Instance UID."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(tag) + count)
    paths = []
    for i in range(count):
        study = i % studies
        pixels = (0.7 + 0.2 * rng.random((size, size))).astype(np.float32)
        path = folder / f"{tag}-{i:04d}.dcm"
        write_dicom(
            path,
            pixels,
            transfer_syntax=transfer_syntax,
            body_part="WRIST",
            study_uid=make_uid("study", tag, str(study)),
            series_uid=make_uid("series", tag, str(study)),
            sop_uid=make_uid("sop", tag, str(i)),
            instance_number=i + 1,
        )
        paths.append(path)
    return paths


def sop_uid(path: Path | str) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def study_uid(path: Path | str) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def received_path(settings: Settings, original: Path | str) -> Path:
    root = settings.data_dir.absolute() / "received"
    return root / study_uid(original) / f"{sop_uid(original)}.dcm"


@contextmanager
def running_listener(
    settings: Settings,
    *,
    process: bool = False,
    tls: TLSFiles | None = None,
    timeout: float = 120.0,
) -> Iterator[StorageListener]:
    """``worker.listen.listen`` on a thread of this process, on a free loopback port."""
    from bonewatch.worker.listen import listen

    settings = settings.replace(dicom_host="127.0.0.1", dicom_port=settings.dicom_port or 0)
    stop = threading.Event()
    ready: list[StorageListener] = []
    started = threading.Event()
    errors: list[BaseException] = []

    def on_ready(listener: StorageListener) -> None:
        ready.append(listener)
        started.set()

    def run() -> None:
        try:
            listen(settings, stop=stop, tls=tls, process=process, on_ready=on_ready)
        except BaseException as exc:  # handed to the test
            errors.append(exc)
            started.set()

    thread = threading.Thread(target=run, name="test-listener", daemon=True)
    thread.start()
    assert started.wait(timeout), "the listener did not start"
    if errors:
        raise errors[0]
    try:
        yield ready[0]
    finally:
        stop.set()
        thread.join(timeout=60)
        assert not thread.is_alive(), "the listener did not stop"
    if errors:
        raise errors[0]
