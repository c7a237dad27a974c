"""Adding ONNX exports of a bundle's Keras models, for the ONNX Runtime engine.

Each Keras model is converted with Keras's own ONNX export (tf2onnx underneath) with an open
batch dimension, checked against the Keras model on phantoms, and recorded in the manifest with
its sha256 and the largest difference seen. The Keras weights stay; they remain the source of
truth for training, Grad-CAM and the Keras engine.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from bonewatch.models.bundle import (
    MANIFEST,
    BundleError,
    Manifest,
    ModelEntry,
    forget_bundle,
    load_keras_model,
    read_manifest,
    sha256_of,
    write_manifest,
)
from bonewatch.models.engines import InferenceThreads, KerasPredictor, OnnxPredictor
from bonewatch.models.phantoms import OTHER_REGIONS, PARTS, draw_phantom
from bonewatch.models.preprocess import PreprocessSpec, preprocess_batch

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
# The engines must agree to this much on every output probability.
PARITY_TOLERANCE = 1e-4
INPUT_NAME = "image"


@dataclass(frozen=True)
class ExportedModel:
    role: str
    file: str
    max_abs_diff: float


def parity_inputs(spec: PreprocessSpec, *, seed: int = 0) -> np.ndarray:
    """A small batch of model inputs for comparing engines: phantoms of every region, plus noise."""
    rng = np.random.default_rng(seed)
    size = max(2 * spec.input_size, 64)
    pixels = [
        draw_phantom(region, fractured=region in PARTS and i % 2 == 0, rng=rng, size=size).pixels
        for i, region in enumerate((*PARTS, *OTHER_REGIONS))
    ]
    pixels.append(rng.random((size, size), dtype=np.float32))
    return preprocess_batch(pixels, spec)


def max_output_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute difference between two engines' outputs for the same inputs."""
    if a.shape != b.shape:
        raise BundleError(f"the engines' outputs differ in shape: {a.shape} and {b.shape}")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def _convert(model: Any, spec: PreprocessSpec, out: Path, opset: int) -> None:
    import tensorflow as tf

    signature = [
        tf.TensorSpec(
            (None, spec.input_size, spec.input_size, spec.channels), tf.float32, name=INPUT_NAME
        )
    ]
    with warnings.catch_warnings():
        # Keras's tf2onnx shim probes numpy for names that NumPy 2 deprecated.
        warnings.simplefilter("ignore", FutureWarning)
        model.export(
            str(out), format="onnx", verbose=False, opset_version=opset, input_signature=signature
        )


def _export_one(
    root: Path, role: str, entry: ModelEntry, opset: int, tolerance: float
) -> tuple[str, float]:
    """Convert one model next to its weights; returns the ONNX file name and the parity gap."""
    name = Path(entry.weights).with_suffix(".onnx").name
    final = root / name
    tmp = root / f".{name}.{os.getpid()}.tmp"
    model = load_keras_model(root, entry)
    try:
        _convert(model, entry.spec, tmp, opset)
        x = parity_inputs(entry.spec)
        gap = max_output_difference(
            KerasPredictor(model)(x), OnnxPredictor(tmp, InferenceThreads())(x)
        )
        if gap > tolerance:
            raise BundleError(
                f"the ONNX export of {role} differs from the Keras model by {gap:.2e} "
                f"(more than {tolerance:.0e}); it was not added"
            )
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return name, gap


def _library_versions() -> dict[str, str]:
    versions = {}
    for package in ("tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions


def export_onnx(
    bundle_dir: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    tolerance: float = PARITY_TOLERANCE,
    report: Callable[[str], None] | None = None,
) -> tuple[Manifest, list[ExportedModel]]:
    """Add an ONNX export of every model in a bundle and record them in its manifest.

    Models that share one weights file (or identical weights) are converted once.

    Returns:
        The updated manifest and one :class:`ExportedModel` per model.

    Raises:
        BundleError: the bundle is invalid, or an export disagrees with its Keras model by more
            than ``tolerance``.
    """
    root = Path(bundle_dir).resolve()
    manifest = read_manifest(root)
    data = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    converted: dict[str, tuple[str, float]] = {}  # weights sha256 -> (onnx file, gap)
    exported = []
    raw_entries = [data["body_part"], *(data["fracture"][part] for part in manifest.parts())]
    for (role, entry), raw in zip(manifest.models().items(), raw_entries, strict=True):
        if entry.sha256 in converted:
            first, gap = converted[entry.sha256]
            name = Path(entry.weights).with_suffix(".onnx").name
            if name != first:
                shutil.copyfile(root / first, root / name)
        else:
            if report is not None:
                report(f"exporting {role} ({entry.backbone}, {entry.spec.input_size}px)")
            name, gap = _export_one(root, role, entry, opset, tolerance)
            converted[entry.sha256] = (name, gap)
        raw["onnx"] = {
            "file": name,
            "sha256": sha256_of(root / name),
            "opset": opset,
            "max_abs_diff": gap,
        }
        exported.append(ExportedModel(role, name, gap))
    data["onnx_export"] = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "converter": "keras Model.export(format='onnx')",
        "parity_tolerance": tolerance,
        "library_versions": _library_versions(),
    }
    updated = write_manifest(root, data)
    forget_bundle(root)
    log.info("added ONNX models to %s: %s", root, ", ".join(e.file for e in exported))
    return updated, exported
