"""Model bundles: a folder with ``manifest.json`` plus Keras weights files (and ONNX exports).

The manifest is the model spec as data (input size, labels, per-part thresholds, preprocessing,
provenance, metrics, and the sha256 of every weights file). This module is the only reader of
weights files; each bundle is loaded once per process and engine, and looked up by its folder.
A bundle whose manifest records ONNX exports of all its models can be served by ONNX Runtime
(``engine="onnx"``) as well as by Keras.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bonewatch.models.engines import (
    AUTO,
    ENGINES,
    InferenceThreads,
    KerasPredictor,
    OnnxPredictor,
    Predictor,
    configure_tensorflow_threads,
    onnxruntime_available,
)
from bonewatch.models.preprocess import PreprocessSpec

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
OTHER = "other"


class BundleError(Exception):
    """A bundle folder that cannot be used: missing files, bad manifest, wrong checksum."""


class OnnxExport(BaseModel):
    """The ONNX export of one model, written by ``bonewatch bundle export-onnx``."""

    model_config = ConfigDict(extra="allow")

    file: str
    sha256: str
    opset: int
    max_abs_diff: float = Field(ge=0.0, description="largest |keras - onnx| seen at export")


class ModelEntry(BaseModel):
    """One Keras model inside a bundle, and its ONNX export when there is one."""

    model_config = ConfigDict(extra="allow")

    weights: str
    sha256: str
    preprocessing: dict[str, Any]
    backbone: str = "small_cnn"
    onnx: OnnxExport | None = None

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

    def models(self) -> dict[str, ModelEntry]:
        """Every model of the bundle by role: ``body_part``, then ``fracture_<part>`` per part."""
        entries: dict[str, ModelEntry] = {"body_part": self.body_part}
        for part in self.parts():
            entries[f"fracture_{part.lower()}"] = self.fracture[part]
        return entries

    def has_onnx(self) -> bool:
        """Whether every model has an ONNX export recorded."""
        return all(entry.onnx is not None for entry in self.models().values())


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle: its manifest and its models on one engine, ready for inference."""

    path: Path
    manifest: Manifest
    body_part_model: Predictor
    fracture_models: dict[str, Predictor]
    engine: str = "keras"
    _warm: set[int] = field(default_factory=set, compare=False, repr=False)

    @property
    def name(self) -> str:
        return self.manifest.name

    def predictors(self) -> list[tuple[Predictor, PreprocessSpec]]:
        """Every model with the input spec it takes, stage 1's first, each model once."""
        roles = [(self.body_part_model, self.manifest.body_part.spec)]
        roles += [
            (self.fracture_models[p], self.manifest.fracture[p].spec) for p in self.fracture_models
        ]
        seen: set[int] = set()
        out = []
        for predictor, spec in roles:
            if id(predictor) not in seen:
                seen.add(id(predictor))
                out.append((predictor, spec))
        return out

    def warm_up(self, batch_size: int = 1) -> float:
        """Run every model once on a blank batch of ``batch_size``; returns the seconds it took.

        A Keras model's first call builds its graph and kernels: measured on 2 cores, 1.8 s for a
        DenseNet121's first batch of 16 against 0.7 s for the next. One blank image takes that
        cost (the next batch of 16 then runs at 0.7 s); on ONNX Runtime the first call costs no
        more than later ones, and one image takes 0.03 s. A worker does it at start-up, so the
        first studies it sees do not pay for it. Once per loaded bundle and batch size.
        """
        if batch_size in self._warm:
            return 0.0
        start = time.perf_counter()
        for predictor, spec in self.predictors():
            predictor(
                np.zeros((batch_size, spec.input_size, spec.input_size, spec.channels), np.float32)
            )
        self._warm.add(batch_size)
        return time.perf_counter() - start

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


def _checked_file(bundle_dir: Path, name: str, sha256: str, what: str) -> Path:
    path = bundle_dir / name
    if not path.is_file():
        raise BundleError(f"{what} {path} named in the manifest is missing")
    actual = sha256_of(path)
    if actual != sha256:
        raise BundleError(
            f"{what} {path} has sha256 {actual}, the manifest expects {sha256}; "
            "the bundle was modified or damaged"
        )
    return path


def load_keras_model(bundle_dir: Path, entry: ModelEntry) -> Any:
    """The Keras model of one manifest entry, after checking its weights file's sha256."""
    weights = _checked_file(bundle_dir, entry.weights, entry.sha256, "weights file")
    import keras  # only models/ imports keras, and only when a bundle is loaded

    return keras.saving.load_model(weights, compile=False)


def _load_onnx(bundle_dir: Path, entry: ModelEntry, threads: InferenceThreads) -> Predictor:
    if entry.onnx is None:  # resolve_engine has ruled this out
        raise BundleError(f"{entry.weights} has no ONNX export")
    path = _checked_file(bundle_dir, entry.onnx.file, entry.onnx.sha256, "ONNX model")
    try:
        predictor = OnnxPredictor(path, threads)
    except Exception as exc:  # onnxruntime raises its own unrelated classes for a bad file
        raise BundleError(f"ONNX Runtime cannot load {path}: {exc}") from exc
    spec = entry.spec
    expected = (spec.input_size, spec.input_size, spec.channels)
    if tuple(predictor.input_shape[1:]) != expected:
        raise BundleError(
            f"{path} takes inputs of shape {predictor.input_shape[1:]}, the manifest's "
            f"preprocessing gives {expected}"
        )
    return predictor


def resolve_engine(manifest: Manifest, requested: str = AUTO) -> str:
    """The engine a bundle is served with.

    ``auto`` picks ONNX Runtime when every model has an ONNX export and onnxruntime is
    installed (it was the faster engine in ``bonewatch bench``), else Keras.

    Raises:
        BundleError: ``onnx`` was asked for and the bundle or the environment cannot provide it,
            or the engine name is unknown.
    """
    if requested == AUTO:
        return "onnx" if manifest.has_onnx() and onnxruntime_available() else "keras"
    if requested not in ENGINES:
        raise BundleError(f"unknown engine {requested!r}; choose one of {(AUTO, *ENGINES)}")
    if requested == "onnx":
        if not manifest.has_onnx():
            raise BundleError(
                f"bundle {manifest.name} {manifest.version} has no ONNX models; add them with "
                "`bonewatch bundle export-onnx BUNDLE` or serve it with the keras engine"
            )
        if not onnxruntime_available():
            raise BundleError("the onnx engine needs the onnxruntime package, which is missing")
    return requested


def servable_engines(manifest: Manifest) -> list[str]:
    """The engines this environment can serve the bundle with, in :data:`ENGINES` order."""
    names = []
    for name in ENGINES:
        try:
            resolve_engine(manifest, name)
        except BundleError:
            continue
        names.append(name)
    return names


_cache: dict[tuple[Path, str], Bundle] = {}
_cache_lock = threading.Lock()


def load_bundle(
    bundle_dir: str | Path, *, engine: str = AUTO, threads: InferenceThreads | None = None
) -> Bundle:
    """Load a bundle once per process and engine; later calls return the same object.

    Args:
        bundle_dir: The bundle folder.
        engine: ``keras``, ``onnx`` or ``auto`` (see :func:`resolve_engine`).
        threads: The framework's thread pools. Given, they are applied before the first model
            loads (TensorFlow's are process-wide and fixed once it has started); None leaves
            TensorFlow's defaults and gives ONNX Runtime one thread per core.

    Raises:
        BundleError: the folder is not a valid bundle, a checksum does not match, or the engine
            cannot serve it.
    """
    root = Path(bundle_dir).resolve()
    with _cache_lock:
        manifest = read_manifest(root)
        chosen = resolve_engine(manifest, engine)
        cached = _cache.get((root, chosen))
        if cached is not None:
            return cached
        if threads is not None:
            threads = threads.for_engine(chosen)
        if chosen == "onnx":
            onnx_threads = threads or InferenceThreads()
            stage1 = _load_onnx(root, manifest.body_part, onnx_threads)
            fracture = {
                part: _load_onnx(root, manifest.fracture[part], onnx_threads)
                for part in manifest.parts()
            }
        else:
            if threads is not None:
                configure_tensorflow_threads(threads)
            per_pass = threads.forward_batch if threads is not None else 0
            stage1 = KerasPredictor(load_keras_model(root, manifest.body_part), per_pass)
            fracture = {
                part: KerasPredictor(load_keras_model(root, manifest.fracture[part]), per_pass)
                for part in manifest.parts()
            }
        bundle = Bundle(root, manifest, stage1, fracture, chosen)
        _cache[(root, chosen)] = bundle
        log.info("loaded bundle %s %s from %s on %s", manifest.name, manifest.version, root, chosen)
        return bundle


def forget_bundle(bundle_dir: str | Path) -> None:
    """Drop a cached bundle (every engine) so the next :func:`load_bundle` reads it again."""
    root = Path(bundle_dir).resolve()
    with _cache_lock:
        for key in [k for k in _cache if k[0] == root]:
            del _cache[key]


def write_manifest(bundle_dir: str | Path, manifest: dict[str, Any]) -> Manifest:
    """Validate ``manifest`` and write it as the bundle's ``manifest.json``.

    The file is replaced in one rename, so a worker loading the bundle meanwhile reads either
    the old manifest or the new one.
    """
    parsed = Manifest.model_validate(manifest)
    path = Path(bundle_dir) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return parsed
