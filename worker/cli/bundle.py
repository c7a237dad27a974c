"""Model bundles: ``bundle show``, ``bundle export-onnx`` and ``bundle quantize``."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from bonewatch.worker.cli._common import TableOrJson, err, fail, out

# The phantom studies `bundle quantize` compares the cascades on when no --heldout is given: a
# seed no bundle trained or calibrated on.
HELDOUT_SEED = 90210


def show(
    bundle_dir: Annotated[Path, typer.Argument(metavar="B", help="Bundle folder.")],
    fmt: Annotated[TableOrJson, typer.Option("--format", help="table or json.")] = (
        TableOrJson.table
    ),
) -> None:
    """Print a bundle's manifest as a model card."""
    from bonewatch.models.bundle import BundleError, bundle_digest, read_manifest
    from bonewatch.worker import reports

    try:
        manifest = read_manifest(bundle_dir)
    except BundleError as exc:
        fail(str(exc))
    data = manifest.model_dump()
    if fmt is TableOrJson.json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    for renderable in reports.model_card(manifest):
        out.print(renderable)
    out.print(f"digest (pin it with BONEWATCH_BUNDLE_SHA256): {bundle_digest(bundle_dir)}")


def export_onnx(
    bundle_dir: Annotated[Path, typer.Argument(metavar="B", help="Bundle folder.")],
    opset: Annotated[int, typer.Option(min=13, help="ONNX opset.")] = 17,
) -> None:
    """Add ONNX models to a bundle, checked against Keras.

    For BONEWATCH_ENGINE=onnx; they are recorded in its manifest.

    Each export is checked against its Keras model on phantoms and refused if any output
    differs by more than 1e-4. Fracture models also get a class activation output, so heatmaps
    need no TensorFlow. Needs the [train] extra.
    """
    from bonewatch.models.bundle import BundleError
    from bonewatch.models.onnx_export import export_onnx

    try:
        _, exported = export_onnx(bundle_dir, opset=opset, report=lambda m: err.print(m))
    except BundleError as exc:
        fail(str(exc), code=1)
    for item in exported:
        cam = f"; class activation output at {item.cam_layer}" if item.cam_layer else ""
        out.print(f"{item.role}: {item.file} (max |keras - onnx| {item.max_abs_diff:.1e}{cam})")
    out.print(f"{len(exported)} ONNX model(s) recorded in {bundle_dir / 'manifest.json'}")


def quantize(
    bundle_dir: Annotated[Path, typer.Argument(metavar="B", help="Bundle folder.")],
    calibrate: Annotated[
        Path | None,
        typer.Option(help="Dataset to calibrate on (any layout `train` reads); default phantoms."),
    ] = None,
    heldout: Annotated[
        Path | None,
        typer.Option(help="Labelled dataset to compare on; default phantoms of another seed."),
    ] = None,
    calibration_images: Annotated[int, typer.Option(min=8, help="Images per model.")] = 120,
    heldout_studies: Annotated[int, typer.Option(min=20, help="Phantom studies held out.")] = 300,
    tolerance_auroc: Annotated[
        float, typer.Option(min=0.0, help="Largest study-AUROC drop accepted.")
    ] = 0.005,
    tolerance_accuracy: Annotated[
        float, typer.Option(min=0.0, help="Largest body-part accuracy drop accepted.")
    ] = 0.005,
) -> None:
    """Add int8 ONNX models to a bundle, checked for accuracy.

    Static QDQ, per-channel, S8S8 with 7-bit weights (for BONEWATCH_PRECISION).

    Calibrated on images of the bundle's kind through its preprocessing, then the int8 cascade
    is compared with the fp32 one on held-out data; over the tolerance nothing is added.
    """
    from bonewatch.models.bundle import BundleError
    from bonewatch.models.quantize import QuantizationRefused, quantize_bundle
    from bonewatch.worker.synth import synthesize

    try:
        with tempfile.TemporaryDirectory(prefix="bonewatch-heldout-") as work:
            source = None
            if heldout is None:
                heldout = Path(work) / "heldout"
                err.print(f"writing {heldout_studies} phantom studies of seed {HELDOUT_SEED}")
                synthesize(
                    heldout, studies=heldout_studies, fmt="png", seed=HELDOUT_SEED, split="valid"
                )
                source = f"phantoms, seed {HELDOUT_SEED}"
            _, models, comparison = quantize_bundle(
                bundle_dir,
                heldout=heldout,
                heldout_source=source,
                calibrate=calibrate,
                calibration_images=calibration_images,
                tolerance_auroc=tolerance_auroc,
                tolerance_accuracy=tolerance_accuracy,
                report=lambda m: err.print(m),
            )
    except QuantizationRefused as exc:
        err.print(json.dumps(exc.report["delta"], indent=2))
        fail(str(exc), code=1)
    except BundleError as exc:
        fail(str(exc), code=1)
    for item in models:
        out.print(f"{item.role}: {item.file} (max |fp32 - int8| {item.max_abs_diff:.1e})")
    out.print(json.dumps(comparison["delta"], indent=2))
    out.print(f"{len(models)} int8 model(s) recorded in {bundle_dir / 'manifest.json'}")
