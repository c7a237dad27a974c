"""The bench's child processes: ``bonewatch`` command lines, their environment, peak memory."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bonewatch.bench.config import BENCH_SALT, BenchConfig, BenchError

CHILD_TIMEOUT_S = 3600.0


@dataclass
class ChildRun:
    """How a child ended: exit code, wall time, peak resident memory and its log."""

    returncode: int
    wall_s: float
    max_rss_mb: float | None
    log_path: Path

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def bonewatch_command(*args: str) -> list[str]:
    """The ``bonewatch`` command line run with this interpreter."""
    return [sys.executable, "-m", "bonewatch", *args]


def child_env(config: BenchConfig, bundle: Path, **settings: str) -> dict[str, str]:
    """The environment of a bench child: the caller's, with bonewatch's settings replaced."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BONEWATCH_")}
    env.update(
        {
            "BONEWATCH_BUNDLE": str(bundle),
            "BONEWATCH_ENGINE": config.engine,
            "BONEWATCH_PRECISION": config.precision,
            "BONEWATCH_BATCH_SIZE": str(config.batch_size),
            "BONEWATCH_DECODE_WORKERS": str(config.decode_workers),
            "BONEWATCH_INTRA_OP_THREADS": str(config.intra_op_threads),
            "BONEWATCH_INTER_OP_THREADS": str(config.inter_op_threads),
            "BONEWATCH_INFERENCE_STREAMS": str(config.inference_streams),
            "BONEWATCH_FORWARD_BATCH": str(config.forward_batch),
            "BONEWATCH_PHI_SALT": BENCH_SALT,
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
    )
    env.update({f"BONEWATCH_{k.upper()}": v for k, v in settings.items()})
    return env


def run_child(
    command: list[str],
    env: dict[str, str],
    log_path: Path,
    *,
    on_tick: Callable[[int], None] | None = None,
    tick_s: float = 0.25,
    timeout_s: float = CHILD_TIMEOUT_S,
) -> ChildRun:
    """Run a command to its end; returns its exit code, wall time and peak resident memory.

    ``on_tick(pid)`` is called every ``tick_s`` while it runs ``command``. The peak is the
    child's own high-water mark (``VmHWM``), read while it runs: the kernel's figure for a
    reaped child also counts the pages it shared with this process between fork and exec.
    """
    start = time.perf_counter()
    peak: float | None = None
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                if time.perf_counter() - start > timeout_s:
                    raise BenchError(f"{' '.join(command)} ran past {timeout_s:.0f} s")
                hwm = _own_peak_rss_mb(proc.pid, command)
                if hwm is not None:
                    peak = max(peak or 0.0, hwm)
                    if on_tick is not None:
                        on_tick(proc.pid)
                time.sleep(tick_s)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    return ChildRun(proc.returncode, time.perf_counter() - start, peak, log_path)


def _proc_status_mb(pid: int, field: str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


def _own_peak_rss_mb(pid: int, command: list[str]) -> float | None:
    """The child's peak RSS once it runs ``command`` (before exec it is still a copy of us)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if [part.decode(errors="replace") for part in cmdline if part] != command:
        return None
    return _proc_status_mb(pid, "VmHWM")


def rss_mb(pid: int) -> float | None:
    """Resident memory of a live process, from /proc (Linux); None where it cannot be read."""
    return _proc_status_mb(pid, "VmRSS")
