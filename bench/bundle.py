"""The bench's random two-stage bundle: built once per backbone, size and seed, then reused.

A bench bundle has the structure and the cost of a real one (the chosen backbone for stage 1 and
for each part's fracture model) but random weights, since speed does not depend on them.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from bonewatch.bench.config import BenchConfig, Report
from bonewatch.models.bundle import (
    MANIFEST,
    OTHER,
    SCHEMA_VERSION,
    read_manifest,
    sha256_of,
    write_manifest,
)
from bonewatch.models.engines import onnxruntime_available
from bonewatch.models.phantoms import PARTS

BENCH_BUNDLE_NAME = "bench-random"
# Random heads would pick `other` for about one image in eight; a bias this low rules it out, so
# every image reaches stage 2 as it does in an upper-limb archive.
OTHER_BIAS = -30.0
# Phantoms each int8 model of a bench bundle is calibrated on (`bundle quantize` takes 120).
BENCH_CALIBRATION_IMAGES = 16


def build_random_bundle(
    out: Path,
    *,
    backbone: str,
    input_size: int,
    seed: int = 0,
    onnx: bool = True,
    report: Report | None = None,
) -> Path:
    """Write a randomly initialised two-stage bundle with ``backbone`` at ``input_size`` px.

    The seven fracture models share one weights file (they are still loaded as seven models),
    which keeps a DenseNet bundle's disk use at two models. With ``onnx``, ONNX exports are added
    as ``bonewatch bundle export-onnx`` adds them.

    Returns:
        The bundle folder.
    """
    from bonewatch.models.architectures import build_classifier, default_spec, set_random_seed

    out.mkdir(parents=True, exist_ok=True)
    set_random_seed(seed)
    spec = default_spec(backbone, input_size)
    labels = [*PARTS, OTHER]
    if report is not None:
        report(f"building a random {backbone} bundle at {input_size}px")
    stage1 = build_classifier(backbone, spec, len(labels), name="body_part")
    kernel, bias = stage1.get_layer("head").get_weights()
    bias[labels.index(OTHER)] = OTHER_BIAS
    stage1.get_layer("head").set_weights([kernel, bias])
    stage1.save(out / "body_part.keras")
    fracture_model = build_classifier(backbone, spec, 1, pooling="max", name="fracture")
    fracture_model.save(out / "fracture.keras")
    fracture_sha = sha256_of(out / "fracture.keras")
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "name": BENCH_BUNDLE_NAME,
        "version": f"{backbone}-{input_size}-seed{seed}",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "intended_use": "Benchmarking only: random weights, its outputs mean nothing.",
        "trained_on": {"dataset": None, "note": "not trained"},
        "body_part": {
            "weights": "body_part.keras",
            "sha256": sha256_of(out / "body_part.keras"),
            "preprocessing": spec.to_dict(),
            "backbone": backbone,
            "labels": labels,
            "confidence_floor": 0.0,
        },
        "fracture": {
            part: {
                "weights": "fracture.keras",
                "sha256": fracture_sha,
                "preprocessing": spec.to_dict(),
                "backbone": backbone,
                "threshold": 0.5,
                "threshold_rule": "fixed",
            }
            for part in PARTS
        },
    }
    write_manifest(out, manifest)
    if onnx:
        from bonewatch.models.onnx_export import export_onnx

        export_onnx(out, report=report)
        add_int8_models(out, report=report)
    return out


def add_int8_models(
    bundle_dir: Path,
    *,
    calibration_images: int = BENCH_CALIBRATION_IMAGES,
    report: Report | None = None,
) -> None:
    """Add int8 models to a random bench bundle as ``bundle quantize`` makes them (static QDQ,
    per channel, S8S8, calibrated on phantoms through the bundle's preprocessing), without its
    accuracy comparison: random weights have no accuracy to keep, and only speed is measured.
    """
    from bonewatch.models.engines import InferenceThreads, OnnxPredictor
    from bonewatch.models.onnx_export import max_output_difference, parity_inputs
    from bonewatch.models.quantize import calibration_inputs, quantize_model

    manifest = read_manifest(bundle_dir)
    data = json.loads((bundle_dir / MANIFEST).read_text(encoding="utf-8"))
    raw = {"body_part": data["body_part"]}
    raw.update({f"fracture_{p.lower()}": data["fracture"][p] for p in manifest.parts()})
    done: dict[str, tuple[str, float]] = {}  # fp32 sha256 -> (int8 file, gap)
    for role, entry in manifest.models().items():
        assert entry.onnx is not None
        if entry.onnx.sha256 not in done:
            if report is not None:
                report(f"quantizing {role} to int8 ({calibration_images} calibration phantoms)")
            fp32 = bundle_dir / entry.onnx.file
            int8 = fp32.with_suffix(".int8.onnx")
            x = calibration_inputs(role, entry.spec, n=calibration_images)
            quantize_model(fp32, int8, x)
            px = parity_inputs(entry.spec)
            threads = InferenceThreads()
            gap = max_output_difference(
                OnnxPredictor(fp32, threads)(px), OnnxPredictor(int8, threads)(px)
            )
            done[entry.onnx.sha256] = (int8.name, gap)
        name, gap = done[entry.onnx.sha256]
        raw[role]["int8"] = {
            "file": name,
            "sha256": sha256_of(bundle_dir / name),
            "max_abs_diff": gap,
            "quant_format": "QDQ",
            "per_channel": True,
            "weights": "S8",
            "activations": "S8",
        }
    data["quantization"] = {
        "method": "onnxruntime.quantization.quantize_static, QDQ, per-channel, S8S8, MinMax",
        "calibration": {"source": "phantoms", "images_per_model": calibration_images},
        "note": "benchmark bundle: random weights, so no accuracy comparison",
    }
    write_manifest(bundle_dir, data)


def bench_bundle(work: Path, config: BenchConfig, report: Report) -> Path:
    """The random bundle of ``config`` under ``work``, reused where a kept folder holds it."""
    folder = work / f"bundle-{config.backbone}-{config.input_size}-seed{config.seed}"
    if (folder / "manifest.json").is_file():
        manifest = read_manifest(folder)
        if not onnxruntime_available():
            return folder
        if manifest.has_onnx():
            if not manifest.has_int8():
                add_int8_models(folder, report=report)
            return folder
    return build_random_bundle(
        folder,
        backbone=config.backbone,
        input_size=config.input_size,
        seed=config.seed,
        onnx=onnxruntime_available(),
        report=report,
    )
