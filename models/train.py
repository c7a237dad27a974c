"""Training a two-stage bundle: stage 1 over the seven parts plus ``other``, then one fracture
model per part, each threshold chosen on validation patients, metrics on held-out patients.

Images stream through ``tf.data``: each is read by ``ingest`` and preprocessed by
:func:`models.preprocess.preprocess`, the very code the worker serves with, in a parallel map with
prefetch. By default the preprocessed tensors are written once to a disk cache in the run's work
folder (a memory-mapped file), so later epochs skip decoding without holding the set in memory.

A run builds its bundle in ``.<name>.partial/`` beside the target folder. The work folder inside
it keeps a checkpoint after every epoch and a record of every finished stage, so an interrupted
run continues where it stopped (``resume=True``); the finished bundle replaces the target by
renames and the work folder is dropped.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import platform
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

from bonewatch.ingest import MURA_PARTS, IngestError, read_image
from bonewatch.models.architectures import (
    build_classifier,
    default_spec,
    set_trainable,
)
from bonewatch.models.bundle import (
    OTHER,
    SCHEMA_VERSION,
    forget_bundle,
    load_bundle,
    sha256_of,
    write_manifest,
)
from bonewatch.models.datasets import Sample, fingerprint, split_by_patient
from bonewatch.models.evaluate import evaluate_bundle
from bonewatch.models.preprocess import PreprocessSpec, preprocess
from bonewatch.models.recipe import TrainConfig

log = logging.getLogger(__name__)

BODY_PART_LABELS = [*MURA_PARTS, OTHER]
THRESHOLD_RULE = (
    "youden: the study-score threshold on validation patients that maximises "
    "sensitivity + specificity - 1 (ties: the one nearest 0.5)"
)
WORK_DIR = "work"
SEED_NOTE = (
    "keras.utils.set_random_seed(seed) seeds Python, NumPy and TensorFlow before training; the "
    "patient split uses the same seed. Parallel CPU/GPU kernels are not bit-deterministic, so a "
    "rerun gives close, not identical, weights."
)


@dataclass
class TrainResult:
    bundle_dir: Path
    manifest: dict[str, Any]
    history: dict[str, dict[str, list[float]]] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainProgress:
    """Where training is, for a progress display: ``step`` of ``steps`` in ``epoch``/``epochs``.

    ``epoch`` is 0 while images are read into the cache; ``steps`` is None when unknown.
    """

    stage: str
    epoch: int
    epochs: int
    step: int
    steps: int | None


Report = Callable[[str], None]
ProgressFn = Callable[[TrainProgress], None]


# --- input pipeline --------------------------------------------------------------------------


def read_preprocessed(sample: Sample, spec: PreprocessSpec, *, salt: str) -> np.ndarray | None:
    """One image read and preprocessed exactly as the worker serves it; None if unreadable."""
    try:
        return preprocess(read_image(sample.path, salt=salt).pixels, spec)
    except (IngestError, OSError) as exc:
        log.warning("skipping unreadable image %s: %s", sample.path, exc)
        return None


class ImageStore:
    """The preprocessed images of a list of samples, by index, as ``tf.data`` pipelines.

    Without a cache every pass reads and preprocesses each image again (in parallel, ahead of
    the model); :meth:`fill_cache` instead writes every tensor once into a memory-mapped file,
    which the operating system pages in and out, so memory stays bounded either way.
    """

    def __init__(self, samples: Sequence[Sample], spec: PreprocessSpec, *, salt: str) -> None:
        self.samples = list(samples)
        self.spec = spec
        self.salt = salt
        self.shape = (spec.input_size, spec.input_size, spec.channels)
        # Unknown until read: streaming drops unreadable images as it meets them.
        self.readable = np.ones(len(self.samples), bool)
        self._cache: np.ndarray | None = None

    @property
    def cached(self) -> bool:
        return self._cache is not None

    def cache_bytes(self) -> int:
        return len(self.samples) * int(np.prod(self.shape)) * 4

    def _load(self, index: Any) -> tuple[np.ndarray, bool]:
        x = read_preprocessed(self.samples[int(index)], self.spec, salt=self.salt)
        if x is None:
            self.readable[int(index)] = False  # later passes and thresholds leave it out
            return np.zeros(self.shape, np.float32), False
        return x, True

    def _decoded(self, indices: np.ndarray) -> Any:
        """``(index, image, readable)`` per index, read in parallel, in order."""
        import tensorflow as tf

        def load(i: Any) -> tuple[Any, Any, Any]:
            x, ok = tf.numpy_function(self._load, [i], (tf.float32, tf.bool))
            x.set_shape(self.shape)
            ok.set_shape(())
            return i, x, ok

        return tf.data.Dataset.from_tensor_slices(indices.astype(np.int64)).map(
            load, num_parallel_calls=tf.data.AUTOTUNE
        )

    def fill_cache(self, folder: Path, *, progress: Callable[[int, int], None] | None) -> None:
        """Read every image once into ``folder``; reuse what an interrupted run finished."""
        import tensorflow as tf

        images, flags, done = folder / "images.npy", folder / "readable.npy", folder / "done.json"
        stamp = {"n": len(self.samples), "spec": self.spec.to_dict()}
        if not (done.is_file() and json.loads(done.read_text()) == stamp):
            folder.mkdir(parents=True, exist_ok=True)
            done.unlink(missing_ok=True)
            out = np.lib.format.open_memmap(
                images, mode="w+", dtype=np.float32, shape=(len(self.samples), *self.shape)
            )
            readable = np.zeros(len(self.samples), bool)
            batches = self._decoded(np.arange(len(self.samples))).batch(64)
            finished = 0
            for i, x, ok in batches.prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
                out[i] = x
                readable[i] = ok
                finished += len(i)
                if progress is not None:
                    progress(finished, len(self.samples))
            out.flush()
            del out
            np.save(flags, readable)
            done.write_text(json.dumps(stamp))
        self._cache = np.load(images, mmap_mode="r")
        self.readable = np.load(flags)

    def _gather(self, indices: Any) -> np.ndarray:
        assert self._cache is not None
        return np.asarray(self._cache[np.asarray(indices)], np.float32)

    def usable(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """``indices`` without the images known to be unreadable."""
        idx = np.asarray(indices, np.int64)
        return idx[self.readable[idx]]

    def dataset(
        self,
        indices: Sequence[int] | np.ndarray,
        targets: np.ndarray,
        *,
        batch_size: int,
        shuffle_seed: int | None = None,
        class_weight: dict[int, float] | None = None,
    ) -> Any:
        """A ``tf.data.Dataset`` of ``(images, targets, weights)`` batches, prefetched.

        An unreadable image stays in its batch as zeros with weight 0, so every pass has the
        same, known number of batches.

        Args:
            indices: Which samples, in order.
            targets: One target per index (class index or 0/1 label).
            shuffle_seed: Shuffle anew every pass, from this seed; None keeps the order.
            class_weight: Loss weight of each class; 1 for all when None.
        """
        import tensorflow as tf

        idx = np.asarray(indices, np.int64)
        y = np.asarray(targets)
        weights = np.ones(len(idx), np.float32)
        if class_weight is not None:
            weights = np.array([class_weight.get(int(t), 1.0) for t in y], np.float32)
        weights *= self.readable[idx]
        ds = tf.data.Dataset.from_tensor_slices((idx, y, weights))
        if shuffle_seed is not None and len(idx):
            ds = ds.shuffle(len(idx), seed=shuffle_seed, reshuffle_each_iteration=True)
        if self._cache is not None:

            def gather(i: Any, y: Any, w: Any) -> tuple[Any, Any, Any]:
                x = tf.numpy_function(self._gather, [i], tf.float32, stateful=False)
                x.set_shape((None, *self.shape))
                return x, y, w

            ds = ds.batch(batch_size).map(gather, num_parallel_calls=tf.data.AUTOTUNE)
        else:

            def load(i: Any, y: Any, w: Any) -> tuple[Any, Any, Any]:
                x, ok = tf.numpy_function(self._load, [i], (tf.float32, tf.bool))
                x.set_shape(self.shape)
                ok.set_shape(())
                return x, y, w * tf.cast(ok, tf.float32)

            ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
        return ds.prefetch(tf.data.AUTOTUNE)

    def batches(
        self, indices: Sequence[int] | np.ndarray, batch_size: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(indices, images)`` of the readable images among ``indices``, in order."""
        import tensorflow as tf

        idx = np.asarray(indices, np.int64)
        if self._cache is not None:
            idx = self.usable(idx)
            for start in range(0, len(idx), batch_size):
                chunk = idx[start : start + batch_size]
                yield chunk, self._gather(chunk)
            return
        stream = self._decoded(idx).batch(batch_size).prefetch(tf.data.AUTOTUNE)
        for i, x, ok in stream.as_numpy_iterator():
            yield i[ok], x[ok]


# --- thresholds ------------------------------------------------------------------------------


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
    counts = np.bincount(y.astype(np.int64), minlength=n).astype(float)
    total = counts.sum()
    return {i: float(total / (n * c)) if c else 0.0 for i, c in enumerate(counts)}


# --- run state and checkpoints ---------------------------------------------------------------


def _write_json(path: Path, data: Any) -> None:
    """Write by rename, so a kill leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _save_weights(model: Any, path: Path) -> None:
    tmp = path.with_name(f"{path.name.removesuffix('.weights.h5')}.tmp.weights.h5")
    model.save_weights(tmp)
    os.replace(tmp, path)


@dataclass(frozen=True)
class TrainingPhase:
    """One ``fit`` of a stage: how many epochs, what may train, at what rate."""

    name: str  # "from_scratch", "frozen" or "fine_tune"
    epochs: int
    trainable: int | None  # for set_trainable: None all, 0 head only, n top n
    learning_rate: float


def training_phases(config: TrainConfig, epochs: int, *, from_learned: bool) -> list[TrainingPhase]:
    """Two-phase transfer learning for pretrained backbones, one phase otherwise.

    ``from_learned``: the model starts from weights this run learned (a part's model starts
    from the shared fracture model), so it is fine-tuned from the first epoch.
    """
    pretrained = config.weights is not None
    if from_learned:
        trainable = config.fine_tune_layers if pretrained else None
        return [TrainingPhase("fine_tune", epochs, trainable, config.tune_rate)]
    if not pretrained:
        return [TrainingPhase("from_scratch", epochs, None, config.learning_rate)]
    frozen = min(config.freeze_epochs, epochs)
    phases = [
        TrainingPhase("frozen", frozen, 0, config.learning_rate),
        TrainingPhase("fine_tune", epochs - frozen, config.fine_tune_layers, config.tune_rate),
    ]
    return [p for p in phases if p.epochs > 0]


@functools.cache
def _callback_types() -> tuple[Any, Any]:
    """Keras callback classes, defined on first use so importing this module loads no Keras."""
    import keras

    class EpochCheckpoint(keras.callbacks.Callback):  # type: ignore[misc]
        """Saves the trainer (weights and optimizer) and the phase's state after every epoch;
        keeps the best weights on the monitored score, halves the rate on a plateau and stops
        after ``patience`` epochs without improvement. Its state survives a restart."""

        def __init__(
            self,
            folder: Path,
            state: dict[str, Any],
            model: Any,
            *,
            monitor: str | None,
            mode: str,
            patience: int,
            report: Report,
            title: str,
        ) -> None:
            super().__init__()
            self.folder = folder
            self.state = state
            self.inner = model
            self.monitor = monitor
            self.mode = mode
            self.patience = patience
            self.report = report
            self.title = title

        def _better(self, value: float) -> bool:
            best = self.state["best"]
            if best is None:
                return True
            return value < best if self.mode == "min" else value > best

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            logs = dict(logs or {})
            history = self.state["history"]
            for key, value in logs.items():
                history.setdefault(key, []).append(float(value))
            value = logs.get(self.monitor) if self.monitor else None
            if value is not None and np.isfinite(value):
                if self._better(float(value)):
                    self.state.update(best=float(value), best_epoch=epoch + 1, wait=0)
                    _save_weights(self.inner, self.folder / "best.weights.h5")
                else:
                    self.state["wait"] += 1
                    lr_patience = max(self.patience // 2, 1)
                    if self.state["wait"] % lr_patience == 0:
                        rate = self.model.optimizer.learning_rate
                        rate.assign(float(rate.numpy()) * 0.5)
                    if self.state["wait"] >= self.patience:
                        self.model.stop_training = True
                        self.state["stopped"] = True
                        self.report(
                            f"{self.title}: no better {self.monitor} for {self.patience} epochs; "
                            f"stopping, keeping epoch {self.state['best_epoch']}"
                        )
            _save_weights(self.model, self.folder / "latest.weights.h5")
            self.state["epoch"] = self.state.get("epoch", 0) + 1
            _write_json(self.folder / "state.json", self.state)

    class ProgressReport(keras.callbacks.Callback):  # type: ignore[misc]
        """One report line per epoch, and a progress event per batch."""

        def __init__(
            self, title: str, epochs: int, report: Report, progress: ProgressFn | None
        ) -> None:
            super().__init__()
            self.title = title
            self.epochs = epochs
            self.report = report
            self.progress = progress
            self.epoch = 0

        def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            self.epoch = epoch + 1
            if self.progress is not None:
                steps = self.params.get("steps") if self.params else None
                self.progress(TrainProgress(self.title, self.epoch, self.epochs, 0, steps))

        def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            if self.progress is not None:
                steps = self.params.get("steps") if self.params else None
                self.progress(TrainProgress(self.title, self.epoch, self.epochs, batch + 1, steps))

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            shown = ", ".join(
                f"{k} {v:.3f}" for k, v in sorted((logs or {}).items()) if k != "learning_rate"
            )
            self.report(f"{self.title}: epoch {epoch + 1}/{self.epochs} {shown}")

    return EpochCheckpoint, ProgressReport


def _augmentation(config: TrainConfig) -> list[Any]:
    from keras import layers

    if config.augment == "none":
        return []
    steps: list[Any] = [layers.RandomFlip("horizontal_and_vertical", name="flip")]
    if config.augment == "full":
        steps += [
            layers.RandomRotation(0.08, fill_mode="constant", name="rotate"),
            layers.RandomZoom(0.1, fill_mode="constant", name="zoom"),
            layers.RandomBrightness(0.1, value_range=_value_range(config), name="brightness"),
        ]
    return steps


def _value_range(config: TrainConfig) -> tuple[float, float]:
    """The range the model's input takes, so brightness shifts stay inside it."""
    spec = default_spec(config.backbone, config.input_size)
    if spec.normalization == "imagenet":
        return (-2.2, 2.7)  # (0 - max mean) / min std .. (1 - min mean) / min std, rounded out
    if spec.normalization == "minus_one_one":
        return (-1.0, 1.0)
    return (0.0, 1.0)


@dataclass
class _StageData:
    """A stage's training and validation images (indices into the store) and targets."""

    train: np.ndarray
    y_train: np.ndarray
    val: np.ndarray
    y_val: np.ndarray


class _Trainer:
    """Runs the stages of one training run against its store, work folder and callbacks."""

    def __init__(
        self,
        config: TrainConfig,
        store: ImageStore,
        work: Path,
        *,
        report: Report,
        progress: ProgressFn | None,
        callbacks: Sequence[Any],
    ) -> None:
        self.config = config
        self.store = store
        self.work = work
        self.report = report
        self.progress = progress
        self.callbacks = list(callbacks)

    def _phase_state(self, folder: Path) -> dict[str, Any]:
        path = folder / "state.json"
        if path.is_file():
            state: dict[str, Any] = json.loads(path.read_text())
            return state
        return {
            "epoch": 0,
            "history": {},
            "best": None,
            "best_epoch": None,
            "wait": 0,
            "stopped": False,
            "done": False,
        }

    def fit(
        self,
        model: Any,
        data: _StageData,
        *,
        key: str,
        title: str,
        loss: str,
        phases: Sequence[TrainingPhase],
    ) -> tuple[dict[str, list[float]], list[dict[str, Any]]]:
        """Train ``model`` through ``phases``, each resumable from its last finished epoch.

        Returns:
            The stage's history (every phase's epochs in order) and what each phase ran.
        """
        import keras

        config = self.config
        checkpoint_type, progress_type = _callback_types()
        total = sum(p.epochs for p in phases)
        history: dict[str, list[float]] = {}
        ran: list[dict[str, Any]] = []
        offset = 0
        has_val = len(data.val) > 0
        binary = not loss.startswith("sparse")
        if binary and len(set(data.y_val.tolist())) == 2:
            # Fracture models sit on a plateau for many epochs before the break "clicks";
            # watching validation AUROC rather than loss keeps early stopping from ending there.
            monitor, mode = "val_auc", "max"
        else:  # stage 1, or validation images of one class only, where AUROC means nothing
            monitor, mode = "val_loss", "min"
        n_classes = 2 if binary else len(BODY_PART_LABELS)
        class_weight = _class_weights(data.y_train, n_classes) if config.class_weights else None
        for phase in phases:
            folder = self.work / "checkpoints" / f"{key}-{phase.name}"
            folder.mkdir(parents=True, exist_ok=True)
            state = self._phase_state(folder)
            trainable = set_trainable(model, phase.trainable)
            if state["done"]:
                model.load_weights(folder / "final.weights.h5")
                self.report(f"{title}: {phase.name} phase finished in the interrupted run")
            else:
                trainer = keras.Sequential([*_augmentation(config), model], name=f"train_{key}")
                trainer.build((None, *self.store.shape))
                trainer.compile(
                    optimizer=keras.optimizers.Adam(phase.learning_rate),
                    loss=loss,
                    metrics=[keras.metrics.AUC(name="auc")] if binary else ["accuracy"],
                )
                done_epochs = int(state["epoch"])
                if done_epochs and (folder / "latest.weights.h5").is_file():
                    trainer.optimizer.build(trainer.trainable_variables)
                    trainer.load_weights(folder / "latest.weights.h5")
                    self.report(
                        f"{title}: resuming the {phase.name} phase at epoch "
                        f"{offset + done_epochs + 1}/{total}"
                    )
                elif phase.trainable is not None:
                    self.report(
                        f"{title}: {phase.name} phase, {trainable} backbone layers trainable, "
                        f"rate {phase.learning_rate:g}"
                    )
                if not state["stopped"] and done_epochs < phase.epochs:
                    checkpoint = checkpoint_type(
                        folder,
                        state,
                        model,
                        monitor=monitor if has_val else None,
                        mode=mode,
                        patience=config.patience,
                        report=self.report,
                        title=title,
                    )
                    seed = config.seed + offset + done_epochs
                    trainer.fit(
                        self.store.dataset(
                            data.train,
                            data.y_train,
                            batch_size=config.batch_size,
                            shuffle_seed=seed,
                            class_weight=class_weight,
                        ),
                        validation_data=(
                            self.store.dataset(data.val, data.y_val, batch_size=config.batch_size)
                            if has_val
                            else None
                        ),
                        initial_epoch=offset + done_epochs,
                        epochs=offset + phase.epochs,
                        shuffle=False,  # the dataset shuffles itself, every pass
                        callbacks=[
                            checkpoint,
                            progress_type(title, total, self.report, self.progress),
                            *self.callbacks,
                        ],
                        verbose=0,
                    )
                if (folder / "best.weights.h5").is_file():
                    model.load_weights(folder / "best.weights.h5")
                _save_weights(model, folder / "final.weights.h5")
                state["done"] = True
                _write_json(folder / "state.json", state)
                (folder / "latest.weights.h5").unlink(missing_ok=True)
            for name, values in state["history"].items():
                history.setdefault(name, []).extend(values)
            ran.append(
                {
                    "phase": phase.name,
                    "epochs": int(state["epoch"]),
                    "learning_rate": phase.learning_rate,
                    "trainable_backbone_layers": trainable,
                    "best_epoch": state["best_epoch"],
                }
            )
            offset += int(state["epoch"])
        return history, ran


# --- provenance ------------------------------------------------------------------------------


def _library_versions() -> dict[str, str]:
    import keras
    import sklearn
    import tensorflow as tf

    versions = {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
    }
    for dist in ("bonewatch", "pillow", "pydicom", "h5py"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _initial_weights(config: TrainConfig) -> dict[str, Any]:
    if config.weights is None:
        return {"source": "random"}
    if config.weights == "imagenet":
        return {"source": "imagenet", "via": "keras.applications"}
    path = Path(config.weights)
    return {"source": "file", "path": str(path), "sha256": sha256_of(path)}


def _run_key(config: TrainConfig, print_: str, n: int) -> dict[str, Any]:
    """What must match for an interrupted run to be resumed (as JSON would give it back)."""
    key: dict[str, Any] = json.loads(
        json.dumps({"fingerprint": print_, "n_images": n, "config": asdict(config)})
    )
    return key


def _train_into(
    out: Path,
    work: Path,
    samples: Sequence[Sample],
    *,
    config: TrainConfig,
    name: str,
    version: str | None,
    intended_use: str,
    dataset: str,
    layout: str,
    command: str,
    salt: str,
    report: Report,
    progress: ProgressFn | None,
    callbacks: Sequence[Any],
    data_print: str,
    run: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, dict[str, list[float]]]]:
    import keras

    keras.utils.set_random_seed(config.seed)
    train, val, test = split_by_patient(samples, config.fractions, config.seed)
    report(f"split by patient: {len(train)} train, {len(val)} validation, {len(test)} test images")
    spec = default_spec(config.backbone, config.input_size)
    store = ImageStore([*train, *val], spec, salt=salt)
    size = store.cache_bytes()
    if 0 < size <= config.cache_gb * 1e9:
        report(f"caching {len(store.samples)} preprocessed images ({size / 1e6:.0f} MB)")
        title = "reading images"

        def cached(done: int, n: int) -> None:
            if progress is not None:
                progress(TrainProgress(title, 0, 0, done, n))

        store.fill_cache(work / "cache", progress=cached)
        skipped = int((~store.readable).sum())
        if skipped:
            report(f"{skipped} unreadable images left out (see the log for which)")
    else:
        report(
            f"streaming images from their files every epoch (a cache would take "
            f"{size / 1e9:.1f} GB; the limit is {config.cache_gb:g} GB)"
        )
    n_train = len(train)
    val_idx = np.arange(n_train, n_train + len(val))
    trainer = _Trainer(config, store, work, report=report, progress=progress, callbacks=callbacks)
    stages: dict[str, Any] = run["stages"]
    history: dict[str, dict[str, list[float]]] = {}
    phases_run: dict[str, list[dict[str, Any]]] = {}

    def finish(
        key: str, hist: dict[str, list[float]], ran: list[dict[str, Any]], **extra: Any
    ) -> None:
        stages[key] = {"history": hist, "phases": ran, **extra}
        _write_json(work / "state.json", run)

    # Stage 1: the seven parts plus "other".
    labels = BODY_PART_LABELS
    part_index = np.array([labels.index(s.part) for s in store.samples])
    if "body_part" in stages:
        report("body part: finished in the interrupted run")
    else:
        stage1 = build_classifier(
            config.backbone,
            spec,
            len(labels),
            weights=config.weights,
            width=config.width,
            name="body_part",
        )
        tr, va = store.usable(np.arange(n_train)), store.usable(val_idx)
        hist, ran = trainer.fit(
            stage1,
            _StageData(tr, part_index[tr], va, part_index[va]),
            key="body_part",
            title="body part",
            loss="sparse_categorical_crossentropy",
            phases=training_phases(config, config.epochs, from_learned=False),
        )
        stage1.save(out / "body_part.keras")
        finish("body_part", hist, ran)
    history["body_part"] = stages["body_part"]["history"]
    phases_run["body_part"] = stages["body_part"]["phases"]

    # Fracture models, in two steps: first one model learns what a break looks like on every
    # part's images; then each part's model starts from those weights and is fine-tuned on its
    # own part at a lower rate. Parts with few studies profit from the others' examples.
    fracture_label = np.array([s.label for s in store.samples], np.float32)
    is_part = np.array([s.part != OTHER for s in store.samples])
    shared = build_classifier(
        config.backbone,
        spec,
        1,
        pooling="max",
        weights=None if "fracture_shared" in stages else config.weights,
        width=config.width,
        name="fracture_shared",
    )
    shared_weights = work / "fracture_shared.weights.h5"
    if "fracture_shared" in stages:
        shared.load_weights(shared_weights)
        report("fracture, all parts: finished in the interrupted run")
    else:
        tr = store.usable(np.flatnonzero(is_part[:n_train]))
        va = store.usable(val_idx[is_part[n_train:]])
        hist, ran = trainer.fit(
            shared,
            _StageData(tr, fracture_label[tr], va, fracture_label[va]),
            key="fracture_shared",
            title="fracture, all parts",
            loss="binary_crossentropy",
            phases=training_phases(config, config.fracture_epochs, from_learned=False),
        )
        _save_weights(shared, shared_weights)
        finish("fracture_shared", hist, ran)
    history["fracture_shared"] = stages["fracture_shared"]["history"]
    phases_run["fracture_shared"] = stages["fracture_shared"]["phases"]

    fracture: dict[str, dict[str, Any]] = {}
    part_of = np.array([s.part for s in store.samples])
    for part in MURA_PARTS:
        weights = f"fracture_{part.lower()}.keras"
        title = f"fracture {part.lower()}"
        if part in stages:
            report(f"{title}: finished in the interrupted run")
        else:
            tr = store.usable(np.flatnonzero(part_of[:n_train] == part))
            va = store.usable(val_idx[part_of[n_train:] == part])
            if not len(tr):
                raise ValueError(f"no training images for {part}; every part needs examples")
            model = build_classifier(
                config.backbone,
                spec,
                1,
                pooling="max",
                width=config.width,
                name=f"fracture_{part.lower()}",
            )
            model.set_weights(shared.get_weights())
            hist, ran = trainer.fit(
                model,
                _StageData(tr, fracture_label[tr], va, fracture_label[va]),
                key=f"fracture_{part.lower()}",
                title=title,
                loss="binary_crossentropy",
                phases=training_phases(config, config.part_epochs, from_learned=True),
            )
            kept: list[int] = []
            probs: list[np.ndarray] = []
            for idx, x in store.batches(va, config.batch_size):
                kept.extend(int(i) for i in idx)
                probs.append(np.asarray(model(x, training=False))[:, 0])
            scores = np.concatenate(probs) if probs else np.zeros(0)
            threshold = choose_threshold(*_study_means([store.samples[i] for i in kept], scores))
            model.save(out / weights)
            finish(part, hist, ran, threshold=threshold)
            report(f"{title}: threshold {threshold:.3f} on validation studies")
        threshold = float(stages[part]["threshold"])
        history[part] = stages[part]["history"]
        phases_run[part] = stages[part]["phases"]
        fracture[part] = {
            "weights": weights,
            "sha256": sha256_of(out / weights),
            "preprocessing": spec.to_dict(),
            "backbone": config.backbone,
            "threshold": threshold,
            "threshold_rule": THRESHOLD_RULE,
        }

    trained_on: dict[str, Any] = {
        "dataset": dataset,
        "fingerprint": data_print,
        "n_images": len(samples),
        "n_studies": len({s.study for s in samples}),
        "n_patients": len({s.patient for s in samples}),
        "split": {"train": len(train), "validation": len(val), "test": len(test)},
        "split_patients": {
            "train": len({s.patient for s in train}),
            "validation": len({s.patient for s in val}),
            "test": len({s.patient for s in test}),
        },
        "split_rule": "by patient, shuffled with the seed",
        "n_unreadable": int((~store.readable).sum()),
    }
    if layout:
        trained_on["layout"] = layout
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "version": version or dt.datetime.now(dt.UTC).strftime("%Y.%m.%d.%H%M"),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "intended_use": intended_use,
        "trained_on": trained_on,
        "command": command,
        "training": asdict(config),
        "initial_weights": _initial_weights(config),
        "seeds": {"split": config.seed, "training": config.seed, "how": SEED_NOTE},
        "training_runs": run["runs"],
        "library_versions": _library_versions(),
        "platform": {"system": platform.system(), "machine": platform.machine()},
        "body_part": {
            "weights": "body_part.keras",
            "sha256": sha256_of(out / "body_part.keras"),
            "preprocessing": spec.to_dict(),
            "backbone": config.backbone,
            "labels": labels,
            "confidence_floor": config.confidence_floor,
        },
        "fracture": fracture,
        "history": history,
        "phases": phases_run,
        "metrics": {},
    }
    write_manifest(out, manifest)
    if test:
        report(f"evaluating on {len(test)} held-out images")
        metrics = evaluate_bundle(test, load_bundle(out), batch_size=config.batch_size)
        forget_bundle(out)
        metrics.pop("bundle", None)
        metrics.pop("bundle_version", None)
        manifest["metrics"] = {"split": "held-out test patients", **metrics}
        write_manifest(out, manifest)
    return manifest, history


def partial_dir(out_dir: str | Path) -> Path:
    """Where a run into ``out_dir`` builds its bundle, and keeps its work until it finishes."""
    final = Path(out_dir)
    return final.parent / f".{final.name}.partial"


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
    resume: bool = False,
    progress: ProgressFn | None = None,
    callbacks: Sequence[Any] = (),
    layout: str = "",
) -> TrainResult:
    """Train stage 1 and every part's fracture model on ``samples`` and write a bundle.

    Patients are split into train / validation / held-out test by ``config.fractions``; no
    patient is in two splits. Each part's threshold is chosen on validation study scores
    (:data:`THRESHOLD_RULE`); the manifest's metrics are measured on the held-out patients
    through the same cascade the worker serves with.

    Args:
        resume: Continue the interrupted run into ``out_dir`` from its last finished epoch (it
            must have had the same config and data). Without it, a run starts afresh and
            discards an interrupted one.
        progress: Called after every training batch (and while images are cached).
        callbacks: Extra Keras callbacks given to every ``fit``.
        layout: The dataset layout, recorded in the manifest.

    Raises:
        ValueError: Too few patients to split, a part without training images, or a resumed
            run whose config or data differ.
        WeightsError: The initial weights cannot be had.
    """
    final = Path(out_dir)
    if final.exists() and any(final.iterdir()) and not (final / "manifest.json").is_file():
        raise ValueError(f"{final} exists and is not a bundle; refusing to replace it")
    train, val, _ = split_by_patient(samples, config.fractions, config.seed)
    if not train or not val:
        raise ValueError("too few patients to split into train and validation sets")
    if config.weights is not None:
        # Fail before anything is read or written: a download that is impossible, a file that
        # is missing or belongs to another network.
        build_classifier(
            config.backbone,
            default_spec(config.backbone, config.input_size),
            1,
            weights=config.weights,
            name="weights_check",
        )
    staging = partial_dir(final)
    work = staging / WORK_DIR
    data_print = fingerprint(samples)
    key = _run_key(config, data_print, len(samples))
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    state_path = work / "state.json"
    if resume and state_path.is_file():
        run: dict[str, Any] = json.loads(state_path.read_text())
        if run["key"] != key:
            differ = sorted(
                k
                for k in {**key["config"], **run["key"]["config"]}
                if key["config"].get(k) != run["key"]["config"].get(k)
            )
            what = f"settings {', '.join(differ)}" if differ else "dataset"
            raise ValueError(
                f"the interrupted run in {staging} used other {what}; run without --resume "
                "to start afresh"
            )
        run["runs"].append({"started": now, "resumed": True})
        report(f"resuming the interrupted run in {staging}")
    else:
        if staging.exists():
            report(
                f"no run to resume in {staging}; starting afresh"
                if resume
                else f"discarding the interrupted run in {staging} (--resume continues one)"
            )
            shutil.rmtree(staging)
        elif resume:
            report(f"no interrupted run in {staging}; starting afresh")
        final.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # a bundle is read by other users
        work.mkdir()
        run = {"key": key, "runs": [{"started": now, "resumed": False}], "stages": {}}
    _write_json(state_path, run)
    try:
        manifest, history = _train_into(
            staging,
            work,
            samples,
            config=config,
            name=name,
            version=version,
            intended_use=intended_use,
            dataset=dataset,
            layout=layout,
            command=command,
            salt=salt,
            report=report,
            progress=progress,
            callbacks=callbacks,
            data_print=data_print,
            run=run,
        )
    except BaseException:
        report(f"training stopped; its work is kept in {staging}: --resume continues it")
        raise
    shutil.rmtree(work)
    forget_bundle(staging)
    forget_bundle(final)
    # Swap by renames, so a reader never finds the folder missing or half written.
    old = final.with_name(f".{final.name}.previous")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return TrainResult(final, manifest, history)
