"""A tiny bundle whose fracture models have a convolution, so Grad-CAM has a map to explain.

Stage 1 is the mean-intensity model of ``build_tiny_bundle`` (bright images are ELBOW, dark ones
``other``). Each fracture model copies the image through a 1x1 convolution and a ReLU (layer
``features``), takes the global maximum and scores it: p = sigmoid(5 * max - 2). Its Grad-CAM is
therefore the image itself, scaled: the brightest spot is the peak.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.models.conftest import build_tiny_bundle


def spot_model(size: int = 16):
    import keras
    from keras import layers

    inputs = keras.Input((size, size, 1))
    x = layers.Conv2D(1, 1, use_bias=False, name="conv")(inputs)
    x = layers.Activation("relu", name="features")(x)
    x = layers.GlobalMaxPooling2D(name="pool")(x)
    out = layers.Dense(1, activation="sigmoid", name="head")(x)
    model = keras.Model(inputs, out)
    model.get_layer("conv").set_weights([np.ones((1, 1, 1, 1), np.float32)])
    model.get_layer("head").set_weights([np.array([[5.0]], np.float32), np.array([-2.0])])
    return model


def build_spot_bundle(root: Path, *, threshold: float = 0.9) -> Path:
    """A bundle with ``spot_model`` fracture models: an image whose brightest pixel is 1.0 scores
    sigmoid(3) = 0.95."""
    return build_tiny_bundle(root, threshold=threshold, fracture_model=spot_model, name="spot")


def spot_image(
    shape: tuple[int, int], spot_xy: tuple[int, int], radius: int, background: float = 0.9
) -> np.ndarray:
    """A grey image with a white square spot centred at ``spot_xy``.

    The default background keeps the mean high enough for stage 1's ELBOW when an image up to
    about 4:3 is padded to a square. A square image of 0.7 without a spot is an ELBOW that scores
    sigmoid(1.5) = 0.82, negative at the default threshold.
    """
    pixels = np.full(shape, background, np.float32)
    x, y = spot_xy
    pixels[max(y - radius, 0) : y + radius, max(x - radius, 0) : x + radius] = 1.0
    return pixels
