"""Receiving throughput: ``bonewatch listen`` against dcmtk's ``storescp``, same files, same run.

``python -m bonewatch.bench.listener`` writes ``--instances`` CR instances of about ``--mb`` MB
each, then, for each receiver in turn, starts it on a loopback port, waits until it answers
C-ECHO, and times ``--associations`` storescu processes sending a share of the files each, side
by side. ``bonewatch listen`` runs with processing off (``--no-process``): each instance is
written, flushed to disk, renamed and registered in a fresh SQLite ledger before its Success.
``storescp`` writes files and flushes nothing; it runs twice, with dcmtk's defaults and with
``TCP_NODELAY=1`` (its fastest), and the ratio is taken against the faster. Each receiver runs
``--repeats`` times, interleaved; the medians are printed as instances per second.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from bonewatch.ingest import make_uid, write_dicom

AE_TITLE = "BONEWATCH"
NODELAY = "storescp TCP_NODELAY=1"


def write_instances(folder: Path, count: int, megabytes: float) -> list[Path]:
    """``count`` 16-bit CR instances of about ``megabytes`` MB each, in 10 studies."""
    folder.mkdir(parents=True, exist_ok=True)
    side = int((megabytes * 1e6 / 2) ** 0.5)
    rng = np.random.default_rng(0)
    pixels = rng.random((side, side)).astype(np.float32)
    paths = []
    for i in range(count):
        path = folder / f"bench-{i:04d}.dcm"
        write_dicom(
            path,
            np.roll(pixels, i, axis=0),
            body_part="WRIST",
            study_uid=make_uid("bench-study", str(i % 10)),
            series_uid=make_uid("bench-series", str(i % 10)),
            sop_uid=make_uid("bench-sop", str(i)),
            instance_number=i + 1,
        )
        paths.append(path)
    return paths


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_echo(port: int, aet: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        probe = subprocess.run(
            ["echoscu", "-to", "2", "-aec", aet, "127.0.0.1", str(port)],
            capture_output=True,
            check=False,
        )
        if probe.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"no C-ECHO answer on port {port} within {timeout:g} s")


def push(port: int, aet: str, files: Sequence[Path], associations: int) -> float:
    """Seconds for ``associations`` storescu processes to send ``files`` between them."""
    shares = [list(files[k::associations]) for k in range(associations)]
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["storescu", "-to", "30", "-aec", aet, "127.0.0.1", str(port), *map(str, share)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for share in shares
    ]
    failures = []
    for proc in procs:
        _, stderr = proc.communicate(timeout=600)
        if proc.returncode != 0:
            failures.append(stderr.decode(errors="replace").strip()[-300:])
    seconds = time.perf_counter() - started
    if failures:
        raise RuntimeError("storescu failed: " + " | ".join(failures))
    return seconds


def _run_receiver(start: Callable[[int], subprocess.Popen[bytes]], aet: str,
                  files: Sequence[Path], associations: int) -> float:  # fmt: skip
    port = _free_port()
    proc = start(port)
    try:
        _wait_for_echo(port, aet)
        return push(port, aet, files, associations)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def run(instances: int, megabytes: float, associations: int, repeats: int, work: Path) -> dict:
    files = write_instances(work / "instances", instances, megabytes)
    size = sum(p.stat().st_size for p in files) / len(files)
    timings: dict[str, list[float]] = {"bonewatch listen": [], "storescp": [], NODELAY: []}
    for repeat in range(repeats):
        out = work / f"storescp-{repeat}"
        out.mkdir()

        def storescp(port: int, out: Path = out, nodelay: bool = False) -> subprocess.Popen[bytes]:
            # dcmtk leaves Nagle's algorithm on unless TCP_NODELAY=1: each C-STORE response
            # then waits for the sender's delayed ACK (about 40 ms on Linux).
            env = {**os.environ, "TCP_NODELAY": "1" if nodelay else "0"}
            return subprocess.Popen(
                ["storescp", "-aet", "STORESCP", "+xa", "-od", str(out), str(port)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

        def storescp_nodelay(port: int, out: Path = out) -> subprocess.Popen[bytes]:
            return storescp(port, out, nodelay=True)

        data_dir = work / f"bonewatch-{repeat}"
        env = {
            **os.environ,
            "BONEWATCH_DATA_DIR": str(data_dir),
            "BONEWATCH_PHI_SALT": "bench",
            "BONEWATCH_MIN_FREE_MB": "64",
            "BONEWATCH_DICOM_HOST": "127.0.0.1",
        }

        def listen(port: int, env: dict[str, str] = env) -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                [sys.executable, "-m", "bonewatch", "listen", "--no-process", "--port", str(port)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

        timings["storescp"].append(_run_receiver(storescp, "STORESCP", files, associations))
        for stale in out.iterdir():
            stale.unlink()
        timings[NODELAY].append(_run_receiver(storescp_nodelay, "STORESCP", files, associations))
        timings["bonewatch listen"].append(_run_receiver(listen, AE_TITLE, files, associations))
        received = list((data_dir / "received").glob("*/*.dcm"))
        if len(received) != instances:
            raise RuntimeError(f"bonewatch listen kept {len(received)} of {instances} instances")
        shutil.rmtree(out)
        shutil.rmtree(data_dir)
    rates = {name: instances / statistics.median(t) for name, t in timings.items()}
    return {
        "instances": instances,
        "mean_instance_mb": round(size / 1e6, 3),
        "associations": associations,
        "repeats": repeats,
        "instances_per_s": {k: round(v, 1) for k, v in rates.items()},
        "seconds": {k: [round(s, 3) for s in t] for k, t in timings.items()},
        # against the faster storescp
        "ratio": round(rates["bonewatch listen"] / max(rates["storescp"], rates[NODELAY]), 3),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bonewatch.bench.listener", description=__doc__)
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--mb", type=float, default=1.0, help="size of one instance")
    parser.add_argument("--associations", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    missing = [t for t in ("storescu", "storescp", "echoscu") if shutil.which(t) is None]
    if missing:
        parser.error(f"needs dcmtk ({', '.join(missing)} not found): apt-get install dcmtk")
    with tempfile.TemporaryDirectory(prefix="bonewatch-bench-listener-") as tmp:
        figures = run(args.instances, args.mb, args.associations, args.repeats, Path(tmp))
    if args.json:
        sys.stdout.write(json.dumps(figures, indent=2) + "\n")
        return 0
    rate = figures["instances_per_s"]
    sys.stdout.write(
        f"{figures['instances']} instances of {figures['mean_instance_mb']} MB, "
        f"{figures['associations']} associations, median of {figures['repeats']}:\n"
        f"  bonewatch listen  {rate['bonewatch listen']:8.1f} instances/s\n"
        f"  storescp          {rate['storescp']:8.1f} instances/s (dcmtk's defaults)\n"
        f"  storescp          {rate[NODELAY]:8.1f} instances/s (TCP_NODELAY=1)\n"
        f"  ratio             {figures['ratio']:8.2f} (against the faster storescp)\n"
        f"  machine           {figures['machine']}\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
