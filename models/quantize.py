"""Adding int8 models to a bundle: ONNX Runtime's static quantization, checked on held-out data.

Each fp32 ONNX model is quantized with ``onnxruntime.quantization.quantize_static``: QDQ format,
per-channel weights, signed 8-bit weights and activations (S8S8), activation ranges calibrated
(min-max) on images of the bundle's own kind run through the bundle's own preprocessing (stage 1
on every region, each fracture model on its part). Then the int8 cascade and the fp32 one run
over a held-out labelled dataset the caller gives (``bonewatch bundle quantize`` writes phantom
studies of another seed when the user names none); the manifest records the change in study
AUROC, study kappa and body-part accuracy for the whole cascade and for each model swapped in
alone. Over the tolerance, nothing is added.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bonewatch.models.bundle import (
    MANIFEST,
    Bundle,
    BundleError,
    Manifest,
    ModelEntry,
    forget_bundle,
    load_bundle,
    read_manifest,
    sha256_of,
    write_manifest,
)
from bonewatch.models.engines import InferenceThreads, OnnxPredictor
from bonewatch.models.extras import installed_versions
from bonewatch.models.phantoms import OTHER_REGIONS, PARTS, draw_phantom
from bonewatch.models.preprocess import PreprocessSpec, preprocess_batch

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE_AUROC = 0.005
DEFAULT_TOLERANCE_ACCURACY = 0.005
DEFAULT_CALIBRATION_IMAGES = 120
CALIBRATION_SEED = 424242
METRICS = ("fracture_auroc_study", "kappa_study", "body_part_accuracy")


class QuantizationRefused(BundleError):
    """The int8 cascade lost more than the tolerance on held-out data; nothing was added."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class QuantizedModel:
    role: str
    file: str
    max_abs_diff: float


def _phantom_pixels(regions: Sequence[str], n: int, seed: int, size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        draw_phantom(
            regions[i % len(regions)],
            fractured=regions[i % len(regions)] in PARTS and (i // len(regions)) % 2 == 0,
            rng=rng,
            size=size,
        ).pixels
        for i in range(n)
    ]


def _dataset_pixels(dataset: Path, part: str | None, n: int, seed: int) -> list[np.ndarray]:
    from bonewatch.ingest import IngestError, read_image
    from bonewatch.models.datasets import load_dataset

    samples = [s for s in load_dataset(dataset) if part is None or s.part == part]
    if not samples:
        raise BundleError(f"{dataset} has no images{f' of {part}' if part else ''} to calibrate on")
    order = np.random.default_rng(seed).permutation(len(samples))
    pixels = []
    for i in order:
        try:
            pixels.append(read_image(samples[int(i)].path, salt="calibration").pixels)
        except (IngestError, OSError) as exc:
            log.warning("calibration: skipping %s: %s", samples[int(i)].path, exc)
        if len(pixels) == n:
            break
    return pixels


def calibration_inputs(
    role: str,
    spec: PreprocessSpec,
    *,
    dataset: Path | None = None,
    n: int = DEFAULT_CALIBRATION_IMAGES,
    seed: int = CALIBRATION_SEED,
) -> np.ndarray:
    """Model inputs to calibrate ``role`` on, through the bundle's preprocessing: stage 1 sees
    every region, a fracture model its own part (intact and fractured)."""
    part = None if role == "body_part" else role.removeprefix("fracture_").upper()
    if dataset is not None:
        pixels = _dataset_pixels(dataset, part, n, seed)
    else:
        regions = (*PARTS, *OTHER_REGIONS) if part is None else (part,)
        pixels = _phantom_pixels(regions, n, seed, max(4 * spec.input_size, 256))
    return preprocess_batch(pixels, spec)


class _Reader:
    """ONNX Runtime's CalibrationDataReader over a preprocessed batch, one image per call."""

    def __init__(self, name: str, x: np.ndarray) -> None:
        self._all = [{name: x[i : i + 1]} for i in range(len(x))]
        self._rows = iter(self._all)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._rows, None)

    def rewind(self) -> None:
        """Start again from the first image (calibrators that read the data twice ask)."""
        self._rows = iter(self._all)


def quantize_model(fp32: Path, out: Path, x: np.ndarray, *, reduce_range: bool = True) -> None:
    """Write the int8 QDQ (per-channel, S8S8) model of ``fp32`` calibrated on inputs ``x``.

    Weights are quantized to 7 bits (``reduce_range``): x86 CPUs without VNNI compute int8 dot
    products with instructions whose 16-bit sums saturate on full-range weights (there, p moved
    by up to 0.3), and the bundle must serve the same on every CPU it is copied to.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    reader_cls = type("Reader", (_Reader, CalibrationDataReader), {})
    name = OnnxPredictor(fp32, InferenceThreads())._input
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
            source = prepared
        except Exception as exc:  # pre-processing is an optimisation, not a requirement
            log.info("quantization pre-processing skipped for %s: %s", fp32.name, exc)
            source = fp32
        quantize_static(
            str(source),
            str(out),
            reader_cls(name, x),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            reduce_range=reduce_range,
        )


def _metrics(report: dict[str, Any]) -> dict[str, Any]:
    out = {k: report.get(k) for k in METRICS}
    out["per_part"] = {
        part: {"auroc_study": b.get("auroc_study"), "kappa_study": b.get("kappa_study")}
        for part, b in report.get("per_part", {}).items()
    }
    return out


def _delta(new: float | None, old: float | None) -> float | None:
    return None if new is None or old is None else round(float(new) - float(old), 6)


def _evaluate(samples: Sequence[Any], bundle: Bundle) -> dict[str, Any]:
    from bonewatch.models.evaluate import evaluate_bundle

    return _metrics(evaluate_bundle(samples, bundle, bootstrap=None))


def compare_cascades(
    samples: Sequence[Any], fp32: Bundle, int8_stage1: Any, int8_fracture: dict[str, Any]
) -> dict[str, Any]:
    """fp32 and int8 metrics on ``samples``, and their changes for the whole cascade and per
    model (stage 1 swapped alone: body-part accuracy; the fracture models swapped alone, stage 1
    staying fp32: each part's study AUROC and kappa)."""
    both = replace(fp32, body_part_model=int8_stage1, fracture_models=int8_fracture)
    only1 = replace(fp32, body_part_model=int8_stage1)
    only2 = replace(fp32, fracture_models=int8_fracture)
    base, whole, m1, m2 = (_evaluate(samples, b) for b in (fp32, both, only1, only2))
    per_model: dict[str, Any] = {
        "body_part": {
            "body_part_accuracy": _delta(m1["body_part_accuracy"], base["body_part_accuracy"]),
            "fracture_auroc_study": _delta(
                m1["fracture_auroc_study"], base["fracture_auroc_study"]
            ),
        }
    }
    for part, block in base["per_part"].items():
        new = m2["per_part"].get(part, {})
        per_model[f"fracture_{part.lower()}"] = {
            k: _delta(new.get(k), block.get(k)) for k in ("auroc_study", "kappa_study")
        }
    return {
        "fp32": base,
        "int8": whole,
        "delta": {
            "cascade": {k: _delta(whole[k], base[k]) for k in METRICS},
            "per_model": per_model,
        },
    }


def quantize_bundle(
    bundle_dir: str | Path,
    *,
    heldout: str | Path,
    heldout_source: str | None = None,
    calibrate: str | Path | None = None,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    tolerance_auroc: float = DEFAULT_TOLERANCE_AUROC,
    tolerance_accuracy: float = DEFAULT_TOLERANCE_ACCURACY,
    report: Callable[[str], None] | None = None,
) -> tuple[Manifest, list[QuantizedModel], dict[str, Any]]:
    """Add an int8 model for every ONNX model of a bundle, if the cascade keeps its accuracy.

    Args:
        calibrate: A dataset to calibrate on (any layout :func:`load_dataset` reads); phantoms
            when None.
        heldout: A labelled dataset to compare the cascades on (any layout
            :func:`load_dataset` reads).
        heldout_source: What ``heldout`` is, as the manifest records it (``phantoms, seed
            90210``); its path when None.
        tolerance_auroc: The largest drop in the cascade's study AUROC accepted.
        tolerance_accuracy: The largest drop in body-part accuracy accepted.

    Returns:
        The updated manifest, one :class:`QuantizedModel` per model, and the comparison.

    Raises:
        BundleError: the bundle has no ONNX models.
        QuantizationRefused: a drop over the tolerance; the bundle is unchanged.
    """
    say = report or (lambda _m: None)
    root = Path(bundle_dir).resolve()
    manifest = read_manifest(root)
    if not manifest.has_onnx():
        raise BundleError(
            f"bundle {manifest.name} has no ONNX models to quantize; run "
            "`bonewatch bundle export-onnx` first"
        )
    dataset = Path(calibrate) if calibrate is not None else None
    from bonewatch.models.datasets import load_dataset

    samples = load_dataset(Path(heldout))  # before any work: a wrong path costs nothing
    entries: dict[str, ModelEntry] = manifest.models()
    done: dict[str, tuple[str, float]] = {}  # fp32 sha256 -> (int8 file, gap)
    written: list[Path] = []
    results: list[QuantizedModel] = []
    predictors: dict[str, Any] = {}
    try:
        for role, entry in entries.items():
            assert entry.onnx is not None
            name = Path(entry.onnx.file).with_suffix(".int8.onnx").name
            if entry.onnx.sha256 not in done:
                say(f"quantizing {role} ({entry.spec.input_size}px)")
                x = calibration_inputs(role, entry.spec, dataset=dataset, n=calibration_images)
                tmp_out = root / f".{name}.{os.getpid()}.tmp"
                written.append(tmp_out)
                quantize_model(root / entry.onnx.file, tmp_out, x)
                from bonewatch.models.onnx_export import max_output_difference, parity_inputs

                px = parity_inputs(entry.spec)
                threads = InferenceThreads()
                gap = max_output_difference(
                    OnnxPredictor(root / entry.onnx.file, threads)(px),
                    OnnxPredictor(tmp_out, threads)(px),
                )
                done[entry.onnx.sha256] = (tmp_out.name, gap)
            tmp_name, gap = done[entry.onnx.sha256]
            predictors[role] = OnnxPredictor(root / tmp_name, InferenceThreads())
            results.append(QuantizedModel(role, name, gap))

        say("comparing the int8 cascade with the fp32 one on held-out data")
        fp32 = load_bundle(root, engine="onnx", precision="fp32")
        fracture = {p: predictors[f"fracture_{p.lower()}"] for p in manifest.parts()}
        comparison = compare_cascades(samples, fp32, predictors["body_part"], fracture)
        cascade = comparison["delta"]["cascade"]
        drops = {
            "fracture_auroc_study": (cascade["fracture_auroc_study"], tolerance_auroc),
            "body_part_accuracy": (cascade["body_part_accuracy"], tolerance_accuracy),
        }
        over = {k: d for k, (d, tol) in drops.items() if d is not None and -d > tol}
        if over:
            raise QuantizationRefused(
                "the int8 cascade lost "
                + ", ".join(f"{-d:.4f} {k}" for k, d in over.items())
                + f" (tolerance {tolerance_auroc} AUROC, {tolerance_accuracy} accuracy); "
                "no int8 model was added",
                comparison,
            )
        by_tmp = {
            done[e.onnx.sha256][0]: Path(e.onnx.file).with_suffix(".int8.onnx").name
            for e in entries.values()
            if e.onnx is not None
        }
        for tmp_name, final in by_tmp.items():
            os.replace(root / tmp_name, root / final)
    finally:
        for path in written:
            path.unlink(missing_ok=True)
    held_images = len(samples)
    data = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    raw_entries = [data["body_part"], *(data["fracture"][p] for p in manifest.parts())]
    finals = {}
    for (role, entry), raw in zip(entries.items(), raw_entries, strict=True):
        assert entry.onnx is not None
        final = by_tmp[done[entry.onnx.sha256][0]]
        finals[role] = final
        raw["int8"] = {
            "file": final,
            "sha256": sha256_of(root / final),
            "max_abs_diff": done[entry.onnx.sha256][1],
            "quant_format": "QDQ",
            "per_channel": True,
            "weights": "S8",
            "reduce_range": True,
            "activations": "S8",
        }
    data["quantization"] = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "method": (
            "onnxruntime.quantization.quantize_static, QDQ, per-channel, S8S8, 7-bit weights "
            "(reduce_range), MinMax"
        ),
        "calibration": {
            "source": str(dataset) if dataset else f"phantoms, seed {CALIBRATION_SEED}",
            "images_per_model": calibration_images,
            "stage1": "every region",
            "fracture": "the model's own part, intact and fractured",
        },
        "heldout": {
            "source": heldout_source or str(heldout),
            "n_studies": comparison["fp32"].get("n_studies"),
            "n_images": held_images,
        },
        "tolerance": {
            "fracture_auroc_study": tolerance_auroc,
            "body_part_accuracy": tolerance_accuracy,
        },
        **comparison,
        "library_versions": installed_versions("onnx", "onnxruntime"),
    }
    updated = write_manifest(root, data)
    forget_bundle(root)
    results = [replace(r, file=finals[r.role]) for r in results]
    log.info("added int8 models to %s", root)
    return updated, results, comparison


__all__ = [
    "QuantizationRefused",
    "QuantizedModel",
    "calibration_inputs",
    "compare_cascades",
    "quantize_bundle",
    "quantize_model",
]
