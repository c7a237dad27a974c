"""Tiny hand-wired Keras bundles whose outputs are known in advance."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bonewatch.ingest import MURA_PARTS
from bonewatch.models.bundle import OTHER, SCHEMA_VERSION, sha256_of, write_manifest

SPEC = {"input_size": 16, "channels": 1, "normalization": "unit"}
LABELS = [*MURA_PARTS, OTHER]


def _mean_model(n_out: int, weights: np.ndarray, bias: np.ndarray, activation: str):
    """input -> mean intensity -> Dense: outputs are a fixed function of the image's mean."""
    import keras
    from keras import layers

    inputs = keras.Input((16, 16, 1))
    x = layers.GlobalAveragePooling2D()(inputs)
    out = layers.Dense(n_out, activation=activation)(x)
    model = keras.Model(inputs, out)
    model.layers[-1].set_weights([weights.reshape(1, n_out), bias])
    return model


def _mean_fracture_model():
    return _mean_model(1, np.array([10.0], np.float32), np.array([-5.0], np.float32), "sigmoid")


def build_tiny_bundle(
    root: Path,
    *,
    floor: float = 0.5,
    threshold: float = 0.5,
    fracture_model: Callable[[], Any] = _mean_fracture_model,
    name: str = "tiny",
) -> Path:
    """Bright images (mean > 0.5) are ELBOW, dark ones `other`; by default p(fracture) =
    sigmoid(10m - 5), or whatever ``fracture_model()`` builds for every part."""
    root.mkdir(parents=True, exist_ok=True)
    w = np.zeros(len(LABELS), np.float32)
    b = np.zeros(len(LABELS), np.float32)
    w[LABELS.index("ELBOW")], b[LABELS.index("ELBOW")] = 20.0, -10.0
    w[LABELS.index(OTHER)], b[LABELS.index(OTHER)] = -20.0, 10.0
    _mean_model(len(LABELS), w, b, "softmax").save(root / "body_part.keras")
    fracture = {}
    for part in MURA_PARTS:
        weights = f"fracture_{part.lower()}.keras"
        fracture_model().save(root / weights)
        fracture[part] = {
            "weights": weights,
            "sha256": sha256_of(root / weights),
            "preprocessing": SPEC,
            "threshold": threshold,
        }
    write_manifest(
        root,
        {
            "schema_version": SCHEMA_VERSION,
            "name": name,
            "version": "1",
            "intended_use": "tests only",
            "body_part": {
                "weights": "body_part.keras",
                "sha256": sha256_of(root / "body_part.keras"),
                "preprocessing": SPEC,
                "labels": LABELS,
                "confidence_floor": floor,
            },
            "fracture": fracture,
        },
    )
    return root


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny")
