"""The bench's random two-stage bundle: built once per backbone, size and seed, then reused.

A bench bundle has the structure and the cost of a real one (the chosen backbone for stage 1 and
for each part's fracture model) but random weights, since speed does not depend on them.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from bonewatch.bench.config import BenchConfig, Report
from bonewatch.models.bundle import OTHER, SCHEMA_VERSION, read_manifest, sha256_of, write_manifest
from bonewatch.models.engines import onnxruntime_available
from bonewatch.models.phantoms import PARTS

BENCH_BUNDLE_NAME = "bench-random"
# Random heads would pick `other` for about one image in eight; a bias this low rules it out, so
# every image reaches stage 2 as it does in an upper-limb archive.
OTHER_BIAS = -30.0


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
    return out


def bench_bundle(work: Path, config: BenchConfig, report: Report) -> Path:
    """The random bundle of ``config`` under ``work``, reused where a kept folder holds it."""
    folder = work / f"bundle-{config.backbone}-{config.input_size}-seed{config.seed}"
    if (folder / "manifest.json").is_file():
        manifest = read_manifest(folder)
        if manifest.has_onnx() or not onnxruntime_available():
            return folder
    return build_random_bundle(
        folder,
        backbone=config.backbone,
        input_size=config.input_size,
        seed=config.seed,
        onnx=onnxruntime_available(),
        report=report,
    )
