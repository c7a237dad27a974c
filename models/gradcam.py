"""Grad-CAM: where a part's fracture model looks when it scores an image.

The class activation map is taken at the fracture model's last layer with a spatial output (the
last convolution block of the small CNN, the final feature map of a keras.applications backbone):
each feature map is weighted by the mean gradient of the fracture logit with respect to it, the
weighted sum is passed through a ReLU and scaled to [0, 1]. The logit rather than the probability
is differentiated, so a saturated sigmoid still gives a map. The map is then brought back to the
original image's pixel grid by undoing :func:`models.preprocess.fit_square` (upsample to the
model input, cut away the padding, resize to the image), so the peak is a pixel of the image.

Two ways to the map, the same map:

- ``keras``: the gradient, by TensorFlow, on the bundle's Keras model (the ``[train]`` extra).
- ``onnx``: the ONNX export's second output (``bonewatch bundle export-onnx`` adds it where the
  head is global pooling -> Dense): the feature map weighted by the head's weights for the logit.
  Behind global average or max pooling the mean gradient of the logit over each channel's map is
  that channel's head weight divided by h * w, so after the ReLU and the scaling to [0, 1] this
  is Grad-CAM exactly. It needs ONNX Runtime only: the serving install's heatmaps.

Also here: measuring how often the peak falls inside a phantom's fracture box.
"""

from __future__ import annotations

import csv
import logging
import threading
import weakref
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from bonewatch.ingest import DecodedImage, IngestError, PixelGrid, read_image
from bonewatch.models.bundle import Bundle, BundleError, load_keras_model, onnx_file
from bonewatch.models.cascade import run_cascade
from bonewatch.models.datasets import Sample
from bonewatch.models.engines import InferenceThreads, OnnxPredictor, onnxruntime_available
from bonewatch.models.extras import MissingExtra, require_train, train_available
from bonewatch.models.preprocess import preprocess_batch

log = logging.getLogger(__name__)

Box = tuple[int, int, int, int]
# Phantom boxes are tight around the break; the localisation test allows 10 % more width and height.
BOX_ENLARGEMENT = 0.10
# Heatmap pictures (the worker's PNGs, `explain`, the Secondary Capture, report thumbnails) decode
# JPEG 2000 and JPEG at the smallest level or scale whose long side still covers 1,024 px: this
# is read_image's min_side, which covers twice it. A model's input needs less (twice its side).
PICTURE_MIN_SIDE = 512
# Where a heatmap comes from: "auto" (see heatmap_method), the ONNX graph, or Keras's gradient.
HEATMAP_METHODS = ("auto", "onnx", "keras")


@dataclass(frozen=True)
class Explanation:
    """A fracture model's Grad-CAM for one image.

    Attributes:
        part: The body part whose fracture model was explained.
        p_fracture: That model's probability for the image.
        heatmap: float32 (H, W) in [0, 1] on the pixels explained (those of the file, or the
            reduced ones a picture was decoded at).
        peak_xy: ``(x, y)`` of the heatmap's maximum, in the file's own pixels.
        layer: The model layer the map was taken at.
        method: ``onnx`` (the export's class activation output) or ``keras`` (the gradient).
    """

    part: str
    p_fracture: float
    heatmap: np.ndarray
    peak_xy: tuple[int, int]
    layer: str
    method: str = "keras"


def cam_layer(model: Any) -> str:
    """The name of ``model``'s last layer whose output is a (batch, h, w, c) feature map.

    A model with no such layer (a dense head straight on the image) is explained at its input.
    """
    for layer in reversed(model.layers):
        shape = getattr(layer, "output", None)
        shape = getattr(shape, "shape", None)
        if shape is not None and len(shape) == 4 and layer.__class__.__name__ != "InputLayer":
            return str(layer.name)
    return str(model.layers[0].name)


class _CamModel:
    """A model that returns the chosen layer's activations and the fracture logit."""

    def __init__(self, model: Any, layer: str) -> None:
        import keras
        import tensorflow as tf

        self._tf = tf
        self.layer = layer
        head = model.layers[-1]
        # A Dense sigmoid/softmax head: differentiate its pre-activation (the logit).
        self._head = head if isinstance(head, keras.layers.Dense) else None
        target = head.input if self._head is not None else model.output
        self._model = keras.Model(model.inputs, [model.get_layer(layer).output, target])

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tf = self._tf
        xt = tf.convert_to_tensor(x, tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(xt)  # a map taken at the input layer is the input itself
            features, target = self._model(xt, training=False)
            if self._head is not None:
                logits = tf.matmul(target, self._head.kernel) + self._head.bias
                probs = self._head.activation(logits)
            else:
                logits = probs = target
            # The last column is p(fracture), as in the cascade. Samples are independent in
            # inference mode, so one gradient of the sum gives every sample's own gradient.
            score = tf.reduce_sum(logits[:, -1])
        grads = tape.gradient(score, features)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        cams = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))
        return np.asarray(cams, np.float32), np.asarray(probs[:, -1], np.float64)


_cam_models: weakref.WeakKeyDictionary[Any, dict[str, _CamModel]] = weakref.WeakKeyDictionary()
_keras_models: dict[tuple[Path, str], Any] = {}
_keras_lock = threading.Lock()


def _cam_model(model: Any, layer: str | None) -> _CamModel:
    name = layer or cam_layer(model)
    per_model = _cam_models.setdefault(model, {})
    if name not in per_model:
        per_model[name] = _CamModel(model, name)
    return per_model[name]


def fracture_keras_model(bundle: Bundle, part: str) -> Any:
    """The Keras model of a part's fracture model: the one the bundle serves with, or, when it
    is served by another engine (ONNX), loaded once from the bundle's weights file."""
    served = getattr(bundle.fracture_models[part], "model", None)
    if served is not None:
        return served
    key = (bundle.path, part)
    with _keras_lock:
        if key not in _keras_models:
            _keras_models[key] = load_keras_model(bundle.path, bundle.manifest.fracture[part])
        return _keras_models[key]


class _OnnxCam:
    """An ONNX fracture model's probabilities and class activation output, in one run."""

    def __init__(self, session: Any, output: str, layer: str) -> None:
        self._session = session
        self._input = session.get_inputs()[0].name
        self._outputs = [session.get_outputs()[0].name, output]
        self.layer = layer

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        batch = np.ascontiguousarray(x, dtype=np.float32)
        probs, maps = self._session.run(self._outputs, {self._input: batch})
        cams = np.maximum(np.asarray(maps, np.float32).reshape(np.shape(maps)[:3]), 0.0)
        return cams, np.asarray(probs, np.float64)[:, -1]


_onnx_cams: dict[tuple[Path, str, str], _OnnxCam] = {}
_onnx_lock = threading.Lock()


def has_onnx_cam(bundle: Bundle, parts: Sequence[str]) -> bool:
    """Whether the ONNX exports of these parts' fracture models carry a class activation output."""
    for part in parts:
        export = bundle.manifest.fracture[part].onnx
        if export is None or export.cam is None:
            return False
    return True


def heatmap_method(bundle: Bundle, parts: Sequence[str], requested: str = "auto") -> str:
    """Where the heatmaps of these parts come from: ``onnx`` or ``keras``.

    ``auto`` keeps Keras when the bundle is served by Keras (the model that scored is the one
    explained), else takes the ONNX graph's class activation output when every part has one,
    else Keras if TensorFlow is installed.

    Raises:
        ValueError: ``requested`` is not one of :data:`HEATMAP_METHODS`.
        BundleError: ``onnx`` was asked for and an export has no class activation output.
        MissingExtra: Keras is needed (asked for, or nothing else can) and not installed.
    """
    if requested not in HEATMAP_METHODS:
        raise ValueError(f"unknown heatmap method {requested!r}; choose one of {HEATMAP_METHODS}")
    cam = has_onnx_cam(bundle, parts) and onnxruntime_available()
    if requested == "onnx" or (requested == "auto" and bundle.engine != "keras" and cam):
        if not cam:
            raise BundleError(
                f"the ONNX models of bundle {bundle.name} {bundle.version} have no class "
                "activation output; add it with `bonewatch bundle export-onnx`"
            )
        return "onnx"
    if requested == "keras":
        require_train("Keras Grad-CAM")
    elif not train_available():
        raise MissingExtra(
            f"heatmaps of bundle {bundle.name} {bundle.version} (its ONNX models have no class "
            "activation output)"
        )
    return "keras"


def _onnx_cam(bundle: Bundle, part: str) -> _OnnxCam:
    """The part's fp32 ONNX model with its class activation output: the session that serves
    the bundle when it is served by ONNX Runtime in fp32, else one opened once for heatmaps."""
    entry = bundle.manifest.fracture[part]
    export = entry.onnx
    if export is None or export.cam is None:  # heatmap_method has ruled this out
        raise BundleError(f"the {part} fracture model has no class activation output")
    key = (bundle.path, part, export.sha256)
    with _onnx_lock:
        if key not in _onnx_cams:
            served = bundle.fracture_models[part]
            if isinstance(served, OnnxPredictor) and bundle.precision == "fp32":
                session = served.session
            else:
                session = OnnxPredictor(
                    onnx_file(bundle.path, entry, "fp32"), InferenceThreads()
                ).session
            _onnx_cams[key] = _OnnxCam(session, export.cam.output, export.cam.layer)
        return _onnx_cams[key]


def _scaled(cams: np.ndarray) -> np.ndarray:
    peak = cams.reshape(len(cams), -1).max(axis=1) if len(cams) else np.zeros(0, np.float32)
    scale = np.where(peak > 0, peak, 1.0)
    return cams / scale[:, None, None]


def onnx_cam_batch(bundle: Bundle, part: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """Class activation maps of a batch from the part's ONNX model, as :func:`gradcam_batch`
    returns them: ``(cams, p_fracture, layer)``, the maps scaled to [0, 1]."""
    cam = _onnx_cam(bundle, part)
    cams, probs = cam(x)
    return _scaled(cams), probs, cam.layer


def gradcam_batch(
    model: Any, x: np.ndarray, *, layer: str | None = None
) -> tuple[np.ndarray, np.ndarray, str]:
    """Grad-CAM maps of a batch of model inputs.

    Args:
        model: A Keras fracture model (see :func:`fracture_keras_model`).
        x: Model inputs, shape (N, S, S, C), preprocessed as the manifest says.
        layer: The layer to explain; the last spatial layer when None.

    Returns:
        ``(cams, p_fracture, layer)``: maps of shape (N, h, w) scaled to [0, 1] (all zero where
        nothing pushed the score up), each input's probability, and the layer used.
    """
    cam_model = _cam_model(model, layer)
    cams, probs = cam_model(x)
    return _scaled(cams), probs, cam_model.layer


def content_box(shape: tuple[int, int], size: int) -> tuple[int, int, int, int]:
    """Where :func:`models.preprocess.fit_square` put an image of ``shape`` in its square:
    ``(top, left, height, width)`` in model-input pixels."""
    h, w = shape
    scale = size / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    return (size - new_h) // 2, (size - new_w) // 2, new_h, new_w


def cam_to_image(
    cam: np.ndarray, shape: tuple[int, int], size: int, full: tuple[int, int] | None = None
) -> np.ndarray:
    """Bring a map from the model's feature grid back onto the image's pixels (``shape``).

    ``full``: the file's own (rows, columns) when the pixels were decoded reduced; the model's
    input was laid out from it (``fit_square`` through the grid)."""
    top, left, new_h, new_w = content_box(full or shape, size)
    square = Image.fromarray(np.ascontiguousarray(cam, np.float32), mode="F")
    square = square.resize((size, size), Image.Resampling.BILINEAR)
    inside = square.crop((left, top, left + new_w, top + new_h))
    on_image = inside.resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(on_image, np.float32), 0.0, 1.0)


def _peak(heatmap: np.ndarray, full: tuple[int, int] | None = None) -> tuple[int, int]:
    """The map's maximum, ``(x, y)``; with ``full``, the file pixel under it (the centre of
    the reduced pixel, scaled to the file's own grid)."""
    y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    if full is None:
        return int(x), int(y)
    rows, columns = heatmap.shape
    fx = min(full[1] - 1, int((x + 0.5) * full[1] / columns))
    fy = min(full[0] - 1, int((y + 0.5) * full[0] / rows))
    return fx, fy


def explain_images(
    images: Sequence[np.ndarray],
    parts: Sequence[str],
    bundle: Bundle,
    *,
    layer: str | None = None,
    batch_size: int = 16,
    method: str = "auto",
    grids: Sequence[PixelGrid | None] | None = None,
) -> list[Explanation]:
    """Grad-CAM of each image under the fracture model of its part, in batches per part.

    Args:
        images: Grey pixels (H, W) in [0, 1], as decoded.
        parts: For each image, the body part whose fracture model to explain.
        grids: For each image, ``DecodedImage.grid`` (pixels decoded reduced are preprocessed
            as the full image would be, and ``peak_xy`` is in the file's own pixels).
        bundle: The loaded bundle.
        layer: A Keras layer to explain (the ``keras`` method only); the last spatial one when
            None.
        method: ``auto``, ``onnx`` or ``keras`` (see :func:`heatmap_method`).

    Returns:
        One :class:`Explanation` per image, in input order.
    """
    if len(images) != len(parts):
        raise ValueError(f"{len(images)} images but {len(parts)} parts")
    if grids is None:
        grids = [None] * len(images)
    elif len(grids) != len(images):
        raise ValueError(f"{len(images)} images but {len(grids)} grids")
    unknown = sorted(set(parts) - set(bundle.fracture_models))
    if unknown:
        raise ValueError(f"the bundle has no fracture model for {unknown}")
    if not images:
        return []
    chosen = "keras" if layer is not None else heatmap_method(bundle, sorted(set(parts)), method)
    out: list[Explanation | None] = [None] * len(images)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, part in enumerate(parts):
        groups[part].append(i)
    for part, index in groups.items():
        spec = bundle.manifest.fracture[part].spec
        for start in range(0, len(index), batch_size):
            chunk = index[start : start + batch_size]
            x = preprocess_batch([images[i] for i in chunk], spec, [grids[i] for i in chunk])
            if chosen == "onnx":
                cams, probs, used = onnx_cam_batch(bundle, part, x)
            else:
                model = fracture_keras_model(bundle, part)
                cams, probs, used = gradcam_batch(model, x, layer=layer)
            for i, cam, p in zip(chunk, cams, probs, strict=True):
                grid = grids[i]
                full = (grid.rows, grid.columns) if grid is not None else None
                heatmap = cam_to_image(cam, images[i].shape, spec.input_size, full)
                peak = _peak(heatmap, full)
                out[i] = Explanation(part, float(p), heatmap, peak, used, chosen)
    return [e for e in out if e is not None]


def overlay_heatmap(
    pixels: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.5, mark_peak: bool = True
) -> np.ndarray:
    """The radiograph in grey with the heatmap blended over it in colour (jet colormap).

    Where the map is cold the radiograph shows through unchanged; the peak gets a ring.

    Returns:
        uint8 RGB array (H, W, 3).
    """
    from matplotlib import colormaps

    grey = np.clip(pixels, 0.0, 1.0)[..., None].repeat(3, axis=2)
    colour = colormaps["jet"](np.clip(heatmap, 0.0, 1.0))[..., :3]
    weight = alpha * np.clip(heatmap, 0.0, 1.0)[..., None]
    rgb = (grey * (1 - weight) + colour * weight) * 255
    image = Image.fromarray(np.round(rgb).astype(np.uint8), mode="RGB")
    if mark_peak:
        x, y = _peak(heatmap)
        r = max(4, round(0.03 * max(pixels.shape)))
        draw = ImageDraw.Draw(image)
        draw.ellipse((x - r, y - r, x + r, y + r), outline=(255, 255, 255), width=max(1, r // 4))
    return np.asarray(image)


# ---------------------------------------------------------------------------------------------
# Localisation on phantoms
# ---------------------------------------------------------------------------------------------


def read_fracture_boxes(dataset_root: str | Path) -> dict[Path, list[Box]]:
    """The boxes of ``fractures.csv`` (written by ``bonewatch synth``), keyed by resolved path.

    Raises:
        FileNotFoundError: the dataset has no ``fractures.csv``.
    """
    root = Path(dataset_root)
    boxes: dict[Path, list[Box]] = defaultdict(list)
    with (root / "fractures.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            box = (int(row["x0"]), int(row["y0"]), int(row["x1"]), int(row["y1"]))
            boxes[(root / row["path"]).resolve()].append(box)
    return dict(boxes)


def peak_in_box(peak_xy: tuple[int, int], box: Box, enlarge: float = BOX_ENLARGEMENT) -> bool:
    """Whether the peak pixel's centre lies in ``box`` (exclusive upper corner) grown by
    ``enlarge`` of its width and height, half on each side."""
    x0, y0, x1, y1 = box
    mx, my = enlarge * (x1 - x0) / 2, enlarge * (y1 - y0) / 2
    cx, cy = peak_xy[0] + 0.5, peak_xy[1] + 0.5
    return x0 - mx <= cx <= x1 + mx and y0 - my <= cy <= y1 + my


@dataclass
class Localisation:
    """How often the Grad-CAM peak fell inside an enlarged fracture box.

    Images that stage 1 refused have no fracture model to explain and count as misses.
    """

    n_images: int = 0
    n_hits: int = 0
    n_refused: int = 0
    n_unreadable: int = 0
    enlarge: float = BOX_ENLARGEMENT
    per_part: dict[str, list[int]] = field(default_factory=dict)  # part -> [hits, images]

    @property
    def fraction(self) -> float | None:
        return self.n_hits / self.n_images if self.n_images else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "fraction_peak_in_box": None if self.fraction is None else round(self.fraction, 4),
            "n_images": self.n_images,
            "n_hits": self.n_hits,
            "n_refused": self.n_refused,
            "n_unreadable": self.n_unreadable,
            "box_enlargement": self.enlarge,
            "per_part": {
                part: {"fraction": round(h / n, 4) if n else None, "n_hits": h, "n_images": n}
                for part, (h, n) in sorted(self.per_part.items())
            },
        }


def measure_localisation(
    samples: Sequence[Sample],
    boxes: Mapping[Path, Sequence[Box]],
    bundle: Bundle,
    *,
    salt: str = "evaluation",
    batch_size: int = 32,
    enlarge: float = BOX_ENLARGEMENT,
    on_batch: Callable[[int], None] | None = None,
    method: str = "auto",
) -> Localisation:
    """Explain every image that has a fracture box under the part the cascade chose for it, and
    count the images whose heatmap peak lies inside one of its boxes (enlarged by ``enlarge``).

    ``method`` is where the heatmaps come from (:func:`heatmap_method`).
    """
    boxed = [s for s in samples if s.path.resolve() in boxes]
    result = Localisation(enlarge=enlarge)
    for start in range(0, len(boxed), batch_size):
        chunk = boxed[start : start + batch_size]
        decoded: list[DecodedImage] = []
        kept: list[Sample] = []
        for sample in chunk:
            try:
                decoded.append(read_image(sample.path, salt=salt))
                kept.append(sample)
            except (IngestError, OSError) as exc:
                log.warning("skipping %s: %s", sample.path, exc)
                result.n_unreadable += 1
        preds = run_cascade(decoded, bundle, batch_size=batch_size)
        served = [i for i, p in enumerate(preds) if p.p_fracture is not None]
        explanations = explain_images(
            [decoded[i].pixels for i in served],
            [preds[i].body_part for i in served],
            bundle,
            method=method,
        )
        hit_of = {
            i: any(peak_in_box(e.peak_xy, b, enlarge) for b in boxes[kept[i].path.resolve()])
            for i, e in zip(served, explanations, strict=True)
        }
        for i, sample in enumerate(kept):
            hit = hit_of.get(i, False)
            result.n_images += 1
            result.n_hits += hit
            result.n_refused += i not in hit_of
            tally = result.per_part.setdefault(sample.part, [0, 0])
            tally[0] += hit
            tally[1] += 1
        if on_batch is not None:
            on_batch(len(chunk))
    return result
