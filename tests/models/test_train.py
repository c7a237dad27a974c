"""Training writes a complete bundle: thresholds from validation, metrics from held-out patients."""

from __future__ import annotations

import numpy as np
import pytest

from models.bundle import load_bundle, read_manifest
from models.datasets import load_dataset
from models.train import TrainConfig, choose_threshold, train_bundle


def test_youden_threshold_separates_perfectly_separable_scores():
    t = choose_threshold([0, 0, 1, 1], [0.1, 0.3, 0.7, 0.9])
    assert 0.3 < t <= 0.7


def test_threshold_defaults_to_half_with_one_class():
    assert choose_threshold([1, 1], [0.2, 0.9]) == 0.5


def test_threshold_prefers_the_point_nearest_half_among_ties():
    # every cut between 0.2 and 0.8 is perfect; the chosen one is the candidate nearest 0.5
    t = choose_threshold([0, 1], [0.2, 0.8])
    assert t == pytest.approx(0.8)


@pytest.mark.slow
def test_train_writes_a_loadable_bundle_with_provenance(tmp_path):
    from worker.synth import synthesize

    synthesize(tmp_path / "ph", studies=64, fmt="png", seed=11, size=128)
    samples = load_dataset(tmp_path / "ph")
    config = TrainConfig(input_size=32, epochs=1, fracture_epochs=1, width=4)
    result = train_bundle(samples, tmp_path / "bundle", config=config, name="t", version="0")
    manifest = read_manifest(tmp_path / "bundle")
    assert manifest.trained_on["n_images"] == len(samples)
    assert manifest.trained_on["fingerprint"]
    split = manifest.trained_on["split"]
    assert split["train"] + split["validation"] + split["test"] == len(samples)
    assert set(manifest.fracture) == set(manifest.parts())
    assert all(0.0 <= e.threshold <= 1.0 for e in manifest.fracture.values())
    assert "body_part_accuracy" in manifest.metrics
    assert result.history["body_part"]["loss"]
    bundle = load_bundle(tmp_path / "bundle")
    x = np.zeros((1, 32, 32, 1), np.float32)
    assert bundle.body_part_model(x).shape == (1, 8)
