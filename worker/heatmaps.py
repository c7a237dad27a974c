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
        os.chmod(tmp, 0o666 & ~_process_umask())  # mkstemp's 0600, widened only as the mask allows
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _process_umask() -> int:
    """This process's file-creation mask, read without changing it (Linux); 022 elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def with_caption(
    rgb: np.ndarray, lines: Sequence[str], *, warning: str | None = None
) -> np.ndarray:
    """``rgb`` with ``lines`` (light grey) and ``warning`` (yellow) burned into a darkened band
    along its bottom, so every viewer shows them; the picture keeps its size, and its
    coordinates stay those of the original. (Pure white stays the peak marker's colour.)"""
    from PIL import ImageDraw, ImageFont

    height, width = rgb.shape[:2]
    size = max(min(12, width // 8), width // 45)  # legible, yet leaves a small image visible
    texts = [*lines, *([warning] if warning else [])]
    font = ImageFont.load_default(size=size)
    longest = max(font.getlength(text) for text in texts)
    if longest > width - size:  # a narrow image: smaller letters, never cut at the edge
        size = max(6, int(size * (width - size) / longest))
        font = ImageFont.load_default(size=size)
    band = min(height, int(size * 1.35 * len(texts) + size * 0.6))
    picture = rgb.copy()
    picture[height - band :] = (picture[height - band :].astype(np.float32) * 0.25).astype(np.uint8)
    canvas = Image.fromarray(picture, mode="RGB")
    draw = ImageDraw.Draw(canvas)
    y = height - band + size * 0.3
    for i, text in enumerate(texts):
        colour = (255, 210, 0) if warning and i == len(texts) - 1 else (235, 235, 235)
        draw.text((size * 0.5, y), text, fill=colour, font=font)
        y += size * 1.35
    return np.asarray(canvas)


def caption_lines(bundle: Bundle, part: str, p_fracture: float, threshold: float) -> list[str]:
    """What a heatmap says about itself: the bundle, the part and the score against the
    threshold."""
    label = "positive" if p_fracture >= threshold else "negative"
    return [
        f"{bundle.name} {bundle.version} - {part}",
        f"p(fracture) {p_fracture:.3f}, threshold {threshold:.3f}: {label}",
    ]


def caption_warning(bundle: Bundle) -> str | None:
    """The notice burned into pictures of a bundle that is not for clinical use."""
    from bonewatch.worker.notices import is_not_for_clinical_use

    use = bundle.manifest.intended_use or ""
    if not is_not_for_clinical_use(use):
        return None
    if "phantom" in use.lower():
        return "NOT FOR CLINICAL USE - a demonstration model trained on phantoms"
    return "NOT FOR CLINICAL USE - see the bundle's intended use"


def picture_min_side(settings: Settings, input_size: int | None = None) -> int | None:
    """``read_image``'s ``min_side`` for pixels a heatmap is drawn over (and, with
    ``input_size``, that the models read too): JPEG 2000 and JPEG decode at the smallest scale
    whose long side covers the picture's 1,024 px; None (in full) without reduced decoding."""
    from bonewatch.models.gradcam import PICTURE_MIN_SIDE

    if not settings.reduced_decode:
        return None
    return max(PICTURE_MIN_SIDE, input_size or 0)


def heatmap_path(folder: Path, bundle: Bundle, image_id: int) -> Path:
    """Where the worker keeps an image's heatmap: one folder per bundle version."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{bundle.name}-{bundle.version}")
    return folder / name / f"{image_id}.png"


# Bundles (folder, engine/precision) already told that their heatmaps cannot be drawn here.
_said_no_heatmaps: set[str] = set()


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
    from bonewatch.models.bundle import BundleError
    from bonewatch.models.extras import MissingExtra
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
            grids=[image.grid for _, image, _ in positives],
        )
    except (MissingExtra, BundleError) as exc:  # this install or bundle cannot draw them
        key = f"{bundle.path}:{bundle.served_as}"
        if key not in _said_no_heatmaps:
            _said_no_heatmaps.add(key)
            log.error("no heatmaps for bundle %s %s: %s", bundle.name, bundle.version, exc)
        return {}
    except Exception:
        log.exception("Grad-CAM failed on a batch of %d positive images", len(positives))
        return {}
    paths: dict[int, str] = {}
    for (claim, image, pred), explanation in zip(positives, explanations, strict=True):
        path = heatmap_path(folder, bundle, claim.image_id)
        part = str(pred.body_part)
        caption = caption_lines(
            bundle, part, explanation.p_fracture, bundle.manifest.fracture[part].threshold
        )
        picture = with_caption(
            overlay_heatmap(image.pixels, explanation.heatmap),
            caption,
            warning=caption_warning(bundle),
        )
        try:
            write_rgb_png(path, picture)
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
        min_side=picture_min_side(settings),
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
    explanation = explain_images([image.pixels], [part], bundle, grids=[image.grid])[0]
    threshold = bundle.manifest.fracture[part].threshold
    caption = caption_lines(bundle, part, explanation.p_fracture, threshold)
    picture = overlay_heatmap(image.pixels, explanation.heatmap)
    write_rgb_png(out, with_caption(picture, caption, warning=caption_warning(bundle)))
    return ExplainedFile(
        heatmap=out,
        peak_xy=explanation.peak_xy,
        p_fracture=explanation.p_fracture,
        part=part,
        threshold=bundle.manifest.fracture[part].threshold,
        layer=explanation.layer,
    )
