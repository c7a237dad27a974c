"""Throughput measurement: ``bench``."""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from bonewatch.worker.cli._common import TableOrJson, cell, err, fail, out, settings_from


class EngineChoice(StrEnum):
    auto = "auto"
    keras = "keras"
    onnx = "onnx"
    openvino = "openvino"


class PrecisionChoice(StrEnum):
    auto = "auto"
    fp32 = "fp32"
    int8 = "int8"
    bf16 = "bf16"


class InputChoice(StrEnum):
    png = "png"
    dicom = "dicom"
    dicom_j2k = "dicom-j2k"
    dicom_jpegls = "dicom-jpegls"


# The phantoms' long side: a CR's full size, and the RSS track's smaller default (10,000 files).
IMAGE_PX = 2000
RSS_IMAGE_PX = 512


def bench(
    images: Annotated[int, typer.Option(min=1, help="Phantom images to process.")] = 200,
    backbone: Annotated[str, typer.Option(help="small_cnn, densenet121, ...")] = "densenet121",
    input_size: Annotated[int, typer.Option(min=8, help="Model input side in pixels.")] = 224,
    engine: Annotated[
        EngineChoice | None, typer.Option(help="Engine of the worker runs (BONEWATCH_ENGINE).")
    ] = None,
    precision: Annotated[
        PrecisionChoice | None,
        typer.Option(help="The engine's precision (BONEWATCH_PRECISION)."),
    ] = None,
    input_format: Annotated[
        InputChoice,
        typer.Option(
            "--input", help="Phantoms as PNG or 12-bit CR DICOM: uncompressed, JPEG 2000, JPEG-LS."
        ),
    ] = InputChoice.png,
    image_size: Annotated[
        int | None,
        typer.Option(
            min=32,
            help=f"Long side of the phantoms in px (default {IMAGE_PX}, or {RSS_IMAGE_PX} with "
            "--rss-track).",
        ),
    ] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Images per batch.")] = None,
    inference_streams: Annotated[
        int | None,
        typer.Option(
            min=0, help="Batches in inference at once (BONEWATCH_INFERENCE_STREAMS; 0 = auto)."
        ),
    ] = None,
    forward_batch: Annotated[
        int | None,
        typer.Option(
            min=0, help="Most images per forward pass (BONEWATCH_FORWARD_BATCH; 0 = the engine's)."
        ),
    ] = None,
    seed_style_images: Annotated[
        int, typer.Option(min=1, help="Images served one at a time with model.predict.")
    ] = 32,
    register_files: Annotated[
        int, typer.Option(min=1, help="Small files registered to measure registration.")
    ] = 2000,
    distributed_workers: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Worker processes for the distributed figure (default: as many as `bonewatch "
            "worker` starts); 0 skips it.",
        ),
    ] = None,
    broker_url: Annotated[str, typer.Option(help="Redis for the distributed figure.")] = (
        "redis://127.0.0.1:6379/14"
    ),
    distributed_database_url: Annotated[
        str, typer.Option(help="PostgreSQL database for the distributed figure.")
    ] = "postgresql+psycopg://postgres@127.0.0.1:5432/bonewatch_bench",
    scale_workers: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated worker-process counts (1,2): the distributed figure for each, "
            "counts taking turns, --repeats times."
        ),
    ] = None,
    repeats: Annotated[
        int,
        typer.Option(min=1, help="Runs of each figure (engines in turn); medians are reported."),
    ] = 3,
    compare_engines: Annotated[
        bool,
        typer.Option(
            "--compare-engines/--one-engine",
            help="Measure every engine and precision here, or --engine and --precision only.",
        ),
    ] = True,
    rss_track: Annotated[
        bool,
        typer.Option(
            "--rss-track", help="Instead: one long run, resident memory against images done."
        ),
    ] = False,
    work_dir: Annotated[
        Path | None, typer.Option(help="Keep the bundle, images and ledgers here.")
    ] = None,
    fmt: Annotated[TableOrJson, typer.Option("--format", help="table or json.")] = (
        TableOrJson.table
    ),
) -> None:
    """Measure throughput on this machine.

    The engine's limit, seed-style serving, embedded and distributed.

    Builds a randomly initialised two-stage bundle with BACKBONE (with int8 models), writes
    phantoms in the --input encoding and runs them through each path on this machine, on every
    engine and precision here.
    """
    from bonewatch.models.extras import require_train

    require_train("bench")  # it builds its bundle with Keras
    from bonewatch.bench import BenchConfig, BenchError, run_bench, run_rss_track

    config = BenchConfig.from_settings(
        settings_from(
            engine=engine.value if engine else None,
            precision=precision.value if precision else None,
            batch_size=batch_size,
            inference_streams=inference_streams,
            forward_batch=forward_batch,
        ),
        images=images,
        image_px=image_size or (RSS_IMAGE_PX if rss_track else IMAGE_PX),
        input_format=input_format.value,
        backbone=backbone,
        input_size=input_size,
        seed_style_images=seed_style_images,
        register_files=register_files,
        distributed_workers=distributed_workers,
        broker_url=broker_url,
        distributed_database_url=distributed_database_url,
        repeats=repeats,
        compare_engines=compare_engines,
        scale_workers=_worker_counts(scale_workers) if scale_workers else None,
    )
    try:
        if rss_track:
            report = run_rss_track(config, work_dir=work_dir, report=lambda m: err.print(m))
        else:
            report = run_bench(config, work_dir=work_dir, report=lambda m: err.print(m))
    except (BenchError, ValueError) as exc:
        fail(str(exc), code=1)
    if fmt is TableOrJson.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    table = Table("figure", "value")
    for key, value in report.items():
        if key != "samples":
            table.add_row(key, json.dumps(value) if isinstance(value, dict | list) else cell(value))
    out.print(table)


def _worker_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise typer.BadParameter(
            f"{text!r} is not a list of worker counts such as 1,2", param_hint="--scale-workers"
        )
    return tuple(dict.fromkeys(counts))
