"""Heatmaps from the ONNX graph: the class activation output that `bundle export-onnx` adds to
fracture models, against Keras Grad-CAM (models/gradcam.py)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from bonewatch.models.bundle import BundleError, load_bundle, read_manifest, write_manifest
from bonewatch.models.datasets import load_dataset
from bonewatch.models.gradcam import (
    explain_images,
    gradcam_batch,
    heatmap_method,
    measure_localisation,
    onnx_cam_batch,
    read_fracture_boxes,
)
from bonewatch.models.onnx_export import cam_head_layer, export_onnx, with_cam_output
from bonewatch.models.preprocess import PreprocessSpec
from tests.models.test_gradcam import LOCALISATION_SEED
from tests.models.tiny_conv import build_spot_bundle, spot_image, spot_model

pytest.importorskip("onnxruntime")
pytest.importorskip("tf2onnx")

# Keras Grad-CAM and the ONNX maps are the same map; localisation may differ by this much.
LOCALISATION_TOLERANCE = 0.02


@pytest.fixture(scope="module")
def spot_onnx_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = build_spot_bundle(tmp_path_factory.mktemp("spot-onnx") / "spot")
    export_onnx(root)
    return root


def _normalised(maps: np.ndarray) -> np.ndarray:
    peak = maps.reshape(len(maps), -1).max(axis=1)
    return maps / np.where(peak > 0, peak, 1.0)[:, None, None]


def test_export_gives_fracture_models_a_class_activation_output(spot_onnx_bundle):
    import onnxruntime as ort

    manifest = read_manifest(spot_onnx_bundle)
    assert manifest.body_part.onnx is not None and manifest.body_part.onnx.cam is None
    for part, entry in manifest.fracture.items():
        assert entry.onnx is not None and entry.onnx.cam is not None, part
        assert entry.onnx.cam.layer == "features"
        assert entry.onnx.cam.max_abs_diff <= 1e-4
        session = ort.InferenceSession(str(spot_onnx_bundle / entry.onnx.file))
        outputs = session.get_outputs()
        assert [o.name for o in outputs][1] == entry.onnx.cam.output
        probs, cam = session.run(None, {"image": np.ones((2, 16, 16, 1), np.float32)})
        assert probs.shape == (2, 1) and cam.shape == (2, 16, 16, 1)


def test_onnx_maps_equal_keras_gradcam_and_probabilities_stay_the_first_output(
    spot_onnx_bundle,
):
    rng = np.random.default_rng(5)
    x = rng.random((6, 16, 16, 1), dtype=np.float32)
    x[np.arange(6), rng.integers(0, 16, 6), rng.integers(0, 16, 6)] = 1.5  # one bright spot each
    bundle = load_bundle(spot_onnx_bundle, engine="onnx")
    onnx_maps, onnx_p, layer = onnx_cam_batch(bundle, "WRIST", x)
    keras_maps, keras_p, keras_layer = gradcam_batch(spot_model(), x)
    assert layer == keras_layer == "features"
    assert np.max(np.abs(onnx_maps - keras_maps)) <= 1e-5
    assert onnx_p == pytest.approx(keras_p, abs=1e-6)
    # The served predictor reads the probabilities, unchanged by the second output.
    assert bundle.fracture_models["WRIST"](x)[:, -1] == pytest.approx(keras_p, abs=1e-6)


def test_an_onnx_served_bundle_explains_from_the_onnx_graph(spot_onnx_bundle):
    cases = [((96, 64), (40, 70)), ((64, 96), (80, 20)), ((80, 80), (12, 60))]
    images = [spot_image(shape, xy, radius=6) for shape, xy in cases]
    bundle = load_bundle(spot_onnx_bundle, engine="onnx")
    explanations = explain_images(images, ["WRIST", "ELBOW", "HAND"], bundle)
    for (shape, (sx, sy)), e in zip(cases, explanations, strict=True):
        assert e.method == "onnx" and e.layer == "features"
        assert e.heatmap.shape == shape
        px, py = e.peak_xy
        assert abs(px - sx) <= 6 and abs(py - sy) <= 6, (shape, e.peak_xy)
        assert e.p_fracture > 0.9
    keras = explain_images(images, ["WRIST", "ELBOW", "HAND"], bundle, method="keras")
    for a, b in zip(explanations, keras, strict=True):
        assert b.method == "keras"
        assert a.peak_xy == b.peak_xy
        assert np.max(np.abs(a.heatmap - b.heatmap)) <= 1e-4


def test_the_heatmap_method_follows_the_engine_and_the_export(tmp_path, spot_onnx_bundle):
    assert heatmap_method(load_bundle(spot_onnx_bundle, engine="onnx"), ["WRIST"]) == "onnx"
    assert heatmap_method(load_bundle(spot_onnx_bundle, engine="keras"), ["WRIST"]) == "keras"
    assert heatmap_method(load_bundle(spot_onnx_bundle, engine="keras"), ["WRIST"], "onnx") == (
        "onnx"
    )
    with pytest.raises(ValueError, match="unknown heatmap method"):
        heatmap_method(load_bundle(spot_onnx_bundle, engine="onnx"), ["WRIST"], "gradient")
    # An export made before the class activation output: Keras, or a clear refusal for onnx.
    old = tmp_path / "old"
    shutil.copytree(spot_onnx_bundle, old)
    data = json.loads((old / "manifest.json").read_text())
    for entry in data["fracture"].values():
        del entry["onnx"]["cam"]
    write_manifest(old, data)
    bundle = load_bundle(old, engine="onnx")
    assert heatmap_method(bundle, ["WRIST"]) == "keras"
    with pytest.raises(BundleError, match="no class activation output.*export-onnx"):
        explain_images([spot_image((32, 32), (8, 8), 3)], ["WRIST"], bundle, method="onnx")


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_class_activation_equals_gradcam_behind_global_pooling(pooling):
    from bonewatch.models.architectures import build_classifier, set_random_seed

    set_random_seed(3)
    spec = PreprocessSpec(input_size=32, channels=1, normalization="unit")
    model = build_classifier("small_cnn", spec, 1, pooling=pooling, width=4)
    layer = cam_head_layer(model)
    assert layer == "relu3"
    x = np.random.default_rng(1).random((5, 32, 32, 1), dtype=np.float32)
    probs, cam = with_cam_output(model, layer)(x, training=False)
    expected, keras_p, _ = gradcam_batch(model, x)
    got = _normalised(np.maximum(np.asarray(cam)[..., 0], 0.0))
    assert np.max(np.abs(got - expected)) <= 1e-5
    assert np.asarray(probs)[:, -1] == pytest.approx(keras_p, abs=1e-6)


def test_heads_other_than_global_pooling_get_no_map():
    import keras
    from keras import layers

    inputs = keras.Input((8, 8, 1))
    x = layers.Conv2D(2, 3, padding="same", name="conv")(inputs)
    x = layers.Flatten()(x)
    flat = keras.Model(inputs, layers.Dense(1, activation="sigmoid")(x))
    assert cam_head_layer(flat) is None
    assert cam_head_layer(spot_model()) == "features"


def test_the_shipped_demo_bundle_carries_its_class_activation_outputs():
    import onnxruntime as ort

    from bonewatch.worker.settings import DEMO_BUNDLE

    manifest = read_manifest(DEMO_BUNDLE)
    for part, entry in manifest.fracture.items():
        assert entry.onnx is not None and entry.onnx.cam is not None, part
        session = ort.InferenceSession(str(Path(DEMO_BUNDLE) / entry.onnx.file))
        assert [o.name for o in session.get_outputs()][1] == entry.onnx.cam.output


@pytest.mark.slow
def test_demo_bundle_onnx_heatmaps_localise_as_keras_gradcam(tmp_path):
    from bonewatch.worker.settings import DEMO_BUNDLE
    from bonewatch.worker.synth import synthesize

    synthesize(tmp_path / "heldout", studies=160, fmt="both", seed=LOCALISATION_SEED)
    boxes = read_fracture_boxes(tmp_path / "heldout")
    samples = load_dataset(tmp_path / "heldout")
    bundle = load_bundle(DEMO_BUNDLE, engine="onnx", precision="fp32")
    start = time.perf_counter()
    onnx = measure_localisation(samples, boxes, bundle, method="onnx")
    middle = time.perf_counter()
    keras = measure_localisation(samples, boxes, bundle, method="keras")
    end = time.perf_counter()
    assert onnx.fraction is not None and keras.fraction is not None
    gap = abs(onnx.fraction - keras.fraction)
    print(
        f"\nlocalisation on {onnx.n_images} boxed phantom images (seed {LOCALISATION_SEED}): "
        f"ONNX class activation {onnx.fraction:.4f} ({onnx.n_hits} hits, {middle - start:.1f} s), "
        f"Keras Grad-CAM {keras.fraction:.4f} ({keras.n_hits} hits, {end - middle:.1f} s), "
        f"difference {100 * gap:.2f} points"
    )
    assert onnx.n_images == keras.n_images >= 100
    assert gap <= LOCALISATION_TOLERANCE, (onnx.to_dict(), keras.to_dict())
    assert onnx.fraction >= 0.70
