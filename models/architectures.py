"""Network builders: a small CNN for the demo and the transfer-learning backbones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.preprocess import PreprocessSpec

# Backbones from keras.applications and the preprocessing their ImageNet weights expect.
APPLICATIONS = {
    "densenet121": "DenseNet121",
    "densenet169": "DenseNet169",
    "resnet50": "ResNet50",
    "efficientnetb0": "EfficientNetB0",
    "mobilenetv3small": "MobileNetV3Small",
}
BACKBONES = ("small_cnn", *APPLICATIONS)


def default_spec(backbone: str, input_size: int) -> PreprocessSpec:
    """The preprocessing a backbone is trained and served with."""
    if backbone == "small_cnn":
        return PreprocessSpec(input_size=input_size, channels=1, normalization="unit")
    return PreprocessSpec(input_size=input_size, channels=3, normalization="imagenet")


def _small_cnn_features(x: Any, width: int) -> Any:
    from keras import layers

    for i, filters in enumerate((width, width * 2, width * 4, width * 4)):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        # momentum 0.9: with few steps per epoch the default 0.99 leaves the moving
        # statistics far from the batch ones, and inference then differs from training.
        x = layers.BatchNormalization(momentum=0.9, name=f"bn{i}")(x)
        x = layers.Activation("relu", name=f"relu{i}")(x)
        if i < 3:
            x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
    return x


def build_classifier(
    backbone: str,
    spec: PreprocessSpec,
    n_outputs: int,
    *,
    pooling: str = "avg",
    weights: str | Path | None = None,
    width: int = 16,
    name: str = "classifier",
) -> Any:
    """Build a Keras classifier: softmax over ``n_outputs`` classes, or one sigmoid if 1.

    Args:
        backbone: ``small_cnn`` or one of :data:`APPLICATIONS`.
        spec: the preprocessing the model will see (sets the input shape).
        n_outputs: number of classes; 1 means a single sigmoid probability.
        pooling: ``avg`` or ``max`` global pooling before the head (max suits small findings).
        weights: for application backbones, a local weights file (``.h5`` without top) or None.
        width: filters of the first small-CNN block.
    """
    import keras
    from keras import layers

    inputs = keras.Input((spec.input_size, spec.input_size, spec.channels), name="image")
    if backbone == "small_cnn":
        if weights is not None:
            raise ValueError("small_cnn has no pretrained weights; leave weights unset")
        features = _small_cnn_features(inputs, width)
    elif backbone in APPLICATIONS:
        if spec.channels != 3:
            raise ValueError(f"{backbone} needs 3-channel input, the spec has {spec.channels}")
        factory = getattr(keras.applications, APPLICATIONS[backbone])
        kwargs: dict[str, Any] = {}
        if backbone.startswith("mobilenetv3") or backbone.startswith("efficientnet"):
            # These include their own rescaling; the manifest's normalisation already ran.
            kwargs["include_preprocessing"] = False
        base = factory(
            include_top=False,
            weights=None if weights is None else str(weights),
            input_tensor=inputs,
            **kwargs,
        )
        base._name = "backbone"
        features = base.output
    else:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {BACKBONES}")
    pool = layers.GlobalMaxPooling2D if pooling == "max" else layers.GlobalAveragePooling2D
    x = pool(name="pool")(features)
    x = layers.Dropout(0.2, name="dropout")(x)
    activation = "sigmoid" if n_outputs == 1 else "softmax"
    outputs = layers.Dense(n_outputs, activation=activation, name="head")(x)
    return keras.Model(inputs, outputs, name=name)
