"""Grad-CAM heatmap files: the worker's store for positive images, and ``bonewatch explain``.

The maps themselves come from :mod:`models.gradcam`; this module only decides where they go and
writes them. Files are written under a temporary name and renamed, so a reader (or a crash)
never sees half a PNG.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bonewatch.db import ClaimedImage
from bonewatch.ingest import DecodedImage, check_acceptance, read_image
from bonewatch.models.bundle import Bundle
from bonewatch.models.cascade import Prediction
from bonewatch.worker.settings import Settings

log = logging.getLogger(__name__)


def write_rgb_png(path: Path, rgb: np.ndarray) -> None:
    """Write a uint8 (H, W, 3) array as a PNG, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            Image.fromarray(rgb, mode="RGB").save(fh, format="PNG")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def heatmap_path(folder: Path, bundle: Bundle, image_id: int) -> Path:
    """Where the worker keeps an image's heatmap: one folder per bundle version."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{bundle.name}-{bundle.version}")
    return folder / name / f"{image_id}.png"


def store_heatmaps(
    bundle: Bundle,
    images: Sequence[tuple[ClaimedImage, DecodedImage, float]],
    outcomes: Sequence[Prediction | Exception],
    settings: Settings,
) -> dict[int, str]:
    """Write a heatmap PNG for every image the cascade called positive.

    A heatmap that cannot be made costs only the heatmap: the error is logged and the image's
    prediction is recorded without one.

    Returns:
        Image id to the heatmap's absolute path.
    """
    from bonewatch.models.gradcam import explain_images, overlay_heatmap

    positives = [
        (claim, image, pred)
        for (claim, image, _), pred in zip(images, outcomes, strict=True)
        if isinstance(pred, Prediction) and pred.label == "positive"
    ]
    if not positives:
        return {}
    folder = settings.resolved_heatmap_dir.absolute()
    try:
        explanations = explain_images(
            [image.pixels for _, image, _ in positives],
            [pred.body_part for _, _, pred in positives],
            bundle,
            batch_size=settings.batch_size,
        )
    except Exception:
        log.exception("Grad-CAM failed on a batch of %d positive images", len(positives))
        return {}
    paths: dict[int, str] = {}
    for (claim, image, _), explanation in zip(positives, explanations, strict=True):
        path = heatmap_path(folder, bundle, claim.image_id)
        try:
            write_rgb_png(path, overlay_heatmap(image.pixels, explanation.heatmap))
        except OSError:
            log.exception("could not write the heatmap of %s to %s", claim.path, path)
            continue
        paths[claim.image_id] = str(path)
    return paths


class ExplainRefused(Exception):
    """Stage 1 refused the image, so there is no fracture model to explain."""


@dataclass(frozen=True)
class ExplainedFile:
    """What ``bonewatch explain`` produced for one file."""

    heatmap: Path
    peak_xy: tuple[int, int]
    p_fracture: float
    part: str
    threshold: float
    layer: str

    def to_json(self) -> dict[str, object]:
        """The output contract of ``bonewatch explain --format json``."""
        return {
            "heatmap": str(self.heatmap),
            "peak_xy": [self.peak_xy[0], self.peak_xy[1]],
            "p_fracture": round(self.p_fracture, 6),
        }


def explain_file(
    path: Path, bundle: Bundle, settings: Settings, *, out: Path, part: str | None = None
) -> ExplainedFile:
    """Read one radiograph, explain its part's fracture model and write the overlay to ``out``.

    Args:
        part: Explain this part's model; when None, the part stage 1 chooses.

    Raises:
        IngestError: the file cannot be read or is not an upper-limb radiograph.
        ExplainRefused: stage 1 refused the image and no ``part`` was given.
        ValueError: ``part`` has no fracture model in the bundle.
    """
    from bonewatch.models.cascade import run_cascade
    from bonewatch.models.gradcam import explain_images, overlay_heatmap

    # The PatientID hash is never kept here, so no site salt is needed (nor created).
    image = read_image(
        path,
        salt="explain",
        max_pixels=settings.max_pixels,
        max_bytes=settings.max_file_bytes,
    )
    check_acceptance(image.meta)
    if part is None:
        prediction = run_cascade([image], bundle, batch_size=1)[0]
        if prediction.p_fracture is None:
            raise ExplainRefused(f"{prediction.reason}; pass --part to explain a part's model")
        part = prediction.body_part
    part = part.upper()
    if part not in bundle.fracture_models:
        known = ", ".join(bundle.fracture_models)
        raise ValueError(f"the bundle has no fracture model for {part}; it has {known}")
    explanation = explain_images([image.pixels], [part], bundle)[0]
    write_rgb_png(out, overlay_heatmap(image.pixels, explanation.heatmap))
    return ExplainedFile(
        heatmap=out,
        peak_xy=explanation.peak_xy,
        p_fracture=explanation.p_fracture,
        part=part,
        threshold=bundle.manifest.fracture[part].threshold,
        layer=explanation.layer,
    )
