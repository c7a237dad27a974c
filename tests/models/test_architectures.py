"""Backbones: what they are fed, local weights files, the ImageNet download failing, freezing."""

from __future__ import annotations

import numpy as np
import pytest

from bonewatch.models.architectures import (
    APPLICATIONS,
    BACKBONES,
    WeightsError,
    backbone_layers,
    build_classifier,
    default_spec,
    set_trainable,
    weights_source,
)

# Building the DenseNets and ResNet50 takes seconds each; the quick suite uses MobileNetV3Small.
_SLOW_BACKBONES = {"densenet121", "densenet169", "resnet50", "efficientnetb0"}


def _params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_BACKBONES else n for n in names]


def _application(backbone: str, size: int = 32):
    import keras

    app = APPLICATIONS[backbone]
    return getattr(keras.applications, app.factory)(
        include_top=False, weights=None, input_shape=(size, size, 3), **app.kwargs
    )


@pytest.mark.parametrize("backbone", _params(BACKBONES))
def test_every_backbone_builds_a_classifier(backbone):
    spec = default_spec(backbone, 32)
    model = build_classifier(backbone, spec, 8, width=4)
    out = np.asarray(model(np.zeros((2, 32, 32, spec.channels), np.float32)))
    assert out.shape == (2, 8)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)
    assert backbone_layers(model)


def test_each_backbone_is_fed_what_its_imagenet_weights_expect():
    assert default_spec("small_cnn", 64).channels == 1
    assert default_spec("densenet121", 64).normalization == "imagenet"  # torch style
    assert default_spec("mobilenetv3small", 64).normalization == "minus_one_one"
    # ResNet50 wants Caffe-style input: 0-255 less the BGR means, made inside the model
    assert default_spec("resnet50", 64).normalization == "unit"
    assert APPLICATIONS["resnet50"].scale == 255.0
    assert APPLICATIONS["resnet50"].offset == (-103.939, -116.779, -123.68)
    assert APPLICATIONS["efficientnetb0"].scale == 255.0


@pytest.mark.slow
def test_resnet50_converts_unit_pixels_inside_the_model():
    model = build_classifier("resnet50", default_spec("resnet50", 32), 1)
    adapter = model.get_layer("backbone_input")
    got = np.asarray(adapter(np.ones((1, 2, 2, 3), np.float32)))[0, 0, 0]
    np.testing.assert_allclose(got, [255 - 103.939, 255 - 116.779, 255 - 123.68], rtol=1e-5)


@pytest.mark.parametrize("backbone", _params(APPLICATIONS))
def test_a_local_weights_file_initialises_the_backbone_offline(tmp_path, backbone):
    app = _application(backbone, size=48)  # any input size: the weights do not depend on it
    path = tmp_path / f"{backbone}-notop.weights.h5"
    app.save_weights(path)
    model = build_classifier(backbone, default_spec(backbone, 32), 1, weights=path)
    # Compared in order: Keras matches layers by position, and auto-named layers
    # (EfficientNet's "normalization") get other names in another model of the same process.
    saved = [layer.get_weights() for layer in app.layers if layer.get_weights()]
    loaded = [layer.get_weights() for layer in backbone_layers(model) if layer.get_weights()]
    assert len(saved) == len(loaded)
    for want_layer, got_layer in zip(saved, loaded, strict=True):
        for want, got in zip(want_layer, got_layer, strict=True):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_a_saved_application_or_a_legacy_h5_works_as_a_weights_file(tmp_path, suffix):
    app = _application("mobilenetv3small")
    path = tmp_path / f"mobilenet{suffix}"
    if suffix == ".keras":
        app.save(path)
    else:  # the format of Keras's own ImageNet downloads
        import h5py
        from keras.src.legacy.saving import legacy_h5_format

        with h5py.File(path, "w") as fh:
            legacy_h5_format.save_weights_to_hdf5_group(fh, app)
    model = build_classifier(
        "mobilenetv3small", default_spec("mobilenetv3small", 32), 1, weights=path
    )
    saved = [layer.get_weights() for layer in app.layers if layer.get_weights()]
    loaded = [layer.get_weights() for layer in backbone_layers(model) if layer.get_weights()]
    for want_layer, got_layer in zip(saved, loaded, strict=True):
        for want, got in zip(want_layer, got_layer, strict=True):
            np.testing.assert_array_equal(got, want)


def test_imagenet_without_internet_says_how_to_pass_a_local_file(monkeypatch):
    from keras.src.utils import file_utils

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: [Errno -2]")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(WeightsError) as caught:
        build_classifier(
            "mobilenetv3small", default_spec("mobilenetv3small", 32), 1, weights="imagenet"
        )
    message = str(caught.value)
    assert "could not get the ImageNet weights for mobilenetv3small" in message
    assert "URL fetch failure" in message
    assert "--weights mobilenetv3small-notop.weights.h5" in message
    assert "include_top=False" in message


def test_missing_or_unfitting_weights_files_are_refused(tmp_path):
    spec = default_spec("mobilenetv3small", 32)
    with pytest.raises(WeightsError, match="does not exist"):
        build_classifier("mobilenetv3small", spec, 1, weights=tmp_path / "nope.weights.h5")
    other = tmp_path / "other.weights.h5"
    build_classifier("small_cnn", default_spec("small_cnn", 32), 1).save_weights(other)
    with pytest.raises(WeightsError, match="does not fit MobileNetV3Small"):
        build_classifier("mobilenetv3small", spec, 1, weights=other)
    with pytest.raises(WeightsError, match="no pretrained weights"):
        build_classifier("small_cnn", default_spec("small_cnn", 32), 1, weights=other)


def test_weights_source_reads_none_imagenet_or_a_path():
    assert weights_source(None) is None
    assert weights_source("none") is None
    assert weights_source("ImageNet") == "imagenet"
    assert weights_source("build/x.weights.h5") == "build/x.weights.h5"


def _trainable_layers(model) -> set[str]:
    return {layer.name for layer in model.layers if layer.trainable and layer.weights}


def test_transfer_phases_freeze_the_backbone_then_open_its_top():
    model = build_classifier("small_cnn", default_spec("small_cnn", 16), 1, width=2)
    assert set_trainable(model, 0) == 0
    assert _trainable_layers(model) == {"head"}
    assert len(model.trainable_weights) == 2  # the head's kernel and bias only
    # the top three layers are conv3, bn3, relu3: BatchNormalization keeps its statistics
    assert set_trainable(model, 3) == 2
    assert _trainable_layers(model) == {"conv3", "head"}
    assert not model.get_layer("bn3").trainable
    n_backbone = len(backbone_layers(model))
    assert set_trainable(model, -1) == n_backbone - 4  # every layer but the four BN ones
    assert set_trainable(model, None) == n_backbone
    assert all(layer.trainable for layer in model.layers)
