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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bonewatch.models.engines import (
    AUTO,
    ENGINES,
    ONNX_ENGINES,
    PRECISIONS,
    InferenceThreads,
    KerasPredictor,
    OnnxPredictor,
    OpenVinoPredictor,
    Predictor,
    configure_tensorflow_threads,
    cpu_supports_bf16,
    import_tensorflow,
    onnxruntime_available,
    openvino_available,
    use_openvino_cache,
)
from bonewatch.models.extras import MissingExtra, require_train, train_available
from bonewatch.models.preprocess import PreprocessSpec

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
OTHER = "other"


class BundleError(Exception):
    """A bundle folder that cannot be used: missing files, bad manifest, wrong checksum."""


class CamOutput(BaseModel):
    """A fracture model's second ONNX output: its class activation map for the fracture logit.

    The last feature map (``layer``) weighted by the head's weights for the logit, summed over
    channels, before any ReLU: for a global-pooling -> Dense head, Grad-CAM of the logit up to a
    positive factor (:mod:`models.gradcam`).
    """

    model_config = ConfigDict(extra="allow")

    output: str = Field(description="the ONNX output's name")
    layer: str = Field(description="the Keras layer whose feature map it weighs")
    max_abs_diff: float = Field(ge=0.0, description="largest |keras - onnx| of the map at export")


class OnnxExport(BaseModel):
    """The ONNX export of one model, written by ``bonewatch bundle export-onnx``."""

    model_config = ConfigDict(extra="allow")

    file: str
    sha256: str
    opset: int
    max_abs_diff: float = Field(ge=0.0, description="largest |keras - onnx| seen at export")
    cam: CamOutput | None = None


class Int8Model(BaseModel):
    """The statically quantized (QDQ, S8S8) ONNX model of one entry: ``bundle quantize``."""

    model_config = ConfigDict(extra="allow")

    file: str
    sha256: str
    max_abs_diff: float = Field(ge=0.0, description="largest |fp32 - int8| on parity inputs")


class ModelEntry(BaseModel):
    """One Keras model inside a bundle, and its ONNX export when there is one."""

    model_config = ConfigDict(extra="allow")

    weights: str
    sha256: str
    preprocessing: dict[str, Any]
    backbone: str = "small_cnn"
    onnx: OnnxExport | None = None
    int8: Int8Model | None = None

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

    def has_int8(self) -> bool:
        """Whether every model has an int8 model recorded (``bonewatch bundle quantize``)."""
        return all(entry.int8 is not None for entry in self.models().values())


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle: its manifest and its models on one engine, ready for inference."""

    path: Path
    manifest: Manifest
    body_part_model: Predictor
    fracture_models: dict[str, Predictor]
    engine: str = "keras"
    precision: str = "fp32"
    # auto precision's measurement (models.choice.Trial), fastest first; empty when asked for.
    trials: tuple[Any, ...] = ()
    _warm: set[int] = field(default_factory=set, compare=False, repr=False)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def served_as(self) -> str:
        """``engine/precision``, as recorded with each prediction (``onnx/int8``)."""
        return f"{self.engine}/{self.precision}"

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
    require_train("loading a Keras model")
    import_tensorflow()  # the Keras backend, without its start-up lines
    import keras  # only models/ imports keras, and only when a bundle is loaded

    return keras.saving.load_model(weights, compile=False)


def onnx_file(bundle_dir: Path, entry: ModelEntry, precision: str) -> Path:
    """The checked ONNX file of ``entry`` for ``precision``: the int8 graph for int8, the
    exported fp32 graph otherwise (bf16 runs the fp32 graph)."""
    if precision == "int8":
        if entry.int8 is None:  # resolve_precision has ruled this out
            raise BundleError(f"{entry.weights} has no int8 model")
        return _checked_file(bundle_dir, entry.int8.file, entry.int8.sha256, "int8 ONNX model")
    if entry.onnx is None:  # resolve_engine has ruled this out
        raise BundleError(f"{entry.weights} has no ONNX export")
    return _checked_file(bundle_dir, entry.onnx.file, entry.onnx.sha256, "ONNX model")


def _load_onnx(
    bundle_dir: Path,
    entry: ModelEntry,
    threads: InferenceThreads,
    engine: str = "onnx",
    precision: str = "fp32",
) -> Predictor:
    path = onnx_file(bundle_dir, entry, precision)
    try:
        predictor: OnnxPredictor | OpenVinoPredictor
        if engine == "openvino":
            predictor = OpenVinoPredictor(path, threads, precision)
        else:
            predictor = OnnxPredictor(path, threads)
    except Exception as exc:  # the runtimes raise their own unrelated classes for a bad file
        raise BundleError(f"{engine} cannot load {path}: {exc}") from exc
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
    installed (it was the faster engine in ``bonewatch bench``), else Keras. OpenVINO is served
    when asked for (``openvino``), after its parity check against ONNX Runtime at load.

    Raises:
        BundleError: ``onnx`` was asked for and the bundle or the environment cannot provide it,
            or the engine name is unknown.
        MissingExtra: the choice is Keras and TensorFlow is not installed (``[train]``).
    """
    if requested == AUTO:
        if manifest.has_onnx() and onnxruntime_available():
            return "onnx"
        if not train_available():
            raise MissingExtra(
                f"bundle {manifest.name} {manifest.version} has no ONNX models; serving it"
            )
        return "keras"
    if requested == "keras":
        require_train("the keras engine")
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
    if requested == "openvino":
        if not manifest.has_onnx():
            raise BundleError(
                f"bundle {manifest.name} {manifest.version} has no ONNX models for OpenVINO; add "
                "them with `bonewatch bundle export-onnx BUNDLE`"
            )
        if not openvino_available():
            raise BundleError("the openvino engine needs the openvino package, which is missing")
    return requested


def resolve_precision(manifest: Manifest, engine: str, requested: str = AUTO) -> str:
    """The numeric precision ``engine`` serves the bundle in.

    ``auto`` is int8 on an ONNX engine when the bundle carries int8 models (``bonewatch bundle
    quantize`` added them only within its accuracy tolerance), else fp32; it never picks bf16.
    Keras serves fp32 only; bf16 needs OpenVINO on a CPU with native bfloat16.

    Raises:
        BundleError: the precision is unknown, or the bundle, engine or CPU cannot serve it.
    """
    if requested != AUTO and requested not in PRECISIONS:
        raise BundleError(f"unknown precision {requested!r}; choose one of {(AUTO, *PRECISIONS)}")
    if engine not in ONNX_ENGINES:
        if requested not in (AUTO, "fp32"):
            raise BundleError(f"the {engine} engine serves fp32 only, not {requested}")
        return "fp32"
    if requested == AUTO:
        return "int8" if manifest.has_int8() else "fp32"
    if requested == "int8" and not manifest.has_int8():
        raise BundleError(
            f"bundle {manifest.name} {manifest.version} has no int8 models; add them with "
            "`bonewatch bundle quantize BUNDLE`"
        )
    if requested == "bf16":
        if engine != "openvino":
            raise BundleError("bf16 is served by the openvino engine only")
        if not cpu_supports_bf16():
            raise BundleError("this CPU has no native bfloat16 (OpenVINO reports no BF16)")
    return requested


# Largest |delta p| allowed at load between OpenVINO and ONNX Runtime fp32 on the same file's
# parity inputs: fp32 must match; bf16 has 8 bits of mantissa (and OpenVINO has reported bf16
# errors on some AMD CPUs, which this check is there to catch). int8 is held to the gap its
# quantization recorded instead (:func:`int8_slack`).
LOAD_PARITY = {"fp32": 1e-4, "bf16": 0.05}


def role_check(
    bundle_dir: Path, role: str, entry: ModelEntry, predictor: Predictor, precision: str
) -> tuple[float, str | None]:
    """One model's |delta p| on its parity inputs against its reference, and why it is not served
    (None when it is within its limit).

    int8 is compared with the fp32 model within :func:`int8_slack` of the gap ``bundle
    quantize`` recorded: int8 kernels are not the same on every CPU (without VNNI, x86 integer
    dot products can saturate), and the quantizing machine's record is the reference. fp32 and
    bf16 on OpenVINO are compared with ONNX Runtime fp32 within :data:`LOAD_PARITY`.
    """
    from bonewatch.models.onnx_export import max_output_difference

    x, ref = _reference(bundle_dir, entry)
    gap = max_output_difference(predictor(x), ref)
    if precision == "int8":
        assert entry.int8 is not None  # resolve_precision has ruled this out
        limit = int8_slack(entry.int8.max_abs_diff)
        if gap > limit:
            return gap, (
                f"{role} in int8 on {predictor.engine} differs from fp32 by {gap:.3f} on this "
                f"CPU, against {entry.int8.max_abs_diff:.3f} when it was quantized (limit "
                f"{limit:.3f})"
            )
    elif gap > LOAD_PARITY[precision]:
        return gap, (
            f"{role} on {predictor.engine} in {precision} differs from ONNX Runtime by "
            f"{gap:.2e} (more than {LOAD_PARITY[precision]:.0e})"
        )
    return gap, None


# fp32 model sha256 -> its parity inputs and ONNX Runtime's outputs on them: the reference every
# engine and precision of that model is checked against, computed once per process.
_references: dict[str, tuple[np.ndarray, np.ndarray]] = {}
_references_lock = threading.Lock()


def _reference(bundle_dir: Path, entry: ModelEntry) -> tuple[np.ndarray, np.ndarray]:
    from bonewatch.models.onnx_export import parity_inputs

    if entry.onnx is None:  # resolve_engine has ruled this out
        raise BundleError(f"{entry.weights} has no ONNX export")
    with _references_lock:
        kept = _references.get(entry.onnx.sha256)
        if kept is None:
            x = parity_inputs(entry.spec)
            ref = OnnxPredictor(onnx_file(bundle_dir, entry, "fp32"), InferenceThreads())(x)
            kept = _references[entry.onnx.sha256] = (x, ref)
        return kept


def check_parity(
    bundle_dir: Path, manifest: Manifest, predictors: dict[str, Predictor], precision: str
) -> float:
    """Largest :func:`role_check` gap of ``predictors`` (one per role, as in
    :meth:`Manifest.models`).

    Raises:
        BundleError: a model is over its limit; the message says which and by how much.
    """
    worst = 0.0
    for role, entry in manifest.models().items():
        gap, over = role_check(bundle_dir, role, entry, predictors[role], precision)
        if over is not None:
            raise BundleError(f"{over}; not served")
        worst = max(worst, gap)
    return worst


def int8_slack(recorded: float) -> float:
    """How far this machine's int8 kernels may stray from fp32 on parity inputs, given the gap
    ``bundle quantize`` recorded: twice it, plus 0.01 for a different CPU's rounding."""
    return 2.0 * recorded + 0.01


def servable_engines(manifest: Manifest) -> list[str]:
    """The engines this environment can serve the bundle with, in :data:`ENGINES` order."""
    names = []
    for name in ENGINES[:2]:  # OpenVINO is measured by bench with --engines
        try:
            resolve_engine(manifest, name)
        except (BundleError, MissingExtra):
            continue
        names.append(name)
    return names


_cache: dict[tuple[Path, str, str], Bundle] = {}
# (bundle, engine, precision) that failed their parity check on this CPU: auto passes them over.
_refused: set[tuple[Path, str, str]] = set()
_cache_lock = threading.Lock()


def bundle_digest(bundle_dir: str | Path) -> str:
    """The bundle's digest: the sha256 of its manifest, which holds the sha256 of every weights
    file, so pinning it pins the whole bundle (``BONEWATCH_BUNDLE_SHA256``)."""
    return sha256_of(Path(bundle_dir) / MANIFEST)


class ParityRefused(BundleError):
    """A model of the bundle is over its parity limit on this engine, precision and CPU."""


def load_bundle(
    bundle_dir: str | Path,
    *,
    engine: str = AUTO,
    threads: InferenceThreads | None = None,
    digest: str | None = None,
    precision: str = "fp32",
    choice_cache: Path | None = None,
) -> Bundle:
    """Load a bundle once per process, engine and precision; later calls return the same object.

    Args:
        bundle_dir: The bundle folder.
        engine: ``keras``, ``onnx``, ``openvino`` or ``auto`` (see :func:`resolve_engine`).
        digest: The pinned :func:`bundle_digest`; another digest is refused.
        precision: ``fp32``, ``int8``, ``bf16`` or ``auto``; the library default is fp32, the
            worker's (``BONEWATCH_PRECISION``) auto. ``auto`` serves the fastest engine and
            precision here that passes its parity check, by a short measurement of stage 1
            (:mod:`bonewatch.models.choice`; ``engine`` limits the candidates).
        threads: The framework's thread pools. Given, they are applied before the first model
            loads (TensorFlow's are process-wide and fixed once it has started); None leaves
            TensorFlow's defaults and gives ONNX Runtime one thread per core.
        choice_cache: The folder where ``auto``'s measurement is kept for the next process on
            this host (``BONEWATCH_CACHE_DIR``), and OpenVINO's compiled models under
            ``openvino/``; None measures and compiles in every process.

    Raises:
        BundleError: the folder is not a valid bundle, a checksum does not match, or the engine
            cannot serve it.
    """
    root = Path(bundle_dir).resolve()
    actual = None
    if digest is not None and (root / MANIFEST).is_file():
        actual = bundle_digest(root)
        if actual != digest:
            # The manifest's checksums prove the weights match the manifest, not where the
            # bundle came from; a pinned digest proves it is the bundle that was approved.
            raise BundleError(
                f"bundle {root} has digest {actual}, but BONEWATCH_BUNDLE_SHA256 pins "
                f"{digest}; refusing to serve it"
            )
    if choice_cache is not None and openvino_available():
        use_openvino_cache(choice_cache / "openvino")
    with _cache_lock:
        manifest = read_manifest(root)
        if precision != AUTO:
            chosen = resolve_engine(manifest, engine)
            numeric = resolve_precision(manifest, chosen, precision)
            cached = _cache.get((root, chosen, numeric))
            if cached is not None:
                return cached
            try:
                return _load_served(root, manifest, chosen, numeric, threads)
            except ParityRefused as exc:
                served = (
                    "BONEWATCH_PRECISION=fp32" if numeric != "fp32" else "BONEWATCH_ENGINE=onnx"
                )
                raise BundleError(f"{exc} ({served} is)") from exc
        measured: dict[tuple[str, str], Predictor] = {}  # the fastest one's stage 1
        trials = _auto_trials(root, manifest, engine, threads, choice_cache, actual, measured)
        for trial in trials:
            if trial.img_s is None and len(trials) > 1:
                continue
            cached = _cache.get((root, trial.engine, trial.precision))
            if cached is not None:  # loaded before, perhaps asked for by name: same models
                return replace(cached, trials=tuple(trials)) if not cached.trials else cached
            try:
                bundle = _load_served(
                    root,
                    manifest,
                    trial.engine,
                    trial.precision,
                    threads,
                    tuple(trials),
                    stage1=measured.pop((trial.engine, trial.precision), None),
                )
            except ParityRefused as exc:
                _refused.add((root, trial.engine, trial.precision))
                log.warning("%s; serving the next fastest instead", exc)
                continue
            if len(trials) > 1:
                from bonewatch.models.choice import describe

                log.info(
                    "auto chose %s, the fastest stage 1 here passing its parity check (images/s: "
                    "%s)",
                    bundle.served_as,
                    describe(trials),
                )
            return bundle
        raise BundleError(
            f"no engine and precision here serves bundle {manifest.name}: "
            + "; ".join(t.refused or t.served_as for t in trials)
        )


def _auto_trials(
    root: Path,
    manifest: Manifest,
    engine: str,
    threads: InferenceThreads | None,
    cache_dir: Path | None,
    digest: str | None = None,
    fastest: dict[tuple[str, str], Predictor] | None = None,
) -> list[Any]:
    """The candidates of ``auto`` precision, fastest first: kept from an earlier measurement on
    this host, measured now (``fastest`` then holds the fastest one's stage-1 predictor), or
    the one candidate there is. ``digest``: the bundle's, where it was computed already."""
    from bonewatch.models import choice

    pairs = [pair for pair in choice.candidates(manifest, engine) if (root, *pair) not in _refused]
    if not pairs:
        raise BundleError(f"every engine and precision here failed its parity check on {root}")
    if len(pairs) == 1:
        return [choice.Trial(*pairs[0], None)]

    def threads_of(name: str) -> InferenceThreads:
        return (threads or InferenceThreads()).for_engine(name)

    key = choice.cache_key(digest or bundle_digest(root), pairs, threads_of)
    kept = choice.kept_trials(cache_dir, key)
    if kept is not None and {(t.engine, t.precision) for t in kept} == set(pairs):
        log.info("engine choice kept from an earlier measurement in %s", cache_dir)
        return kept
    start = time.perf_counter()
    # Without threads, serving compiles for other streams than the measurement: not handed over.
    trials = choice.measure(root, manifest, pairs, threads_of, fastest if threads else None)
    for trial in trials:
        if trial.refused is not None:
            log.warning("%s; %s is not served", trial.refused, trial.served_as)
    log.info(
        "measured %d engine and precision candidates in %.1f s: %s",
        len(trials),
        time.perf_counter() - start,
        choice.describe(trials),
    )
    choice.keep_trials(cache_dir, key, trials)
    return trials


def _load_served(
    root: Path,
    manifest: Manifest,
    chosen: str,
    numeric: str,
    threads: InferenceThreads | None,
    trials: tuple[Any, ...] = (),
    *,
    stage1: Predictor | None = None,
) -> Bundle:
    """Every model of the bundle on ``chosen`` in ``numeric``, checked, cached and logged;
    ``stage1``: its stage-1 predictor, already loaded on them (by ``auto``'s measurement).

    Raises:
        ParityRefused: a model is over its parity limit (int8 against fp32, OpenVINO against
            ONNX Runtime).
    """
    if threads is not None:
        threads = threads.for_engine(chosen)
    if chosen in ONNX_ENGINES:
        stage1, fracture = _load_onnx_roles(
            root, manifest, threads or InferenceThreads(), chosen, numeric, stage1
        )
        if numeric == "int8" or chosen == "openvino":
            roles = {"body_part": stage1}
            roles.update({f"fracture_{p.lower()}": m for p, m in fracture.items()})
            try:
                gap = check_parity(root, manifest, roles, numeric)
            except BundleError as exc:
                raise ParityRefused(str(exc)) from exc
            log.info("%s %s against fp32 on this CPU: max |dp| %.1e", chosen, numeric, gap)
    else:
        if threads is not None:
            configure_tensorflow_threads(threads)
        per_pass = threads.forward_batch if threads is not None else 0
        stage1 = KerasPredictor(load_keras_model(root, manifest.body_part), per_pass)
        fracture = {
            part: KerasPredictor(load_keras_model(root, manifest.fracture[part]), per_pass)
            for part in manifest.parts()
        }
    bundle = Bundle(root, manifest, stage1, fracture, chosen, numeric, trials)
    _cache[(root, chosen, numeric)] = bundle
    log.info(
        "loaded bundle %s %s from %s on %s", manifest.name, manifest.version, root, bundle.served_as
    )
    return bundle


def _load_onnx_roles(
    root: Path,
    manifest: Manifest,
    threads: InferenceThreads,
    engine: str,
    precision: str,
    stage1: Predictor | None = None,
) -> tuple[Predictor, dict[str, Predictor]]:
    """Stage 1 (unless given, loaded already) and every fracture model of ``manifest`` on an
    ONNX engine."""
    if stage1 is None:
        stage1 = _load_onnx(root, manifest.body_part, threads, engine, precision)
    fracture = {
        part: _load_onnx(root, manifest.fracture[part], threads, engine, precision)
        for part in manifest.parts()
    }
    return stage1, fracture


def forget_bundle(bundle_dir: str | Path) -> None:
    """Drop a cached bundle (every engine) so the next :func:`load_bundle` reads it again."""
    root = Path(bundle_dir).resolve()
    with _cache_lock:
        for key in [k for k in _cache if k[0] == root]:
            del _cache[key]
        _refused.difference_update({k for k in _refused if k[0] == root})


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
