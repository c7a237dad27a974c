"""The two-stage cascade: body part first, then that part's fracture model, in batches."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from bonewatch.ingest import DecodedImage, PixelGrid, body_part_hint
from bonewatch.models.bundle import OTHER, Bundle, Predictor
from bonewatch.models.preprocess import PreprocessSpec, preprocess, preprocess_batch


@dataclass(frozen=True)
class Prediction:
    """What the cascade concluded about one image, and what it came from.

    ``status`` is ``done`` when a fracture model ran, ``unsupported`` when stage 1 rejected the
    image (``other`` won, or the top probability was under the manifest's confidence floor).
    """

    status: str
    reason: str | None
    body_part_probs: dict[str, float]
    body_part: str
    body_part_confidence: float
    body_part_examined: str | None
    body_part_disagrees: bool
    p_fracture: float | None
    label: str | None
    threshold: float | None
    fracture_model: str | None
    timings: dict[str, float] = field(default_factory=dict)


def predict_probs(model: Predictor, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Run a model over ``x`` in chunks of ``batch_size``, or of the model's own smaller pass
    size; returns its outputs as float64."""
    step = model.pass_size(batch_size)
    outs = [model(x[i : i + step]) for i in range(0, len(x), step)]
    return np.concatenate(outs) if outs else np.zeros((0, 1))


def group_by_part(probs: np.ndarray, labels: Sequence[str], floor: float) -> dict[str, list[int]]:
    """Stage 2's work: the images of each body part that stage 1 chose with enough confidence.

    Returns:
        Row indices of ``probs`` per part, in input order; ``other`` and rows under ``floor``
        are left out.
    """
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(probs):
        part = labels[int(np.argmax(row))]
        if part != OTHER and float(row.max()) >= floor:
            groups.setdefault(part, []).append(i)
    return groups


def input_specs(bundle: Bundle) -> list[PreprocessSpec]:
    """The distinct preprocessing specs a bundle's models take, stage 1's first."""
    specs: list[PreprocessSpec] = []
    for entry in bundle.manifest.models().values():
        if entry.spec not in specs:
            specs.append(entry.spec)
    return specs


@dataclass(frozen=True)
class Preprocessed:
    """Model inputs prepared ahead of the cascade, one row per image in the cascade's order.

    The worker builds them in its decode pool, so preprocessing overlaps inference instead of
    running between batches. ``seconds`` is the time that took, summed over the images.
    """

    tensors: Mapping[PreprocessSpec, np.ndarray]
    seconds: float = 0.0

    @classmethod
    def from_rows(
        cls, rows: Sequence[Sequence[np.ndarray]], specs: Sequence[PreprocessSpec], seconds: float
    ) -> Preprocessed:
        """Stack per-image inputs (one list per image, in ``specs`` order) into batches."""
        return cls(
            {spec: np.stack([row[k] for row in rows]) for k, spec in enumerate(specs)}, seconds
        )


def prepare_inputs(
    pixels: np.ndarray, specs: Sequence[PreprocessSpec], grid: PixelGrid | None = None
) -> list[np.ndarray]:
    """One image's model inputs for each of ``specs`` (``grid``: ``DecodedImage.grid``)."""
    return [preprocess(pixels, spec, grid) for spec in specs]


class _Tensors:
    """Preprocess a batch once per distinct spec (stages often share one)."""

    def __init__(self, images: Sequence[DecodedImage], ready: Preprocessed | None = None) -> None:
        self._pixels = [im.pixels for im in images]
        self._grids = [im.grid for im in images]
        self._by_spec: dict[PreprocessSpec, np.ndarray] = {}
        self.seconds = 0.0
        if ready is not None:
            self._by_spec.update(
                (spec, x) for spec, x in ready.tensors.items() if len(x) == len(images)
            )
            self.seconds = ready.seconds

    def get(self, spec: PreprocessSpec, index: Sequence[int] | None = None) -> np.ndarray:
        if spec not in self._by_spec:
            t0 = time.perf_counter()
            self._by_spec[spec] = preprocess_batch(self._pixels, spec, self._grids)
            self.seconds += time.perf_counter() - t0
        x = self._by_spec[spec]
        return x if index is None else x[list(index)]


def run_cascade(
    images: Sequence[DecodedImage],
    bundle: Bundle,
    *,
    batch_size: int = 32,
    preprocessed: Preprocessed | None = None,
) -> list[Prediction]:
    """Classify the body part of every image, then run each part's fracture model on its group.

    ``preprocessed`` supplies model inputs made beforehand; specs it lacks are computed here.

    Returns:
        One :class:`Prediction` per input image, in input order.
    """
    n = len(images)
    if n == 0:
        return []
    manifest = bundle.manifest
    labels = manifest.body_part.labels
    floor = manifest.body_part.confidence_floor
    tensors = _Tensors(images, preprocessed)
    preprocess_before = tensors.seconds

    t0 = time.perf_counter()
    probs = predict_probs(bundle.body_part_model, tensors.get(manifest.body_part.spec), batch_size)
    stage1_s = time.perf_counter() - t0 - (tensors.seconds - preprocess_before)

    chosen = [labels[int(np.argmax(row))] for row in probs]
    groups = group_by_part(probs, labels, floor)

    p_fracture: dict[int, float] = {}
    stage2_s = 0.0
    for part, index in groups.items():
        entry = manifest.fracture[part]
        x = tensors.get(entry.spec, index)
        t1 = time.perf_counter()
        out = predict_probs(bundle.fracture_models[part], x, batch_size)
        stage2_s += time.perf_counter() - t1
        for i, p in zip(index, out[:, -1], strict=True):
            p_fracture[i] = float(p)

    shared = {
        "preprocess_ms": 1000 * tensors.seconds / n,
        "stage1_ms": 1000 * max(stage1_s, 0.0) / n,
        "stage2_ms": 1000 * stage2_s / max(len(p_fracture), 1),
    }
    results = []
    for i, image in enumerate(images):
        row = probs[i]
        part = chosen[i]
        confidence = float(row.max())
        examined = image.meta.body_part_examined
        hint = body_part_hint(examined)
        probs_dict = {label: round(float(p), 6) for label, p in zip(labels, row, strict=True)}
        disagrees = hint is not None and hint != part
        if i in p_fracture:
            entry = manifest.fracture[part]
            p = p_fracture[i]
            results.append(
                Prediction(
                    status="done",
                    reason=None,
                    body_part_probs=probs_dict,
                    body_part=part,
                    body_part_confidence=confidence,
                    body_part_examined=examined,
                    body_part_disagrees=disagrees,
                    p_fracture=p,
                    label="positive" if p >= entry.threshold else "negative",
                    threshold=entry.threshold,
                    fracture_model=f"{manifest.name}/{part}@{manifest.version}",
                    timings=dict(shared),
                )
            )
            continue
        if part == OTHER:
            reason = (
                f"stage 1 found none of the seven upper-limb parts (p(other) = {confidence:.2f})"
            )
        else:
            reason = (
                f"stage 1 confidence {confidence:.2f} for {part} is below the bundle's floor "
                f"{floor:.2f}"
            )
        results.append(
            Prediction(
                status="unsupported",
                reason=reason,
                body_part_probs=probs_dict,
                body_part=part,
                body_part_confidence=confidence,
                body_part_examined=examined,
                body_part_disagrees=disagrees,
                p_fracture=None,
                label=None,
                threshold=None,
                fracture_model=None,
                timings={k: v for k, v in shared.items() if k != "stage2_ms"},
            )
        )
    return results
