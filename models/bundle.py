"""Model bundles: a folder with ``manifest.json`` plus Keras weights files.

The manifest is the model spec as data (input size, labels, per-part thresholds, preprocessing,
provenance, metrics, and the sha256 of every weights file). This module is the only reader of
weights files; each bundle is loaded once per process and looked up by its folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.preprocess import PreprocessSpec

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
OTHER = "other"


class BundleError(Exception):
    """A bundle folder that cannot be used: missing files, bad manifest, wrong checksum."""


class ModelEntry(BaseModel):
    """One Keras model inside a bundle."""

    model_config = ConfigDict(extra="allow")

    weights: str
    sha256: str
    preprocessing: dict[str, Any]
    backbone: str = "small_cnn"

    @property
    def spec(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(self.preprocessing)


class BodyPartEntry(ModelEntry):
    labels: list[str]
    confidence_floor: float = Field(ge=0.0, le=1.0)


class FractureEntry(ModelEntry):
    threshold: float = Field(ge=0.0, le=1.0)
    threshold_rule: str = "youden"


class Manifest(BaseModel):
    """The parsed ``manifest.json``; unknown keys are kept (provenance grows over time)."""

    model_config = ConfigDict(extra="allow")

    schema_version: int
    name: str
    version: str
    intended_use: str
    body_part: BodyPartEntry
    fracture: dict[str, FractureEntry]
    trained_on: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)

    def parts(self) -> list[str]:
        """The body parts that have a fracture model (stage 1 labels minus ``other``)."""
        return [label for label in self.body_part.labels if label != OTHER]


class Predictor:
    """A Keras model traced once for every batch size, for inference only.

    ``predict_on_batch`` traces a new graph for each distinct batch shape; stage 2's per-part
    groups come in all sizes, so the worker would keep retracing. One input signature with an
    open batch dimension keeps a single graph per model.
    """

    def __init__(self, model: Any) -> None:
        import tensorflow as tf

        self.model = model
        self._tf = tf
        spec = tf.TensorSpec(model.input_shape, tf.float32)
        # Traced here, once: a concrete function never goes back through tracing.
        self._forward = tf.function(
            lambda x: model(x, training=False), input_signature=[spec]
        ).get_concrete_function()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Model outputs for a batch ``x`` of shape (N, S, S, C)."""
        return np.asarray(
            self._forward(self._tf.convert_to_tensor(x, self._tf.float32)), np.float64
        )


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle: its manifest and its Keras models, ready for inference."""

    path: Path
    manifest: Manifest
    body_part_model: Predictor
    fracture_models: dict[str, Predictor]

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(bundle_dir: str | Path) -> Manifest:
    """Parse and validate a bundle's manifest without loading any weights."""
    path = Path(bundle_dir) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle_dir} is not a bundle: {MANIFEST} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from exc
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        raise BundleError(f"{path} does not match the manifest schema: {exc}") from exc
    if manifest.schema_version != SCHEMA_VERSION:
        raise BundleError(
            f"{path} has schema_version {manifest.schema_version}; this bonewatch reads "
            f"{SCHEMA_VERSION}"
        )
    missing = [p for p in manifest.parts() if p not in manifest.fracture]
    if missing:
        raise BundleError(f"{path}: no fracture model for parts {missing}")
    return manifest


def _load_keras(bundle_dir: Path, entry: ModelEntry) -> Predictor:
    weights = bundle_dir / entry.weights
    if not weights.is_file():
        raise BundleError(f"weights file {weights} named in the manifest is missing")
    actual = sha256_of(weights)
    if actual != entry.sha256:
        raise BundleError(
            f"weights file {weights} has sha256 {actual}, the manifest expects {entry.sha256}; "
            "the bundle was modified or damaged"
        )
    import keras  # only models/ imports keras, and only when a bundle is loaded

    return Predictor(keras.saving.load_model(weights, compile=False))


_cache: dict[Path, Bundle] = {}
_cache_lock = threading.Lock()


def load_bundle(bundle_dir: str | Path) -> Bundle:
    """Load a bundle once per process; later calls with the same folder return the same object.

    Raises:
        BundleError: the folder is not a valid bundle or a weights checksum does not match.
    """
    key = Path(bundle_dir).resolve()
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None:
            return cached
        manifest = read_manifest(key)
        stage1 = _load_keras(key, manifest.body_part)
        fracture = {part: _load_keras(key, manifest.fracture[part]) for part in manifest.parts()}
        bundle = Bundle(key, manifest, stage1, fracture)
        _cache[key] = bundle
        log.info("loaded bundle %s %s from %s", manifest.name, manifest.version, key)
        return bundle


def forget_bundle(bundle_dir: str | Path) -> None:
    """Drop a cached bundle so the next :func:`load_bundle` reads it again (after retraining)."""
    with _cache_lock:
        _cache.pop(Path(bundle_dir).resolve(), None)


def write_manifest(bundle_dir: str | Path, manifest: dict[str, Any]) -> Manifest:
    """Validate ``manifest`` and write it as the bundle's ``manifest.json``."""
    parsed = Manifest.model_validate(manifest)
    path = Path(bundle_dir) / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return parsed
