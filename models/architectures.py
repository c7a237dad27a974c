"""Network builders: a small CNN for the demo and the transfer-learning backbones.

Every backbone from ``keras.applications`` is listed in :data:`APPLICATIONS` with the input its
ImageNet weights expect. The manifest's preprocessing produces the input (``imagenet`` or
``minus_one_one`` normalisation, or ``unit`` pixels); where a backbone wants yet another scale
(ResNet50's Caffe-style 0-255 minus the channel means, EfficientNet's own 0-255 rescaling), a
``backbone_input`` layer inside the model converts, so what is saved serves as trained.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bonewatch.models.preprocess import PreprocessSpec

SMALL_CNN = "small_cnn"
# Layers of a classifier that are not its backbone: pooling, dropout and the head.
HEAD_LAYERS = frozenset({"pool", "dropout", "head"})
ADAPTER_LAYER = "backbone_input"


@dataclass(frozen=True)
class Application:
    """A ``keras.applications`` backbone and the input its ImageNet weights were trained on."""

    factory: str  # name in keras.applications
    normalization: str  # the manifest's preprocessing
    scale: float = 1.0  # then x * scale + offset inside the model, when not the identity
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights_file: str = ""  # the file name Keras downloads for weights="imagenet"


APPLICATIONS: dict[str, Application] = {
    "densenet121": Application(
        "DenseNet121",
        "imagenet",
        weights_file="densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
    ),
    "densenet169": Application(
        "DenseNet169",
        "imagenet",
        weights_file="densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5",
    ),
    # Caffe style: 0-255, BGR channel means subtracted (grey input: channel order is moot).
    "resnet50": Application(
        "ResNet50",
        "unit",
        scale=255.0,
        offset=(-103.939, -116.779, -123.68),
        weights_file="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    ),
    # Rescales and normalises 0-255 input itself.
    "efficientnetb0": Application(
        "EfficientNetB0", "unit", scale=255.0, weights_file="efficientnetb0_notop.h5"
    ),
    "mobilenetv3small": Application(
        "MobileNetV3Small",
        "minus_one_one",
        kwargs={"include_preprocessing": False},
        weights_file="weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
    ),
}
BACKBONES = (SMALL_CNN, *APPLICATIONS)


class WeightsError(ValueError):
    """Initial weights that cannot be had: no download possible, a missing or unfitting file."""


def default_spec(backbone: str, input_size: int) -> PreprocessSpec:
    """The preprocessing a backbone is trained and served with."""
    if backbone == SMALL_CNN:
        return PreprocessSpec(input_size=input_size, channels=1, normalization="unit")
    if backbone not in APPLICATIONS:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    return PreprocessSpec(
        input_size=input_size, channels=3, normalization=APPLICATIONS[backbone].normalization
    )


def weights_source(weights: str | Path | None) -> str | None:
    """``None`` for random initialisation (``None``, ``"none"``), ``"imagenet"``, or a path."""
    if weights is None or str(weights).lower() in ("", "none"):
        return None
    if str(weights).lower() == "imagenet":
        return "imagenet"
    return str(weights)


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


def _weights_failure(
    backbone: str, app: Application, weights: str | None, exc: BaseException
) -> WeightsError:
    if weights == "imagenet":
        return WeightsError(
            f"could not get the ImageNet weights for {backbone} ({exc}). Without internet access, "
            f'save them on a machine that has it: python -c "import keras; '
            f"keras.applications.{app.factory}(weights='imagenet', include_top=False)"
            f".save_weights('{backbone}-notop.weights.h5')\" and pass --weights "
            f"{backbone}-notop.weights.h5; or copy Keras's download {app.weights_file} into "
            "~/.keras/models/ (or $KERAS_HOME/models/) here"
        )
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return WeightsError(
        f"weights file {weights} does not fit {app.factory} without its top "
        f"(include_top=False): {first_line}"
    )


def _application_features(
    backbone: str, inputs: Any, weights: str | None, spec: PreprocessSpec
) -> Any:
    import keras
    from keras import layers

    app = APPLICATIONS[backbone]
    if spec.channels != 3:
        raise ValueError(f"{backbone} needs 3-channel input, the spec has {spec.channels}")
    x = inputs
    if app.scale != 1.0 or any(app.offset):
        x = layers.Rescaling(app.scale, offset=list(app.offset), name=ADAPTER_LAYER)(x)
    if weights not in (None, "imagenet") and not Path(str(weights)).is_file():
        raise WeightsError(f"weights file {weights} does not exist")
    factory = getattr(keras.applications, app.factory)
    # An unfitting file makes Keras warn once per layer before it raises; the error says it all,
    # so those warnings are shown only when the weights did load.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            base = factory(include_top=False, weights=weights, input_tensor=x, **app.kwargs)
        except Exception as exc:  # keras raises bare Exception for failed downloads
            raise _weights_failure(backbone, app, weights, exc) from exc
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    base._name = "backbone"
    return base.output


def set_random_seed(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow, so the next models built start from the same weights."""
    import keras

    keras.utils.set_random_seed(seed)


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
        weights: for application backbones: None or ``"none"`` (random), ``"imagenet"``
            (downloaded, or Keras's cached copy), or a local file of the same application built
            with ``include_top=False`` (``.weights.h5``, legacy ``.h5`` or ``.keras``).
        width: filters of the first small-CNN block.

    Raises:
        WeightsError: the ImageNet weights cannot be downloaded, or the file is missing or
            belongs to another network.
    """
    import keras
    from keras import layers

    source = weights_source(weights)
    inputs = keras.Input((spec.input_size, spec.input_size, spec.channels), name="image")
    if backbone == SMALL_CNN:
        if source is not None:
            raise WeightsError("small_cnn has no pretrained weights; leave weights unset")
        features = _small_cnn_features(inputs, width)
    elif backbone in APPLICATIONS:
        features = _application_features(backbone, inputs, source, spec)
    else:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    pool = layers.GlobalMaxPooling2D if pooling == "max" else layers.GlobalAveragePooling2D
    x = pool(name="pool")(features)
    x = layers.Dropout(0.2, name="dropout")(x)
    activation = "sigmoid" if n_outputs == 1 else "softmax"
    outputs = layers.Dense(n_outputs, activation=activation, name="head")(x)
    return keras.Model(inputs, outputs, name=name)


def backbone_layers(model: Any) -> list[Any]:
    """The feature-extracting layers of a classifier from :func:`build_classifier`, input first."""
    import keras

    return [
        layer
        for layer in model.layers
        if not isinstance(layer, keras.layers.InputLayer)
        and layer.name not in HEAD_LAYERS
        and layer.name != ADAPTER_LAYER
    ]


def set_trainable(model: Any, layers_from_top: int | None) -> int:
    """Choose what training may change: the head always, plus the top of the backbone.

    Args:
        model: A classifier from :func:`build_classifier`.
        layers_from_top: ``None`` trains every layer (training from scratch); ``0`` freezes the
            whole backbone (the first phase of transfer learning); ``n > 0`` also trains the
            backbone's last ``n`` layers except BatchNormalization, whose ImageNet statistics a
            small fine-tuning batch would spoil; a negative number trains the whole backbone the
            same way.

    Returns:
        The number of backbone layers left trainable.
    """
    import keras

    features = backbone_layers(model)
    for layer in model.layers:
        layer.trainable = True
    if layers_from_top is None:
        return len(features)
    if layers_from_top < 0:
        top = set(map(id, features))
    else:
        top = set(map(id, features[len(features) - layers_from_top :] if layers_from_top else []))
    trainable = 0
    for layer in features:
        frozen = id(layer) not in top or isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = not frozen
        trainable += not frozen
    return trainable
