"""Adding ONNX exports of a bundle's Keras models, for the ONNX Runtime and OpenVINO engines.

Each Keras model is converted with Keras's own ONNX export (tf2onnx underneath) with an open
batch dimension, checked against the Keras model on phantoms, and recorded in the manifest with
its sha256 and the largest difference seen. The Keras weights stay; they remain the source of
truth for training, Keras Grad-CAM and the Keras engine.

A fracture model whose head is global pooling, dropout and a Dense layer also gets a second
output: its class activation map for the fracture logit (the last feature map weighted by the
head's weights for that logit). It is Grad-CAM of the logit up to a positive factor, so a serving
install without TensorFlow draws the same heatmaps (:mod:`models.gradcam`). The probabilities stay
the first output, which is all the engines read.
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
from bonewatch.models.extras import require_train
from bonewatch.models.phantoms import OTHER_REGIONS, PARTS, draw_phantom
from bonewatch.models.preprocess import PreprocessSpec, preprocess_batch

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
# The engines must agree to this much on every output probability.
PARITY_TOLERANCE = 1e-4
INPUT_NAME = "image"


# Global pooling layers whose Grad-CAM weights are the head's weights over h * w: the mean
# gradient of the pooled value over the map is 1 / (h * w) for both (TensorFlow splits a tied
# maximum's gradient evenly).
CAM_POOLING = ("GlobalAveragePooling2D", "GlobalMaxPooling2D")
CAM_WEIGHTS_LAYER = "cam_weights"


@dataclass(frozen=True)
class ExportedModel:
    role: str
    file: str
    max_abs_diff: float
    cam_layer: str | None = None


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


def cam_head_layer(model: Any) -> str | None:
    """The layer whose feature map a class activation output can weigh, or None.

    That is the last spatial layer (:func:`models.gradcam.cam_layer`) when the model ends in
    it -> global average or max pooling -> any Dropout -> Dense, one after the other; for that
    head the map equals Grad-CAM of the last output's logit. Any other head gets no map.
    """
    import keras

    from bonewatch.models.gradcam import cam_layer

    layers = list(model.layers)
    if not layers or not isinstance(layers[-1], keras.layers.Dense):
        return None
    i = len(layers) - 2
    while i >= 0 and isinstance(layers[i], keras.layers.Dropout):
        i -= 1
    if i < 0 or type(layers[i]).__name__ not in CAM_POOLING:
        return None
    name = cam_layer(model)
    try:
        chain = [model.get_layer(name), *layers[i:]]
        linked = all(b.input is a.output for a, b in zip(chain, chain[1:], strict=False))
    except (AttributeError, ValueError):  # a layer called more than once has no single input
        return None
    return name if linked else None


def with_cam_output(model: Any, layer: str) -> Any:
    """``model`` with a second output: ``layer``'s feature map weighted by the head's kernel
    column of the last output (a 1x1 convolution without bias), shape (N, h, w, 1)."""
    import keras

    kernel = np.asarray(model.layers[-1].kernel, np.float32)[:, -1]
    weigh = keras.layers.Conv2D(1, 1, use_bias=False, name=CAM_WEIGHTS_LAYER)
    cam = weigh(model.get_layer(layer).output)
    weigh.set_weights([kernel.reshape(1, 1, -1, 1)])
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return keras.Model(inputs, [model.output, cam], name=model.name)


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


@dataclass(frozen=True)
class _Converted:
    file: str
    gap: float
    cam: dict[str, Any] | None = None  # the manifest's onnx.cam


def _export_one(
    root: Path, role: str, entry: ModelEntry, opset: int, tolerance: float, *, cam: bool
) -> _Converted:
    """Convert one model next to its weights (with its class activation output when ``cam`` and
    the head allows it); returns the file name, the parity gap and the map's record."""
    name = Path(entry.weights).with_suffix(".onnx").name
    final = root / name
    tmp = root / f".{name}.{os.getpid()}.tmp"
    model = load_keras_model(root, entry)
    layer = cam_head_layer(model) if cam else None
    exported = with_cam_output(model, layer) if layer is not None else model
    try:
        _convert(exported, entry.spec, tmp, opset)
        x = parity_inputs(entry.spec)
        onnx = OnnxPredictor(tmp, InferenceThreads())
        gap = max_output_difference(KerasPredictor(model)(x), onnx(x))
        if gap > tolerance:
            raise BundleError(
                f"the ONNX export of {role} differs from the Keras model by {gap:.2e} "
                f"(more than {tolerance:.0e}); it was not added"
            )
        record = None
        if layer is not None:
            outputs = onnx.session.get_outputs()
            got = onnx.session.run([outputs[1].name], {onnx.session.get_inputs()[0].name: x})[0]
            want = np.asarray(exported(x, training=False)[1], np.float32)
            cam_gap = max_output_difference(np.asarray(got, np.float64), want.astype(np.float64))
            scale = max(1.0, float(np.max(np.abs(want))))
            if cam_gap > tolerance * scale:
                raise BundleError(
                    f"the class activation output of {role}'s ONNX export differs from Keras by "
                    f"{cam_gap:.2e} (more than {tolerance:.0e} of its scale); it was not added"
                )
            record = {"output": outputs[1].name, "layer": layer, "max_abs_diff": cam_gap}
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return _Converted(name, gap, record)


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

    Models that share one weights file (or identical weights) are converted once. Fracture
    models get their class activation output where the head allows it (:func:`cam_head_layer`).

    Returns:
        The updated manifest and one :class:`ExportedModel` per model.

    Raises:
        BundleError: the bundle is invalid, or an export disagrees with its Keras model by more
            than ``tolerance``.
        MissingExtra: TensorFlow and Keras are not installed (the ``[train]`` extra).
    """
    require_train("bundle export-onnx")
    root = Path(bundle_dir).resolve()
    manifest = read_manifest(root)
    data = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    converted: dict[tuple[str, bool], _Converted] = {}  # (weights sha256, cam) -> export
    exported = []
    raw_entries = [data["body_part"], *(data["fracture"][part] for part in manifest.parts())]
    for (role, entry), raw in zip(manifest.models().items(), raw_entries, strict=True):
        key = (entry.sha256, role != "body_part")
        name = Path(entry.weights).with_suffix(".onnx").name
        if key in converted:
            done = converted[key]
            if name != done.file:
                shutil.copyfile(root / done.file, root / name)
        else:
            if report is not None:
                report(f"exporting {role} ({entry.backbone}, {entry.spec.input_size}px)")
            done = _export_one(root, role, entry, opset, tolerance, cam=key[1])
            converted[key] = done
            name = done.file
        raw["onnx"] = {
            "file": name,
            "sha256": sha256_of(root / name),
            "opset": opset,
            "max_abs_diff": done.gap,
        }
        if done.cam is not None:
            raw["onnx"]["cam"] = dict(done.cam)
        exported.append(
            ExportedModel(role, name, done.gap, done.cam["layer"] if done.cam else None)
        )
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
