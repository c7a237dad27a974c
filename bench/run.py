"""A whole bench run: every figure on the same machine, repeats interleaved, one report.

Within each repetition every engine's embedded run is followed by its bare pass, and the engines
take turns, so that a machine whose speed drifts (shared hosts do) slows every figure alike.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from bonewatch.bench.bare import BARE_MAX_IMAGES, bare_bundles, bare_pass
from bonewatch.bench.bundle import bench_bundle
from bonewatch.bench.config import BENCH_SALT, BenchConfig, Report
from bonewatch.bench.distributed import distributed_unavailable, measure_scaling, scaling_report
from bonewatch.bench.figures import machine_description, median, ratio, rounded, threads_report
from bonewatch.bench.inputs import WorkDir, phantom_set
from bonewatch.bench.ledger import LedgerRun, measure_embedded, measure_registration, peak
from bonewatch.bench.seed_style import measure_seed_style
from bonewatch.ingest import read_image
from bonewatch.models.bundle import read_manifest, resolve_engine, servable_engines
from bonewatch.models.engines import configure_tensorflow_threads, default_streams
from bonewatch.models.preprocess import preprocess_batch

log = logging.getLogger(__name__)

# The keys every bench report has; tests check them.
REPORT_KEYS = (
    "engine",
    "bare_img_s",
    "seed_style_img_s",
    "embedded_img_s",
    "distributed_img_s",
    "embedded_vs_bare",
    "embedded_vs_seed_style",
    "peak_rss_mb",
    "register_files_s",
)


def run_bench(
    config: BenchConfig, *, work_dir: Path | None = None, report: Report = log.info
) -> dict[str, Any]:
    """Measure every figure in one run; returns the report (see :data:`REPORT_KEYS`).

    Bare, seed-style and embedded figures are medians of ``config.repeats`` runs; where several
    engines are measured they take turns, so a slow spell of the machine falls on all of them.
    """
    if config.images < 1:
        raise ValueError("images must be at least 1")
    if config.repeats < 1:
        raise ValueError("repeats must be at least 1")
    # Before anything runs TensorFlow here: bare passes get the worker's thread pools.
    configure_tensorflow_threads(config.threads_for("keras"))
    work = WorkDir.open(work_dir)
    try:
        load_before = os.getloadavg()[0]
        bundle_dir = bench_bundle(work.root, config, report)
        manifest = read_manifest(bundle_dir)
        engine = resolve_engine(manifest, config.engine)
        engines = servable_engines(manifest)
        workers = config.distributed_workers
        if workers is None:  # as many as `bonewatch worker` starts
            workers = default_streams(engine)
            config = replace(config, distributed_workers=workers)
        images = work.root / "images"
        report(f"phantoms: {config.images} PNGs of {config.image_px} px")
        files = phantom_set(images, config, distinct=None)

        report(f"registration: {config.register_files} small files")
        shutil.rmtree(work.root / "small-files", ignore_errors=True)
        shutil.rmtree(work.root / "register-ledger", ignore_errors=True)
        register_s = measure_registration(work.root, config.register_files, config)

        spec = manifest.body_part.spec
        bare_files = files[:BARE_MAX_IMAGES]
        x = preprocess_batch([read_image(p, salt=BENCH_SALT).pixels for p in bare_files], spec)
        loaded = bare_bundles(bundle_dir, engines, config)
        embedded_engines = engines if config.compare_engines else [engine]
        embedded: dict[str, list[LedgerRun]] = {name: [] for name in embedded_engines}
        bare: dict[str, list[float]] = {name: [] for name in engines}
        groups = 0.0
        # Each engine's embedded run and its bare pass follow each other, and the engines take
        # turns: the machine's speed drifts (other tenants, clocks), and every figure should
        # meet the same drift.
        for rep in range(config.repeats):
            step = f"{rep + 1}/{config.repeats}"
            for name in engines:
                if name in embedded:
                    report(f"embedded {step}: bonewatch process on {config.images} images ({name})")
                    embedded[name].append(
                        measure_embedded(
                            work.root,
                            images,
                            config.images,
                            bundle_dir,
                            replace(config, engine=name),
                            tag=f"-{name}-{rep + 1}",
                        )
                    )
                report(f"bare {step}: {len(x)} preprocessed images ({name})")
                img_s, groups = bare_pass(
                    loaded[name], x, config.batch_size, config.threads_for(name).streams
                )
                bare[name].append(img_s)
        # Images per forward pass, as each engine settled it (0: the whole batch)
        per_pass = {name: bundle.body_part_model.forward_batch for name, bundle in loaded.items()}
        del x, loaded

        distributed_img_s: float | None = None
        scaling: dict[int, list[float]] = {}
        distributed_runs: list[float] = []
        why_not = distributed_unavailable(config)
        if why_not is None:
            # The figure's own worker count and any asked for take turns, --repeats times.
            counts = tuple(dict.fromkeys((*config.scale_workers, workers)))
            runs = measure_scaling(
                work.root, bundle_dir, replace(config, scale_workers=counts), report
            )
            distributed_runs = runs[workers]
            distributed_img_s = median(distributed_runs)
            scaling = {n: runs[n] for n in config.scale_workers}
        else:
            report(f"distributed: not measured: {why_not}")

        seed_files = files[: max(1, min(config.seed_style_images, len(files)))]
        report(
            f"seed-style: model.predict per image per stage, {len(seed_files)} images, "
            f"{config.repeats} time(s)"
        )
        seed_runs = measure_seed_style(bundle_dir, seed_files, config.repeats)
        load_after = os.getloadavg()[0]
    finally:
        work.close()

    bare_by_engine = {name: median(runs) for name, runs in bare.items()}
    embedded_by_engine = {name: median([r.img_s for r in runs]) for name, runs in embedded.items()}
    bare_img_s = bare_by_engine.get(engine)
    embedded_img_s = embedded_by_engine[engine]
    seed_style = median(seed_runs)
    chosen_runs = embedded[engine]
    peak_by_engine = {k: peak(runs) for k, runs in embedded.items()}
    return {
        "engine": engine,
        "backbone": config.backbone,
        "input_size": config.input_size,
        "images": config.images,
        "image_px": config.image_px,
        "batch_size": config.batch_size,
        "decode_workers": config.decode_workers,
        "threads": threads_report(config.threads_for(engine), per_pass[engine]),
        "threads_by_engine": {k: threads_report(config.threads_for(k), per_pass[k]) for k in bare},
        "repeats": config.repeats,
        "bare_img_s": rounded(bare_img_s),
        "bare_img_s_by_engine": {k: rounded(v) for k, v in bare_by_engine.items()},
        "bare_runs_img_s": {k: [rounded(v) for v in runs] for k, runs in bare.items()},
        "bare_images": min(config.images, BARE_MAX_IMAGES),
        "stage2_groups_per_batch": round(groups, 2),
        "seed_style_img_s": rounded(seed_style),
        "seed_style_runs_img_s": [rounded(v) for v in seed_runs],
        "seed_style_images": len(seed_files),
        "embedded_img_s": rounded(embedded_img_s),
        "embedded_img_s_by_engine": {k: rounded(v) for k, v in embedded_by_engine.items()},
        "embedded_runs_img_s": {
            k: [rounded(r.img_s) for r in runs] for k, runs in embedded.items()
        },
        "embedded_wall_s": rounded(median([r.wall_s for r in chosen_runs])),
        "distributed_img_s": rounded(distributed_img_s),
        "distributed_runs_img_s": [rounded(r) for r in distributed_runs],
        "distributed_workers": config.distributed_workers
        if distributed_img_s is not None
        else None,
        "distributed_note": why_not,
        "embedded_vs_bare": ratio(embedded_img_s, bare_img_s),
        "embedded_vs_seed_style": ratio(embedded_img_s, seed_style),
        "distributed_vs_bare": ratio(distributed_img_s, bare_img_s),
        "distributed_scaling": scaling_report(scaling, bare_img_s),
        "onnx_vs_keras_bare": ratio(bare_by_engine.get("onnx"), bare_by_engine.get("keras")),
        "onnx_vs_keras_embedded": ratio(
            embedded_by_engine.get("onnx"), embedded_by_engine.get("keras")
        ),
        "peak_rss_mb": rounded(peak_by_engine[engine]),
        "peak_rss_mb_by_engine": {k: rounded(v) for k, v in peak_by_engine.items()},
        "register_files_s": rounded(register_s),
        "register_files": config.register_files,
        "machine": machine_description(),
        "load_avg_1m": {"before": round(load_before, 2), "after": round(load_after, 2)},
    }
