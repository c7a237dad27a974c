"""``--rss-track``: one long ``process`` run, resident memory against images finished."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from bonewatch.bench.bundle import bench_bundle
from bonewatch.bench.child import bonewatch_command, child_env, rss_mb, run_child
from bonewatch.bench.config import BenchConfig, BenchError, Report
from bonewatch.bench.figures import machine_description, rounded
from bonewatch.bench.inputs import WorkDir, phantom_set
from bonewatch.db import count_by_status, make_engine
from bonewatch.db.queries import served_variants

log = logging.getLogger(__name__)

RSS_CHECKPOINT = 1000
RSS_FLAT_TOLERANCE = 0.10


def run_rss_track(
    config: BenchConfig, *, work_dir: Path | None = None, report: Report = log.info
) -> dict[str, Any]:
    """One long ``process`` run; resident memory sampled against images finished.

    Returns:
        ``rss_mb_after_checkpoint`` (after 1,000 images), ``rss_mb_end``, the highest sample
        after the checkpoint, ``peak_rss_mb`` (the whole run's high-water mark), ``rss_growth``
        (end over checkpoint, minus one), ``rss_flat`` (end and highest within 10 % of the
        checkpoint) and the samples.
    """
    if config.images <= RSS_CHECKPOINT:
        raise ValueError(f"the RSS track needs more than {RSS_CHECKPOINT} images")
    work = WorkDir.open(work_dir)
    samples: list[tuple[int, float]] = []
    try:
        bundle_dir = bench_bundle(work.root, config, report)
        images = work.root / "rss-images"
        report(f"phantoms: {config.images} {config.input_format} files of {config.image_px} px")
        phantom_set(images, config, distinct=64)
        data_dir = work.root / "rss-data"
        shutil.rmtree(data_dir, ignore_errors=True)
        db_file = data_dir / "bonewatch.sqlite"
        ledger: Engine | None = None

        def sample(pid: int) -> None:
            nonlocal ledger
            rss = rss_mb(pid)
            if rss is None or not db_file.is_file():
                return
            if ledger is None:
                ledger = make_engine(f"sqlite:///{db_file.resolve()}")
            try:
                counts = count_by_status(ledger)
            except Exception:  # the schema is still being created
                return
            samples.append((counts["done"] + counts["failed"] + counts["unsupported"], rss))

        report(
            f"processing {config.images} images ({config.engine}/{config.precision}), sampling RSS"
        )
        run = run_child(
            bonewatch_command("process", str(images)),
            child_env(config, bundle_dir, data_dir=str(data_dir)),
            work.root / "rss.log",
            on_tick=sample,
        )
        if run.returncode != 0:
            raise BenchError(f"bonewatch process exited {run.returncode}:\n{run.tail()}")
        if ledger is None:
            ledger = make_engine(f"sqlite:///{db_file.resolve()}")
        served = served_variants(ledger)
        ledger.dispose()
    finally:
        work.close()
    # The end is the last sample while images were still being processed: once the last one is
    # recorded the worker tears down and its memory falls, which says nothing about growth.
    after = [rss for finished, rss in samples if RSS_CHECKPOINT <= finished < config.images]
    if not after:
        raise BenchError("no memory sample was taken after the checkpoint; the run was too short")
    at_checkpoint, end, highest = after[0], after[-1], max(after)
    growth = end / at_checkpoint - 1.0
    growth_highest = highest / at_checkpoint - 1.0
    step = max(1, len(samples) // 25)
    return {
        "mode": "rss",
        "engine": config.engine,
        "precision": config.precision,
        "served": served,  # engine/precision as the predictions record it: auto's choice
        "backbone": config.backbone,
        "input_size": config.input_size,
        "images": config.images,
        "image_px": config.image_px,
        "checkpoint": RSS_CHECKPOINT,
        "rss_mb_after_checkpoint": round(at_checkpoint, 1),
        "rss_mb_end": round(end, 1),
        "peak_rss_mb": rounded(run.max_rss_mb, 1),
        "rss_mb_highest_after_checkpoint": round(highest, 1),
        "rss_growth": round(growth, 4),
        "rss_growth_highest": round(growth_highest, 4),
        "rss_flat": abs(growth) <= RSS_FLAT_TOLERANCE and growth_highest <= RSS_FLAT_TOLERANCE,
        "wall_s": round(run.wall_s, 1),
        "samples": [[n, round(r, 1)] for n, r in samples[::step]],
        "machine": machine_description(),
    }
