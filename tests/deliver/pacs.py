"""The PACS of the delivery tests: Orthanc (Debian package ``orthanc``) on loopback ports, with
its DICOMweb plugin (Debian package ``orthanc-dicomweb``), and the ``bonewatch`` command line.

Without Orthanc the tests skip with a message naming the package, except under ``CI=true``,
where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pydicom

from tests.conftest import _unavailable

BONEWATCH = [sys.executable, "-m", "bonewatch"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_orthanc() -> None:
    if shutil.which("Orthanc") is None:
        _unavailable("Orthanc is missing: install the Debian package orthanc")


def dicomweb_plugin() -> str:
    """The DICOMweb plugin's shared library, as the Debian package lists it."""
    run = subprocess.run(
        ["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, check=False
    )
    found = [
        line.strip()
        for line in run.stdout.splitlines()
        if "DicomWeb" in line and ".so" in line and Path(line.strip()).is_file()
    ]
    if not found:
        _unavailable("Orthanc's DICOMweb plugin is missing: install the Debian package "
                     "orthanc-dicomweb")  # fmt: skip
    # the plain .so (the plugin folder's link) before versioned names
    return sorted(found, key=lambda p: (not p.endswith(".so"), p))[0]


class Orthanc:
    """One Orthanc server with a temporary storage folder; stop and start keep its storage."""

    def __init__(self, folder: Path, *, dicomweb: bool = False, aet: str = "ORTHANC") -> None:
        self.dicom_port, self.http_port = free_port(), free_port()
        self.aet = aet
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "orthanc.json"
        config: dict[str, Any] = {
            "Name": "bonewatch-test",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"),
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "Plugins": [dicomweb_plugin()] if dicomweb else [],
        }
        if dicomweb:
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        self.config.write_text(json.dumps(config))
        self.log = folder / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def destination(self) -> str:
        return f"{self.aet}@127.0.0.1:{self.dicom_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def start(self) -> Orthanc:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(["Orthanc", str(self.config)], stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.get("/system")
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"Orthanc did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None

    def get(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (loopback)
            return json.loads(response.read())

    def file(self, instance: str) -> bytes:
        url = f"http://127.0.0.1:{self.http_port}/instances/{instance}/file"
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (loopback)
            return response.read()

    def instances(self) -> list[str]:
        found = self.get("/instances")
        assert isinstance(found, list)
        return [str(i) for i in found]

    def datasets(self, folder: Path) -> list[pydicom.Dataset]:
        """Every instance Orthanc holds, read back as its stored file."""
        folder.mkdir(parents=True, exist_ok=True)
        out = []
        for instance in self.instances():
            path = folder / f"{instance}.dcm"
            path.write_bytes(self.file(instance))
            out.append(pydicom.dcmread(path))
        return out


def run(
    args: list[str], env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BONEWATCH, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def status(env: dict[str, str]) -> dict[str, int]:
    """``bonewatch status``'s outbox figures."""
    result = run(["status", "--format", "json"], env)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout)["deliveries"])


def base_env(data: Path, **settings: str) -> dict[str, str]:
    """The environment of a ``bonewatch`` run on its own data folder, with fast retries."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BONEWATCH_")}
    env.update(
        {
            "BONEWATCH_DATA_DIR": str(data),
            "BONEWATCH_RETRY_BACKOFF_SECONDS": "0.1",
            "BONEWATCH_RETRY_BACKOFF_MAX": "1",
            "BONEWATCH_SEND_TIMEOUT": "60",
        }
    )
    env.update({f"BONEWATCH_{k.upper()}": v for k, v in settings.items()})
    return env


def synth(
    folder: Path, studies: int, env: dict[str, str], seed: int = 7
) -> dict[str, pydicom.Dataset]:
    """Phantom studies as DICOM under ``folder``; their headers by SOP Instance UID."""
    result = run(
        ["synth", str(folder), "--studies", str(studies), "--format", "dicom", "--seed", str(seed)],
        env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return {
        str(ds.SOPInstanceUID): ds
        for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in folder.rglob("*.dcm"))
    }


def outbox_rows(data: Path) -> list[dict[str, Any]]:
    """The embedded ledger's outbox rows."""
    from bonewatch.db import deliveries, make_engine

    engine = make_engine(f"sqlite:///{data / 'bonewatch.sqlite'}")
    try:
        return deliveries.query_deliveries(engine)
    finally:
        engine.dispose()


class SlowLink(threading.Thread):
    """A loopback TCP relay in front of a server that passes the client's bytes on slowly
    (``chunk`` bytes every ``pause`` seconds), so that a send is in flight long enough to be
    killed; ``pause = 0`` lets them through at full speed."""

    def __init__(self, port: int, *, chunk: int = 16384, pause: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.target = port
        self.chunk = chunk
        self.pause = pause
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.closed = threading.Event()

    def run(self) -> None:
        self.server.settimeout(0.2)
        while not self.closed.is_set():
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=10)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, slow: bool) -> None:
        src.settimeout(120)
        try:
            while True:
                data = src.recv(self.chunk)
                if not data:
                    break
                dst.sendall(data)
                if slow and self.pause:
                    time.sleep(self.pause)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self.closed.set()
        self.server.close()
