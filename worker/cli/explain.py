"""Grad-CAM for one file: ``explain``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from bonewatch.worker.cli._common import (
    BundleOpt,
    TableOrJson,
    fail,
    out,
    settings_from,
    warn_if_not_clinical,
)


def explain(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="DICOM, PNG or JPEG radiograph.")],
    out_png: Annotated[
        Path | None,
        typer.Option("--out", help="PNG to write (default ./<FILE stem>-gradcam.png)."),
    ] = None,
    bundle: BundleOpt = None,
    part: Annotated[
        str | None,
        typer.Option(help="Explain this part's fracture model instead of stage 1's choice."),
    ] = None,
    fmt: Annotated[TableOrJson, typer.Option("--format", help="table or json.")] = (
        TableOrJson.table
    ),
) -> None:
    """Write a Grad-CAM heatmap of one radiograph.

    FILE with the heatmap of its part's fracture model over it."""
    from bonewatch.ingest import IngestError
    from bonewatch.models.bundle import BundleError, load_bundle
    from bonewatch.worker.heatmaps import ExplainRefused, explain_file

    if not file.is_file():
        fail(f"no such file: {file}")
    settings = settings_from(bundle=bundle)
    warn_if_not_clinical(settings)
    target = out_png or Path.cwd() / f"{file.stem}-gradcam.png"
    try:
        loaded = load_bundle(settings.bundle, digest=settings.bundle_sha256)
        result = explain_file(file, loaded, settings, out=target.absolute(), part=part)
    except BundleError as exc:
        fail(str(exc), code=1)
    except IngestError as exc:
        fail(f"{file}: {exc.reason}", code=1)
    except (ExplainRefused, ValueError) as exc:
        fail(str(exc), code=1)
    if fmt is TableOrJson.json:
        sys.stdout.write(json.dumps(result.to_json()) + "\n")
        return
    label = "positive" if result.p_fracture >= result.threshold else "negative"
    out.print(
        f"{result.part} fracture model: p(fracture) {result.p_fracture:.3f} (threshold "
        f"{result.threshold:.3f}: {label}); heatmap peak at x={result.peak_xy[0]}, "
        f"y={result.peak_xy[1]} (layer {result.layer}); written to {result.heatmap}"
    )
