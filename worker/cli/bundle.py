"""Model bundles: ``bundle show`` and ``bundle export-onnx``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from bonewatch.worker.cli._common import OutputFormat, err, fail, out


def show(
    bundle_dir: Annotated[Path, typer.Argument(metavar="B", help="Bundle folder.")],
    fmt: Annotated[OutputFormat, typer.Option("--format", help="table or json.")] = (
        OutputFormat.table
    ),
) -> None:
    """Print a bundle's manifest as a model card."""
    from bonewatch.models.bundle import BundleError, read_manifest
    from bonewatch.worker import reports

    try:
        manifest = read_manifest(bundle_dir)
    except BundleError as exc:
        fail(str(exc))
    data = manifest.model_dump()
    if fmt is OutputFormat.json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    for renderable in reports.model_card(manifest):
        out.print(renderable)


def export_onnx(
    bundle_dir: Annotated[Path, typer.Argument(metavar="B", help="Bundle folder.")],
    opset: Annotated[int, typer.Option(min=13, help="ONNX opset.")] = 17,
) -> None:
    """Add ONNX models to a bundle (for BONEWATCH_ENGINE=onnx) and record them in its manifest.

    Each export is checked against its Keras model on phantoms and refused if any output
    differs by more than 1e-4.
    """
    from bonewatch.models.bundle import BundleError
    from bonewatch.models.onnx_export import export_onnx

    try:
        _, exported = export_onnx(bundle_dir, opset=opset, report=lambda m: err.print(m))
    except BundleError as exc:
        fail(str(exc), code=1)
    for item in exported:
        out.print(f"{item.role}: {item.file} (max |keras - onnx| {item.max_abs_diff:.1e})")
    out.print(f"{len(exported)} ONNX model(s) recorded in {bundle_dir / 'manifest.json'}")
