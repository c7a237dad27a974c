#!/usr/bin/env python
"""How busy ``bonewatch process`` keeps the cores: images per second and CPU time of the worker
and its decoding processes, between two counts of images done.

Runs ``bonewatch process FOLDER`` into a fresh ledger under ``--data-dir`` with the bundle, engine
and precision given, reads the CPU time of the worker's process tree from ``/proc`` every 0.25 s
and the images done from the ledger, and prints the figures between the ``--from``-th and the
``--to``-th image done (so start-up and the last batch are left out). Usage, after a bench run
kept its folder (``--work-dir /tmp/bwj2k``):

    .venv/bin/python scripts/process-cpu.py /tmp/bwj2k/bundle-densenet121-224-seed0 FOLDER \\
        --engine openvino --precision int8 --decode-processes 0
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from bonewatch.bench.child import bonewatch_command, run_child
from bonewatch.db import count_by_status, make_engine

TICK = os.sysconf("SC_CLK_TCK")


def _processes() -> dict[int, tuple[int, float]]:
    """Every process here: pid -> (parent pid, user + system CPU seconds)."""
    found: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK)
    return found


def tree_cpu_s(root: int) -> float:
    """CPU seconds of ``root`` and every process under it."""
    table = _processes()
    tree, stack = {root}, [root]
    while stack:
        parent = stack.pop()
        for pid, (ppid, _) in table.items():
            if ppid == parent and pid not in tree:
                tree.add(pid)
                stack.append(pid)
    return sum(table[pid][1] for pid in tree if pid in table)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--decode-processes", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/bonewatch-process-cpu"))
    parser.add_argument("--from", dest="first", type=int, default=32)
    parser.add_argument("--to", dest="last", type=int, default=352)
    args = parser.parse_args()

    shutil.rmtree(args.data_dir, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BONEWATCH_")}
    env.update(
        BONEWATCH_BUNDLE=str(args.bundle),
        BONEWATCH_ENGINE=args.engine,
        BONEWATCH_PRECISION=args.precision,
        BONEWATCH_DECODE_PROCESSES=str(args.decode_processes),
        BONEWATCH_DATA_DIR=str(args.data_dir),
    )
    args.data_dir.mkdir(parents=True)
    ledger_file = args.data_dir / "bonewatch.sqlite"
    ledger = None
    samples: list[tuple[float, int, float]] = []

    def sample(pid: int) -> None:
        nonlocal ledger
        if not ledger_file.is_file():
            return
        ledger = ledger or make_engine(f"sqlite:///{ledger_file.resolve()}")
        try:
            done = count_by_status(ledger)["done"]
        except Exception:  # the schema is still being created
            return
        samples.append((time.perf_counter(), done, tree_cpu_s(pid)))

    command = bonewatch_command("process", str(args.folder))
    run = run_child(command, env, args.data_dir / "process.log", on_tick=sample)
    if ledger is not None:
        ledger.dispose()
    if run.returncode != 0:
        print(f"error: bonewatch process exited {run.returncode}:\n{run.tail()}", file=sys.stderr)
        return 1
    start = next((s for s in samples if s[1] >= args.first), None)
    end = next((s for s in samples if s[1] >= args.last), None)
    if start is None or end is None or end[1] <= start[1]:
        print(f"error: fewer than {args.last} images were done while sampling", file=sys.stderr)
        return 1
    images, wall, cpu = end[1] - start[1], end[0] - start[0], end[2] - start[2]
    print(
        f"decode processes {args.decode_processes}: {images} images in {wall:.1f} s = "
        f"{images / wall:.2f} images/s, {cpu / wall:.2f} cores busy, "
        f"{1000 * cpu / images:.0f} CPU ms per image"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
