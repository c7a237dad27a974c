"""Training a two-stage bundle: stage 1 over the seven parts plus ``other``, then one fracture
model per part, each threshold chosen on validation patients, metrics on held-out patients."""

from __future__ import annotations

import datetime as dt
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

from ingest import MURA_PARTS, read_image
from models.architectures import build_classifier, default_spec
from models.bundle import (
    OTHER,
    SCHEMA_VERSION,
    forget_bundle,
    load_bundle,
    sha256_of,
    write_manifest,
)
from models.datasets import Sample, fingerprint, split_by_patient
from models.evaluate import evaluate_bundle
from models.preprocess import PreprocessSpec, preprocess

log = logging.getLogger(__name__)

BODY_PART_LABELS = [*MURA_PARTS, OTHER]
THRESHOLD_RULE = (
    "youden: the study-score threshold on validation patients that maximises "
    "sensitivity + specificity - 1 (ties: the one nearest 0.5)"
)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run (recorded in the manifest)."""

    backbone: str = "small_cnn"
    input_size: int = 128
    epochs: int = 15
    fracture_epochs: int = 40
    part_epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 2e-3
    patience: int = 8
    seed: int = 0
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    confidence_floor: float = 0.7
    width: int = 16
    augment: str = "flip"  # "flip", or "full": flips, rotation, zoom and brightness
    weights: str | None = None


@dataclass
class TrainResult:
    bundle_dir: Path
    manifest: dict[str, Any]
    history: dict[str, dict[str, list[float]]] = field(default_factory=dict)


Report = Callable[[str], None]


def load_arrays(samples: Sequence[Sample], spec: PreprocessSpec, *, salt: str) -> np.ndarray:
    """Read and preprocess ``samples`` with the manifest's preprocessing (threads overlap I/O)."""

    def one(sample: Sample) -> np.ndarray:
        return preprocess(read_image(sample.path, salt=salt).pixels, spec)

    out = np.empty((len(samples), spec.input_size, spec.input_size, spec.channels), np.float32)
    with ThreadPoolExecutor(max_workers=4) as pool:
        for i, x in enumerate(pool.map(one, samples)):
            out[i] = x
    return out


def choose_threshold(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Youden's J on study scores; 0.5 when validation has only one class."""
    if len(set(labels)) < 2:
        return 0.5
    fpr, tpr, thresholds = roc_curve(labels, scores)
    j = tpr - fpr
    finite = np.isfinite(thresholds)
    best = np.max(j[finite])
    candidates = thresholds[finite & (j >= best - 1e-12)]
    return float(np.clip(candidates[np.argmin(np.abs(candidates - 0.5))], 0.0, 1.0))


def _study_means(samples: Sequence[Sample], probs: np.ndarray) -> tuple[list[int], list[float]]:
    by_study: dict[str, list[float]] = {}
    label: dict[str, int] = {}
    for s, p in zip(samples, probs, strict=True):
        by_study.setdefault(s.study, []).append(float(p))
        label[s.study] = s.label
    keys = sorted(by_study)
    return [label[k] for k in keys], [float(np.mean(by_study[k])) for k in keys]


def _class_weights(y: np.ndarray, n: int) -> dict[int, float]:
    counts = np.bincount(y, minlength=n).astype(float)
    total = counts.sum()
    return {i: float(total / (n * c)) if c else 0.0 for i, c in enumerate(counts)}


def _epoch_reporter(stage: str, epochs: int, report: Report) -> Any:
    """A Keras callback that forwards one line per epoch to ``report``."""
    import keras

    def on_epoch_end(epoch: int, logs: dict[str, float] | None = None) -> None:
        shown = ", ".join(f"{k} {v:.3f}" for k, v in sorted((logs or {}).items()))
        report(f"{stage}: epoch {epoch + 1}/{epochs} {shown}")

    return keras.callbacks.LambdaCallback(on_epoch_end=on_epoch_end)


def _fit(
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    xv: np.ndarray,
    yv: np.ndarray,
    *,
    loss: str,
    epochs: int,
    learning_rate: float,
    config: TrainConfig,
    class_weight: dict[int, float],
    stage: str,
    report: Report,
) -> dict[str, list[float]]:
    import keras
    from keras import layers

    steps = [layers.RandomFlip("horizontal_and_vertical")]
    if config.augment == "full":
        steps += [
            layers.RandomRotation(0.08, fill_mode="constant"),
            layers.RandomZoom(0.1, fill_mode="constant"),
            layers.RandomBrightness(0.1, value_range=(0.0, 1.0)),
        ]
    augment = keras.Sequential(steps, name="augment")
    trainer = keras.Sequential([augment, model], name=f"train_{model.name}")
    if loss.startswith("sparse"):
        metrics: list[Any] = ["accuracy"]
        monitor, mode = "val_loss", "min"
    else:
        metrics = [keras.metrics.AUC(name="auc")]
        monitor, mode = "val_auc", "max"
    trainer.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, metrics=metrics)
    callbacks = [
        # Fracture models sit on a plateau for many epochs before the break "clicks"; watching
        # validation AUROC rather than loss keeps early stopping from ending them there.
        keras.callbacks.EarlyStopping(
            monitor=monitor, mode=mode, patience=config.patience, restore_best_weights=True
        ),
        keras.callbacks.ReduceLROnPlateau(
            monitor=monitor, mode=mode, factor=0.5, patience=max(config.patience // 2, 1)
        ),
        _epoch_reporter(stage, epochs, report),
    ]
    history = trainer.fit(
        x,
        y,
        validation_data=(xv, yv) if len(xv) else None,
        epochs=epochs,
        batch_size=config.batch_size,
        class_weight=class_weight,
        callbacks=callbacks if len(xv) else callbacks[2:],
        verbose=0,
        shuffle=True,
    )
    return {k: [float(v) for v in vals] for k, vals in history.history.items()}


def _library_versions() -> dict[str, str]:
    import keras
    import sklearn
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
    }


def _train_into(
    out: Path,
    samples: Sequence[Sample],
    *,
    config: TrainConfig,
    name: str,
    version: str | None,
    intended_use: str,
    dataset: str,
    command: str,
    salt: str,
    report: Report,
) -> tuple[dict[str, Any], dict[str, dict[str, list[float]]]]:
    import keras

    keras.utils.set_random_seed(config.seed)
    train, val, test = split_by_patient(samples, config.fractions, config.seed)
    if not train or not val:
        raise ValueError("too few patients to split into train and validation sets")
    report(f"split by patient: {len(train)} train, {len(val)} validation, {len(test)} test images")
    spec = default_spec(config.backbone, config.input_size)
    x_train = load_arrays(train, spec, salt=salt)
    x_val = load_arrays(val, spec, salt=salt)
    history: dict[str, dict[str, list[float]]] = {}

    labels = BODY_PART_LABELS
    y_train = np.array([labels.index(s.part) for s in train])
    y_val = np.array([labels.index(s.part) for s in val])
    stage1 = build_classifier(
        config.backbone,
        spec,
        len(labels),
        weights=config.weights,
        width=config.width,
        name="body_part",
    )
    history["body_part"] = _fit(
        stage1,
        x_train,
        y_train,
        x_val,
        y_val,
        loss="sparse_categorical_crossentropy",
        epochs=config.epochs,
        learning_rate=config.learning_rate,
        config=config,
        class_weight=_class_weights(y_train, len(labels)),
        stage="body part",
        report=report,
    )
    stage1.save(out / "body_part.keras")

    # Fracture models, in two phases: first one model learns what a break looks like on every
    # part's images; then each part's model starts from those weights and is fine-tuned on its
    # own part at a lower rate. Parts with few studies profit from the others' examples.
    tr_all = [i for i, s in enumerate(train) if s.part != OTHER]
    va_all = [i for i, s in enumerate(val) if s.part != OTHER]
    y_all = np.array([train[i].label for i in tr_all])
    shared = build_classifier(
        config.backbone,
        spec,
        1,
        pooling="max",
        weights=config.weights,
        width=config.width,
        name="fracture_shared",
    )
    history["fracture_shared"] = _fit(
        shared,
        x_train[tr_all],
        y_all,
        x_val[va_all],
        np.array([val[i].label for i in va_all]),
        loss="binary_crossentropy",
        epochs=config.fracture_epochs,
        learning_rate=config.learning_rate,
        config=config,
        class_weight=_class_weights(y_all, 2),
        stage="fracture, all parts",
        report=report,
    )
    fracture: dict[str, dict[str, Any]] = {}
    for part in MURA_PARTS:
        tr = [i for i, s in enumerate(train) if s.part == part]
        va = [i for i, s in enumerate(val) if s.part == part]
        if not tr:
            raise ValueError(f"no training images for {part}; every part needs examples")
        yt = np.array([train[i].label for i in tr])
        yv = np.array([val[i].label for i in va])
        model = build_classifier(
            config.backbone,
            spec,
            1,
            pooling="max",
            weights=config.weights,
            width=config.width,
            name=f"fracture_{part.lower()}",
        )
        model.set_weights(shared.get_weights())
        history[part] = _fit(
            model,
            x_train[tr],
            yt,
            x_val[va],
            yv,
            loss="binary_crossentropy",
            epochs=config.part_epochs,
            learning_rate=config.learning_rate / 5,
            config=config,
            class_weight=_class_weights(yt, 2),
            stage=f"fracture {part.lower()}",
            report=report,
        )
        probs = model.predict(x_val[va], verbose=0)[:, 0] if va else np.zeros(0)
        threshold = choose_threshold(*_study_means([val[i] for i in va], probs))
        weights = f"fracture_{part.lower()}.keras"
        model.save(out / weights)
        fracture[part] = {
            "weights": weights,
            "sha256": sha256_of(out / weights),
            "preprocessing": spec.to_dict(),
            "backbone": config.backbone,
            "threshold": threshold,
            "threshold_rule": THRESHOLD_RULE,
        }
        report(f"fracture {part.lower()}: threshold {threshold:.3f} on validation studies")

    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "version": version or dt.datetime.now(dt.UTC).strftime("%Y.%m.%d.%H%M"),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "intended_use": intended_use,
        "trained_on": {
            "dataset": dataset,
            "fingerprint": fingerprint(samples),
            "n_images": len(samples),
            "n_studies": len({s.study for s in samples}),
            "n_patients": len({s.patient for s in samples}),
            "split": {"train": len(train), "validation": len(val), "test": len(test)},
            "split_rule": "by patient, shuffled with the seed",
        },
        "command": command,
        "training": {k: v for k, v in asdict(config).items()},
        "library_versions": _library_versions(),
        "body_part": {
            "weights": "body_part.keras",
            "sha256": sha256_of(out / "body_part.keras"),
            "preprocessing": spec.to_dict(),
            "backbone": config.backbone,
            "labels": labels,
            "confidence_floor": config.confidence_floor,
        },
        "fracture": fracture,
        "metrics": {},
    }
    write_manifest(out, manifest)
    if test:
        report(f"evaluating on {len(test)} held-out images")
        metrics = evaluate_bundle(test, load_bundle(out), batch_size=config.batch_size)
        metrics.pop("bundle", None)
        metrics.pop("bundle_version", None)
        manifest["metrics"] = {"split": "held-out test patients", **metrics}
        write_manifest(out, manifest)
    return manifest, history


def train_bundle(
    samples: Sequence[Sample],
    out_dir: str | Path,
    *,
    config: TrainConfig = TrainConfig(),
    name: str = "bundle",
    version: str | None = None,
    intended_use: str = "Research use: fracture triage on upper-limb radiographs.",
    dataset: str = "",
    command: str = "",
    salt: str = "training",
    report: Report = log.info,
) -> TrainResult:
    """Train stage 1 and every part's fracture model on ``samples`` and write a bundle.

    Patients are split into train / validation / held-out test by ``config.fractions``; no
    patient is in two splits. Each part's threshold is chosen on validation study scores
    (:data:`THRESHOLD_RULE`); the manifest's metrics are measured on the held-out patients
    through the same cascade the worker serves with.
    """
    final = Path(out_dir)
    if final.exists() and any(final.iterdir()) and not (final / "manifest.json").is_file():
        raise ValueError(f"{final} exists and is not a bundle; refusing to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target and swap at the end: a failed run leaves the old bundle intact.
    out = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    out.chmod(0o777 & ~umask)  # mkdtemp makes it private; a bundle is read by other users
    try:
        manifest, history = _train_into(
            out,
            samples,
            config=config,
            name=name,
            version=version,
            intended_use=intended_use,
            dataset=dataset,
            command=command,
            salt=salt,
            report=report,
        )
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    forget_bundle(out)
    forget_bundle(final)
    # Swap by renames, so a reader never finds the folder missing or half written.
    old = final.with_name(f".{final.name}.previous")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    out.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return TrainResult(final, manifest, history)
