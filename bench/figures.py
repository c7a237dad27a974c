"""The numbers of a bench report: medians, ratios, rounding, threads and the machine."""

from __future__ import annotations

import contextlib
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bonewatch.models.engines import InferenceThreads, available_cores


def median(values: Sequence[float]) -> float | None:
    """The median of ``values``; None where there are none."""
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` to three places; None where either is missing or ``b`` is zero."""
    return round(a / b, 3) if a is not None and b else None


def rounded(value: float | None, digits: int = 2) -> float | None:
    """``value`` as a float rounded to ``digits``; None stays None."""
    return None if value is None else round(float(value), digits)


def shared_core_bound(
    bare_img_s: float | None, decode_one_thread_img_s: float, cores: int
) -> float | None:
    """Images/s that ``cores`` reach when each image costs its inference's core time at the bare
    rate (``cores / bare_img_s``, every core busy) plus one thread's decode: what the embedded
    worker can reach while decoding and inference share the cores (preprocessing and the
    ledger left out)."""
    if not bare_img_s or decode_one_thread_img_s <= 0 or cores < 1:
        return None
    return cores / (cores / bare_img_s + 1.0 / decode_one_thread_img_s)


def threads_report(threads: InferenceThreads, forward_batch: int) -> dict[str, int]:
    """The framework threads a figure ran with, as the report shows them."""
    return {
        "intra_op": threads.resolved_intra_op(),
        "inter_op": threads.inter_op,
        "streams": threads.streams,
        "forward_batch": forward_batch,
    }


def machine_description() -> dict[str, Any]:
    """Cores, CPU model, memory and Python of the machine the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gb = round(int(line.split()[1]) / 1024**2, 1)
    return {
        "cores": available_cores(),
        "cpu": cpu,
        "memory_gb": memory_gb,
        "python": platform.python_version(),
    }
