"""Training: streamed input, transfer phases, a complete bundle with provenance, resuming."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

from bonewatch.ingest import read_image, write_png
from bonewatch.models.bundle import load_bundle, read_manifest
from bonewatch.models.datasets import Sample, load_dataset
from bonewatch.models.evaluate import HEADLINE_METRICS
from bonewatch.models.preprocess import PreprocessSpec, preprocess
from bonewatch.models.train import (
    THRESHOLD_RULE,
    ImageStore,
    TrainConfig,
    TrainProgress,
    choose_threshold,
    partial_dir,
    train_bundle,
    training_phases,
)

SPEC = PreprocessSpec(input_size=8, channels=1, normalization="unit")


def test_youden_threshold_separates_perfectly_separable_scores():
    t = choose_threshold([0, 0, 1, 1], [0.1, 0.3, 0.7, 0.9])
    assert 0.3 < t <= 0.7


def test_threshold_defaults_to_half_with_one_class():
    assert choose_threshold([1, 1], [0.2, 0.9]) == 0.5


def test_threshold_prefers_the_point_nearest_half_among_ties():
    # every cut between 0.2 and 0.8 is perfect; the chosen one is the candidate nearest 0.5
    t = choose_threshold([0, 1], [0.2, 0.8])
    assert t == pytest.approx(0.8)


# --- config and phases -----------------------------------------------------------------------


def test_config_comes_back_from_a_manifest_unchanged():
    config = TrainConfig(backbone="densenet121", weights="w.weights.h5", fine_tune_lr=1e-4)
    assert TrainConfig(**json.loads(json.dumps(asdict(config)))) == config
    assert TrainConfig(weights="none").weights is None
    assert TrainConfig(backbone="resnet50", weights="ImageNet").weights == "imagenet"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"backbone": "vgg16"}, "unknown backbone"),
        ({"augment": "mixup"}, "augment"),
        ({"weights": "imagenet"}, "small_cnn has no pretrained weights"),
        ({"epochs": 0}, "at least 1"),
    ],
)
def test_config_refuses_what_cannot_train(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


def test_pretrained_backbones_train_frozen_then_fine_tune_their_top():
    config = TrainConfig(
        backbone="densenet121",
        weights="imagenet",
        freeze_epochs=3,
        fine_tune_layers=30,
        learning_rate=1e-3,
        fine_tune_lr=1e-5,
    )
    frozen, tuned = training_phases(config, 10, from_learned=False)
    assert (frozen.name, frozen.epochs, frozen.trainable, frozen.learning_rate) == (
        "frozen",
        3,
        0,
        1e-3,
    )
    assert (tuned.name, tuned.epochs, tuned.trainable, tuned.learning_rate) == (
        "fine_tune",
        7,
        30,
        1e-5,
    )
    # a part's model starts from the shared fracture model: fine-tuned from its first epoch
    [part] = training_phases(config, 4, from_learned=True)
    assert (part.name, part.epochs, part.trainable) == ("fine_tune", 4, 30)
    assert [p.name for p in training_phases(config, 2, from_learned=False)] == ["frozen"]


def test_models_without_pretrained_weights_train_every_layer():
    config = TrainConfig(learning_rate=2e-3)
    [phase] = training_phases(config, 5, from_learned=False)
    assert (phase.name, phase.trainable, phase.learning_rate) == ("from_scratch", None, 2e-3)
    [part] = training_phases(config, 5, from_learned=True)
    assert (part.trainable, part.learning_rate) == (None, pytest.approx(2e-3 / 5))


# --- the input pipeline ----------------------------------------------------------------------


def _png_samples(root: Path, n: int) -> list[Sample]:
    samples = []
    for i in range(n):
        path = root / f"image{i}.png"
        write_png(path, np.full((6 + i % 3, 10), (i % 10) / 10))
        samples.append(Sample(path, "HAND", i % 2, f"patient{i}", f"study{i}"))
    return samples


def _served(sample: Sample) -> np.ndarray:
    return preprocess(read_image(sample.path, salt="t").pixels, SPEC)


def _collect(ds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xs, ys, ws = zip(*ds.as_numpy_iterator(), strict=True)
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ws)


def test_images_stream_with_the_serving_preprocessing(tmp_path):
    samples = _png_samples(tmp_path, 6)
    samples[2].path.write_bytes(b"not a png")  # unreadable: weighs nothing, is not fatal
    store = ImageStore(samples, SPEC, salt="t")
    ds = store.dataset(range(6), np.arange(6) % 2, batch_size=4, class_weight={0: 0.5, 1: 2.0})
    # Keras needs every shape but the batch size known before it sees data
    assert [spec.shape.as_list() for spec in ds.element_spec] == [[None, 8, 8, 1], [None], [None]]
    x, y, w = _collect(ds)
    assert list(y) == [0, 1, 0, 1, 0, 1]
    assert list(w) == [0.5, 2.0, 0.0, 2.0, 0.5, 2.0]
    expected = [_served(s) if i != 2 else np.zeros((8, 8, 1)) for i, s in enumerate(samples)]
    np.testing.assert_array_equal(x, np.stack(expected))
    assert list(store.usable(range(6))) == [0, 1, 3, 4, 5]  # learnt while streaming
    shuffled = store.dataset(range(6), np.arange(6), batch_size=6, shuffle_seed=1)
    order = _collect(shuffled)[1]
    assert sorted(order) == list(range(6))


def test_the_cache_is_a_file_on_disk_with_the_same_tensors(tmp_path):
    samples = _png_samples(tmp_path, 6)
    samples[4].path.write_bytes(b"")
    store = ImageStore(samples, SPEC, salt="t")
    seen: list[int] = []
    store.fill_cache(tmp_path / "cache", progress=lambda done, n: seen.append(done))
    assert seen[-1] == 6
    assert store.cached
    assert list(store.readable) == [True, True, True, True, False, True]
    on_disk = np.load(tmp_path / "cache" / "images.npy", mmap_mode="r")
    assert isinstance(on_disk, np.memmap) and on_disk.shape == (6, 8, 8, 1)
    ds = store.dataset(store.usable(range(6)), np.arange(5), batch_size=4)
    assert [spec.shape.as_list() for spec in ds.element_spec] == [[None, 8, 8, 1], [None], [None]]
    x, y, w = _collect(ds)
    np.testing.assert_array_equal(x, np.stack([_served(samples[i]) for i in (0, 1, 2, 3, 5)]))
    assert list(w) == [1.0] * 5
    kept, images = zip(*store.batches([5, 4, 0], batch_size=2), strict=True)
    assert list(np.concatenate(kept)) == [5, 0]
    # a second store over the same folder reuses the finished cache without reading any image
    for s in samples:
        s.path.unlink()
    again = ImageStore(samples, SPEC, salt="t")
    again.fill_cache(tmp_path / "cache", progress=None)
    np.testing.assert_array_equal(_collect(again.dataset([0], np.zeros(1), batch_size=1))[0], x[:1])


def test_streaming_reads_images_as_batches_are_asked_for(tmp_path, monkeypatch):
    from bonewatch.models import train as train_module

    samples = _png_samples(tmp_path, 200)
    reads: list[Path] = []
    real = train_module.read_image

    def counting(path, **kwargs):
        reads.append(path)
        return real(path, **kwargs)

    monkeypatch.setattr(train_module, "read_image", counting)
    ds = ImageStore(samples, SPEC, salt="t").dataset(range(200), np.zeros(200), batch_size=4)
    first = next(iter(ds))
    assert first[0].shape == (4, 8, 8, 1)
    assert len(reads) < 100, "the whole set was read for one batch"


# --- whole runs ------------------------------------------------------------------------------

TINY = TrainConfig(
    input_size=16, epochs=3, fracture_epochs=2, part_epochs=1, width=2, batch_size=16
)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from bonewatch.worker.synth import synthesize

    root = tmp_path_factory.mktemp("phantoms") / "ph"
    synthesize(root, studies=64, fmt="png", seed=11, size=128)
    return load_dataset(root)


@pytest.mark.slow
def test_train_writes_a_loadable_bundle_with_provenance(tmp_path, phantoms):
    events: list[TrainProgress] = []
    lines: list[str] = []
    result = train_bundle(
        phantoms,
        tmp_path / "bundle",
        config=TINY,
        name="t",
        version="0",
        dataset="ph",
        command="bonewatch train ph --out bundle",
        report=lines.append,
        progress=events.append,
        layout="mura",
    )
    manifest = read_manifest(tmp_path / "bundle")
    assert manifest.trained_on["n_images"] == len(phantoms)
    assert manifest.trained_on["fingerprint"]
    assert manifest.trained_on["layout"] == "mura"
    split = manifest.trained_on["split"]
    assert split["train"] + split["validation"] + split["test"] == len(phantoms)
    assert set(manifest.fracture) == set(manifest.parts())
    assert all(0.0 <= e.threshold <= 1.0 for e in manifest.fracture.values())
    assert {e.threshold_rule for e in manifest.fracture.values()} == {THRESHOLD_RULE}
    extra = manifest.model_extra or {}
    assert extra["command"] == "bonewatch train ph --out bundle"
    assert {"tensorflow", "keras", "numpy", "scikit-learn", "python"} <= set(
        extra["library_versions"]
    )
    assert TrainConfig(**extra["training"]) == TINY
    assert extra["seeds"]["split"] == extra["seeds"]["training"] == TINY.seed
    assert extra["initial_weights"] == {"source": "random"}
    assert len(extra["history"]["body_part"]["loss"]) == 3
    assert set(HEADLINE_METRICS) <= set(manifest.metrics)
    assert result.history["body_part"]["loss"]
    # progress: every batch of every stage; report: one line per epoch
    assert {e.stage for e in events} >= {"reading images", "body part", "fracture wrist"}
    assert any(e.step == e.steps and e.epoch == 3 for e in events if e.stage == "body part")
    assert sum(line.startswith("body part: epoch") for line in lines) == 3
    # the work folder (checkpoints, cache) is gone; the bundle is only the bundle
    assert not partial_dir(tmp_path / "bundle").exists()
    assert {p.name for p in (tmp_path / "bundle").iterdir()} == {
        "manifest.json",
        "body_part.keras",
        *(f"fracture_{p.lower()}.keras" for p in manifest.parts()),
    }
    bundle = load_bundle(tmp_path / "bundle")
    x = np.zeros((1, 16, 16, 1), np.float32)
    assert bundle.body_part_model(x).shape == (1, 8)


class Interrupted(Exception):
    """Stands for a kill: raised by a callback at the end of a chosen epoch."""


def _interrupt_after(stage: str, epoch: int):
    import keras

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, e, logs=None):
            if self.model.name == f"train_{stage}" and e + 1 == epoch:
                raise Interrupted(f"{stage} epoch {epoch}")

    return Interrupt()


def _epoch_log():
    import keras

    class EpochLog(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.begun: list[tuple[str, int]] = []

        def on_epoch_begin(self, e, logs=None):
            self.begun.append((self.model.name.removeprefix("train_"), e))

    return EpochLog()


@pytest.mark.slow
def test_an_interrupted_run_resumes_from_its_saved_epoch(tmp_path, phantoms):
    out = tmp_path / "bundle"
    config = replace(TINY, fracture_epochs=1, cache_gb=0.0)  # images streamed, no cache
    with pytest.raises(Interrupted):
        train_bundle(phantoms, out, config=config, callbacks=[_interrupt_after("body_part", 1)])

    # without resume=True a new run starts afresh; this one is stopped after stage 1's epoch 2
    fresh, lines = _epoch_log(), []
    with pytest.raises(Interrupted):
        train_bundle(
            phantoms,
            out,
            config=config,
            callbacks=[fresh, _interrupt_after("body_part", 2)],
            report=lines.append,
        )
    assert any(line.startswith("discarding the interrupted run") for line in lines)
    assert fresh.begun == [("body_part", 0), ("body_part", 1)]
    assert not out.exists()
    work = partial_dir(out) / "work"
    state = json.loads((work / "checkpoints" / "body_part-from_scratch" / "state.json").read_text())
    assert state["epoch"] == 2 and len(state["history"]["loss"]) == 2

    # a resume must be the same run: other settings are refused, and the work is kept
    with pytest.raises(ValueError, match="epochs"):
        train_bundle(phantoms, out, config=replace(config, epochs=5), resume=True)
    assert work.is_dir()

    # resumed: stage 1 goes on at its third epoch instead of starting again; stopped again
    # once the hand's model has finished its epoch
    second, lines = _epoch_log(), []
    with pytest.raises(Interrupted):
        train_bundle(
            phantoms,
            out,
            config=config,
            callbacks=[second, _interrupt_after("fracture_hand", 1)],
            report=lines.append,
            resume=True,
        )
    assert [e for stage, e in second.begun if stage == "body_part"] == [2]
    assert "body part: resuming the from_scratch phase at epoch 3/3" in lines

    # resumed again: finished stages are kept, only the last three parts train
    third, lines = _epoch_log(), []
    result = train_bundle(
        phantoms, out, config=config, callbacks=[third], report=lines.append, resume=True
    )
    assert {stage for stage, _ in third.begun} == {
        "fracture_humerus",
        "fracture_shoulder",
        "fracture_wrist",
    }
    assert "body part: finished in the interrupted run" in lines
    assert "fracture elbow: finished in the interrupted run" in lines
    assert any(line.startswith("fracture hand: threshold") for line in lines)
    assert len(result.history["body_part"]["loss"]) == 3
    assert result.history["body_part"]["loss"][:2] == state["history"]["loss"]
    assert [r["resumed"] for r in result.manifest["training_runs"]] == [False, True, True]
    assert not partial_dir(out).exists()
    load_bundle(out)
