"""A whole bench run: every figure on the same machine, repeats interleaved, one report.

Within each repetition every engine and precision's embedded run is followed by its bare pass,
and they take turns, so that a machine whose speed drifts (shared hosts do) slows every figure
alike.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from bonewatch.bench.bare import BARE_MAX_IMAGES, bare_pass
from bonewatch.bench.bundle import bench_bundle
from bonewatch.bench.config import BENCH_SALT, BenchConfig, BenchError, Report
from bonewatch.bench.distributed import distributed_unavailable, measure_scaling, scaling_report
from bonewatch.bench.figures import (
    machine_description,
    median,
    ratio,
    rounded,
    shared_core_bound,
    threads_report,
)
from bonewatch.bench.inputs import WorkDir, phantom_set
from bonewatch.bench.ledger import LedgerRun, measure_embedded, measure_registration, peak
from bonewatch.bench.seed_style import measure_seed_style
from bonewatch.ingest import read_image
from bonewatch.models.bundle import (
    Bundle,
    BundleError,
    Manifest,
    load_bundle,
    read_manifest,
    resolve_engine,
    resolve_precision,
    servable_engines,
)
from bonewatch.models.engines import (
    AUTO,
    configure_tensorflow_threads,
    cpu_supports_bf16,
    default_streams,
    openvino_available,
)
from bonewatch.models.preprocess import preprocess_batch
from bonewatch.worker.pipeline import decoding_pool

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
    "precision",
    "decode_img_s",
    "decode_processes_img_s",
    "decode_one_thread_img_s",
    "embedded_bound_img_s",
    "embedded_vs_bound",
    "by_engine_precision",
    "int8_vs_fp32_embedded",
    "peak_rss_mb",
    "register_files_s",
)


# Files the decode figures read (as the worker decodes, in threads and in processes, and in full).
DECODE_MAX_IMAGES = 64
# Of those, the files decoded on one thread: each image's decoding cost, for the shared-core bound.
DECODE_ONE_THREAD_IMAGES = 32


@dataclass(frozen=True)
class Variant:
    """An engine and the precision it serves in: one row of ``by_engine_precision``."""

    engine: str
    precision: str

    @property
    def tag(self) -> str:
        return f"{self.engine}-{self.precision}"


def variants_of(
    manifest: Manifest, config: BenchConfig, chosen: Variant
) -> tuple[list[Variant], list[str]]:
    """What to measure: every engine here and each precision it can serve the bundle in
    (``--one-engine``: the chosen one only), and why any precision is left out."""
    if not config.compare_engines:
        return [chosen], []
    engines = servable_engines(manifest)
    if manifest.has_onnx() and openvino_available():
        engines.append("openvino")
    notes = []
    if "openvino" in engines and not cpu_supports_bf16():
        notes.append("bf16: not measured, this CPU has no native bfloat16")
    if manifest.has_onnx() and not manifest.has_int8():
        notes.append("int8: not measured, the bundle has no int8 models")
    out = []
    for engine in engines:
        for precision in ("fp32", "int8", "bf16"):
            try:
                if resolve_precision(manifest, engine, precision) == precision:
                    out.append(Variant(engine, precision))
            except BundleError:
                continue
    if chosen not in out:
        out.append(chosen)
    return out, notes


def load_variants(
    bundle_dir: Path, variants: list[Variant], config: BenchConfig
) -> tuple[dict[Variant, Bundle], list[str]]:
    """Each variant loaded here and warmed up; one whose load fails (OpenVINO's parity check
    against ONNX Runtime) is left out, with the reason."""

    loaded, notes = {}, []
    for v in variants:
        try:
            bundle = load_bundle(
                bundle_dir,
                engine=v.engine,
                precision=v.precision,
                threads=config.threads_for(v.engine),
            )
        except BundleError as exc:
            notes.append(f"{v.engine} {v.precision}: not measured, {exc}")
            continue
        bundle.warm_up()
        loaded[v] = bundle
    return loaded, notes


def measure_decode(
    files: list[Path], min_side: int | None, workers: int, *, processes: bool = False
) -> float:
    """Images per second decoded on ``workers`` threads (or, with ``processes``, in that many
    decoding processes, the pixels sent back), as the worker decodes them (with ``min_side``:
    JPEG 2000 and JPEG at the smallest scale covering twice it)."""
    decode = partial(read_image, salt=BENCH_SALT, min_side=min_side)
    with contextlib.ExitStack() as stack:
        if processes:
            pool: Executor = stack.enter_context(decoding_pool(workers))
            list(pool.map(decode, files[:workers]))  # started, and the first of its size seen
        else:
            pool = stack.enter_context(ThreadPoolExecutor(workers, thread_name_prefix="bench"))
            decode(files[0])  # first of its size: weights
        start = time.perf_counter()
        for _ in pool.map(decode, files):
            pass
        return len(files) / (time.perf_counter() - start)


def run_bench(
    config: BenchConfig, *, work_dir: Path | None = None, report: Report = log.info
) -> dict[str, Any]:
    """Measure every figure in one run; returns the report (see :data:`REPORT_KEYS`).

    Bare, seed-style and embedded figures are medians of ``config.repeats`` runs; where several
    engines and precisions are measured they take turns, so a slow spell of the machine falls
    on all of them.
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
        auto_trials: list[dict[str, Any]] = []
        if config.precision == AUTO:  # as the worker chooses: measured here, now
            report("auto: measuring stage 1 on each engine and precision")
            served = load_bundle(
                bundle_dir, engine=config.engine, precision=AUTO, threads=config.threads_for(engine)
            )
            auto_trials = [asdict(t) for t in served.trials]
            chosen = Variant(served.engine, served.precision)
            config = replace(config, engine=served.engine, precision=served.precision)
        else:
            chosen = Variant(engine, resolve_precision(manifest, engine, config.precision))
        engine = chosen.engine
        variants, notes = variants_of(manifest, config, chosen)
        workers = config.distributed_workers
        if workers is None:  # as many as `bonewatch worker` starts
            workers = default_streams(engine)
            config = replace(config, distributed_workers=workers)
        images = work.root / "images"
        report(f"phantoms: {config.images} {config.input_format} files of {config.image_px} px")
        files = phantom_set(images, config, distinct=None)

        min_side = max(entry.spec.input_size for entry in manifest.models().values())
        decode_files = files[:DECODE_MAX_IMAGES]
        report(f"decode: {len(decode_files)} files, reduced where it applies, then in full")
        decode_img_s = measure_decode(decode_files, min_side, config.decode_workers)
        decoded_px = max(read_image(files[0], salt=BENCH_SALT, min_side=min_side).pixels.shape)
        decode_full_img_s = measure_decode(decode_files, None, config.decode_workers)
        decode_processes_img_s = measure_decode(
            decode_files, min_side, config.decode_workers, processes=True
        )
        decode_one_thread_img_s = measure_decode(
            decode_files[:DECODE_ONE_THREAD_IMAGES], min_side, 1
        )

        report(f"registration: {config.register_files} small files")
        shutil.rmtree(work.root / "small-files", ignore_errors=True)
        shutil.rmtree(work.root / "register-ledger", ignore_errors=True)
        register_s = measure_registration(work.root, config.register_files, config)

        spec = manifest.body_part.spec
        bare_files = files[:BARE_MAX_IMAGES]
        x = preprocess_batch([read_image(p, salt=BENCH_SALT).pixels for p in bare_files], spec)
        loaded, load_notes = load_variants(bundle_dir, variants, config)
        notes += load_notes
        if chosen not in loaded:
            raise BenchError(f"the chosen engine cannot serve the bundle: {'; '.join(notes)}")
        variants = [v for v in variants if v in loaded]
        embedded: dict[Variant, list[LedgerRun]] = {v: [] for v in variants}
        bare: dict[Variant, list[float]] = {v: [] for v in variants}
        groups = 0.0
        # Each variant's embedded run and its bare pass follow each other, and the variants
        # take turns: the machine's speed drifts (other tenants, clocks), and every figure
        # should meet the same drift.
        for rep in range(config.repeats):
            step = f"{rep + 1}/{config.repeats}"
            for v in variants:
                name = f"{v.engine} {v.precision}"
                report(f"embedded {step}: bonewatch process on {config.images} images ({name})")
                embedded[v].append(
                    measure_embedded(
                        work.root,
                        images,
                        config.images,
                        bundle_dir,
                        replace(config, engine=v.engine, precision=v.precision),
                        tag=f"-{v.tag}-{rep + 1}",
                    )
                )
                report(f"bare {step}: {len(x)} preprocessed images ({name})")
                img_s, groups = bare_pass(
                    loaded[v], x, config.batch_size, config.threads_for(v.engine).streams
                )
                bare[v].append(img_s)
        # Images per forward pass, as each engine settled it (0: the whole batch)
        per_pass = {v.engine: b.body_part_model.forward_batch for v, b in loaded.items()}
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

    bare_of = {v: median(runs) for v, runs in bare.items()}
    embedded_of = {v: median([r.img_s for r in runs]) for v, runs in embedded.items()}
    peak_of = {v: peak(runs) for v, runs in embedded.items()}
    # The figures by engine are each engine's fp32 ones, as before precisions were measured.
    fp32 = {v.engine: v for v in variants if v.precision == "fp32"}
    bare_by_engine = {e: bare_of[v] for e, v in fp32.items()}
    embedded_by_engine = {e: embedded_of[v] for e, v in fp32.items()}
    bare_img_s = bare_of[chosen]
    embedded_img_s = embedded_of[chosen]
    seed_style = median(seed_runs)
    int8_runs = [embedded_of[v] for v in variants if v.precision == "int8"]
    best_int8 = max((f for f in int8_runs if f is not None), default=None)
    onnx_fp32 = embedded_of.get(Variant("onnx", "fp32"))
    machine = machine_description()
    bound_of = {
        v: shared_core_bound(bare_of[v], decode_one_thread_img_s, machine["cores"])
        for v in variants
    }
    return {
        "engine": engine,
        "precision": chosen.precision,
        # auto's measurement of stage 1 on each candidate (empty when --precision was given)
        "auto_trials": auto_trials,
        "backbone": config.backbone,
        "input_size": config.input_size,
        "input": config.input_format,
        "images": config.images,
        "image_px": config.image_px,
        "batch_size": config.batch_size,
        "decode_workers": config.decode_workers,
        "threads": threads_report(config.threads_for(engine), per_pass[engine]),
        "threads_by_engine": {
            e: threads_report(config.threads_for(e), n) for e, n in per_pass.items()
        },
        "repeats": config.repeats,
        "decode_img_s": rounded(decode_img_s),
        "decode_full_img_s": rounded(decode_full_img_s),
        "decode_processes_img_s": rounded(decode_processes_img_s),
        "decode_one_thread_img_s": rounded(decode_one_thread_img_s),
        "decode_min_side": min_side,
        "decoded_px": decoded_px,  # the long side the worker decodes a file at
        "bare_img_s": rounded(bare_img_s),
        "bare_img_s_by_engine": {k: rounded(v) for k, v in bare_by_engine.items()},
        "bare_runs_img_s": {v.tag: [rounded(r) for r in runs] for v, runs in bare.items()},
        "bare_images": min(config.images, BARE_MAX_IMAGES),
        "stage2_groups_per_batch": round(groups, 2),
        "seed_style_img_s": rounded(seed_style),
        "seed_style_runs_img_s": [rounded(v) for v in seed_runs],
        "seed_style_images": len(seed_files),
        "embedded_img_s": rounded(embedded_img_s),
        "embedded_img_s_by_engine": {k: rounded(v) for k, v in embedded_by_engine.items()},
        "embedded_runs_img_s": {
            v.tag: [rounded(r.img_s) for r in runs] for v, runs in embedded.items()
        },
        "embedded_wall_s": rounded(median([r.wall_s for r in embedded[chosen]])),
        "by_engine_precision": [
            {
                "engine": v.engine,
                "precision": v.precision,
                "bare_img_s": rounded(bare_of[v]),
                "embedded_img_s": rounded(embedded_of[v]),
                "embedded_vs_bare": ratio(embedded_of[v], bare_of[v]),
                "bound_img_s": rounded(bound_of[v]),
                "embedded_vs_bound": ratio(embedded_of[v], bound_of[v]),
                "peak_rss_mb": rounded(peak_of[v]),
            }
            for v in variants
        ],
        "precision_notes": notes,
        "int8_vs_fp32_embedded": ratio(best_int8, onnx_fp32),
        "distributed_img_s": rounded(distributed_img_s),
        "distributed_runs_img_s": [rounded(r) for r in distributed_runs],
        "distributed_workers": config.distributed_workers
        if distributed_img_s is not None
        else None,
        "distributed_note": why_not,
        "embedded_vs_bare": ratio(embedded_img_s, bare_img_s),
        # decoding and inference on the same cores: bare inference plus one thread's decode
        "embedded_bound_img_s": rounded(bound_of[chosen]),
        "embedded_vs_bound": ratio(embedded_img_s, bound_of[chosen]),
        "embedded_vs_seed_style": ratio(embedded_img_s, seed_style),
        "distributed_vs_bare": ratio(distributed_img_s, bare_img_s),
        "distributed_scaling": scaling_report(scaling, bare_img_s),
        "onnx_vs_keras_bare": ratio(bare_by_engine.get("onnx"), bare_by_engine.get("keras")),
        "onnx_vs_keras_embedded": ratio(
            embedded_by_engine.get("onnx"), embedded_by_engine.get("keras")
        ),
        "peak_rss_mb": rounded(peak_of[chosen]),
        "peak_rss_mb_by_engine": {e: rounded(peak_of[v]) for e, v in fp32.items()},
        "register_files_s": rounded(register_s),
        "register_files": config.register_files,
        "machine": machine,
        "load_avg_1m": {"before": round(load_before, 2), "after": round(load_after, 2)},
    }
