"""Preprocessing declared by a bundle's manifest; one function serves training and serving.

Pure array maths: grey pixels in [0, 1] go in, a model-ready float32 tensor comes out. A bundle
states its preprocessing as data (:class:`PreprocessSpec`), so the trainer that wrote the bundle and
the worker that serves it cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from bonewatch.ingest import PixelGrid, resize_as_full

# ImageNet statistics, used by backbones initialised from ImageNet weights (as in the MURA paper).
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
NORMALIZATIONS = ("unit", "imagenet", "minus_one_one")


@dataclass(frozen=True)
class PreprocessSpec:
    """How a stage turns grey pixels into its input tensor.

    Attributes:
        input_size: Side of the square model input, in pixels.
        channels: 1 for grey models, 3 for ImageNet backbones (grey is replicated).
        normalization: ``unit`` keeps [0, 1]; ``imagenet`` subtracts ImageNet's mean and divides by
            its standard deviation; ``minus_one_one`` maps to [-1, 1].
    """

    input_size: int
    channels: int = 1
    normalization: str = "unit"

    def __post_init__(self) -> None:
        if self.input_size < 8:
            raise ValueError(f"input_size must be at least 8, got {self.input_size}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}"
            )

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessSpec:
        return cls(
            input_size=int(data["input_size"]),
            channels=int(data.get("channels", 1)),
            normalization=str(data.get("normalization", "unit")),
        )


def fit_square(pixels: np.ndarray, size: int, grid: PixelGrid | None = None) -> np.ndarray:
    """Resize so the long side is ``size`` (aspect kept), then centre on a black square.

    Resizing before padding keeps memory bounded by the image itself, whatever its shape.
    Pixels decoded at a reduced resolution (``grid``) are resized as the full image would be.
    """
    h, w = pixels.shape if grid is None else (grid.rows, grid.columns)
    scale = size / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    if grid is not None:
        pixels = resize_as_full(pixels, grid, new_h, new_w)
    elif (new_h, new_w) != (h, w):
        img = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")
        pixels = np.array(img.resize((new_w, new_h), Image.Resampling.BILINEAR), np.float32)
    canvas = np.zeros((size, size), dtype=np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = pixels
    return canvas


def preprocess(
    pixels: np.ndarray, spec: PreprocessSpec, grid: PixelGrid | None = None
) -> np.ndarray:
    """Turn grey pixels (H, W) in [0, 1] into one model input of shape (S, S, C).

    ``grid``: where pixels decoded at a reduced resolution lie (``DecodedImage.grid``).

    Returns:
        float32 array of shape ``(spec.input_size, spec.input_size, spec.channels)``.
    """
    if pixels.ndim != 2:
        raise ValueError(f"expected grey pixels of shape (H, W), got {pixels.shape}")
    x = fit_square(pixels.astype(np.float32, copy=False), spec.input_size, grid)
    np.clip(x, 0.0, 1.0, out=x)
    x = np.repeat(x[:, :, None], spec.channels, axis=2)
    if spec.normalization == "imagenet":
        x = (x - IMAGENET_MEAN[: spec.channels]) / IMAGENET_STD[: spec.channels]
    elif spec.normalization == "minus_one_one":
        x = x * 2.0 - 1.0
    return x.astype(np.float32, copy=False)


def preprocess_batch(
    images: Sequence[np.ndarray],
    spec: PreprocessSpec,
    grids: Sequence[PixelGrid | None] | None = None,
) -> np.ndarray:
    """Preprocess several grey images (with their grids, if reduced) into one (N, S, S, C)
    batch."""
    out = np.empty((len(images), spec.input_size, spec.input_size, spec.channels), np.float32)
    for i, pixels in enumerate(images):
        out[i] = preprocess(pixels, spec, grids[i] if grids is not None else None)
    return out
