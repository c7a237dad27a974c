"""The model side of ``bonewatch bench``: a random two-stage bundle and the ways to run it.

A bench bundle has the structure and the cost of a real one (the chosen backbone for stage 1 and
for each part's fracture model) but random weights, since speed does not depend on them. Three
ways of running it are measured against each other:

- :func:`forward_two_stage`, the engine's limit: batched forward passes on tensors that are
  already preprocessed, stage 2 grouped by part exactly as the cascade groups it;
- :class:`SeedStyleServer`, how the seed projects served: ``model.predict`` on a batch of one,
  once per stage;
- the worker itself, run by ``worker.bench`` through ``bonewatch process``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bonewatch.models.bundle import (
    OTHER,
    SCHEMA_VERSION,
    Bundle,
    load_keras_model,
    read_manifest,
    sha256_of,
    write_manifest,
)
from bonewatch.models.cascade import group_by_part, predict_probs
from bonewatch.models.phantoms import PARTS
from bonewatch.models.preprocess import preprocess

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
    report: Callable[[str], None] | None = None,
) -> Path:
    """Write a randomly initialised two-stage bundle with ``backbone`` at ``input_size`` px.

    The seven fracture models share one weights file (they are still loaded as seven models),
    which keeps a DenseNet bundle's disk use at two models. With ``onnx``, ONNX exports are added
    as ``bonewatch bundle export-onnx`` adds them.

    Returns:
        The bundle folder.
    """
    import keras

    from bonewatch.models.architectures import build_classifier, default_spec

    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(seed)
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


def forward_two_stage(bundle: Bundle, x: np.ndarray, batch_size: int) -> int:
    """Both stages' forward passes on a preprocessed batch, stage 2 grouped by part.

    These are the model calls :func:`models.cascade.run_cascade` makes, without preprocessing or
    building results. Returns the number of stage-2 groups run.
    """
    manifest = bundle.manifest
    probs = predict_probs(bundle.body_part_model, x, batch_size)
    groups = group_by_part(probs, manifest.body_part.labels, manifest.body_part.confidence_floor)
    for part, index in groups.items():
        predict_probs(bundle.fracture_models[part], x[index], batch_size)
    return len(groups)


class SeedStyleServer:
    """Serving as the seed projects did: ``model.predict`` on a batch of one, once per stage."""

    def __init__(self, bundle_dir: Path) -> None:
        self._root = bundle_dir.resolve()
        self.manifest = read_manifest(self._root)
        self._stage1 = load_keras_model(self._root, self.manifest.body_part)
        self._fracture: dict[str, Any] = {}

    def _fracture_model(self, part: str) -> Any:
        if part not in self._fracture:
            self._fracture[part] = load_keras_model(self._root, self.manifest.fracture[part])
        return self._fracture[part]

    def predict(self, pixels: np.ndarray) -> tuple[str, float | None]:
        """The body part and p(fracture) of one image's grey pixels."""
        body = self.manifest.body_part
        x = preprocess(pixels, body.spec)[None]
        probs = self._stage1.predict(x, verbose=0)[0]
        part = body.labels[int(np.argmax(probs))]
        if part == OTHER or float(probs.max()) < body.confidence_floor:
            return part, None
        entry = self.manifest.fracture[part]
        y = x if entry.spec == body.spec else preprocess(pixels, entry.spec)[None]
        return part, float(self._fracture_model(part).predict(y, verbose=0)[0, -1])
