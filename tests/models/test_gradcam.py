"""Grad-CAM maps, their way back onto the original pixels, and localisation on phantoms."""

from __future__ import annotations

import numpy as np
import pytest

from bonewatch.ingest import write_png
from bonewatch.models.bundle import load_bundle
from bonewatch.models.datasets import load_dataset
from bonewatch.models.gradcam import (
    cam_layer,
    cam_to_image,
    content_box,
    explain_images,
    gradcam_batch,
    measure_localisation,
    overlay_heatmap,
    peak_in_box,
    read_fracture_boxes,
)
from bonewatch.models.preprocess import fit_square
from tests.models.tiny_conv import build_spot_bundle, spot_image, spot_model

# A seed the demo bundle never saw (it was trained on seed 1; other tests use 424242 and 90210).
LOCALISATION_SEED = 7357


@pytest.fixture(scope="module")
def spot_bundle(tmp_path_factory):
    return load_bundle(build_spot_bundle(tmp_path_factory.mktemp("spot") / "spot"))


def test_cam_layer_is_the_last_spatial_layer():
    assert cam_layer(spot_model()) == "features"


def test_a_model_without_a_spatial_layer_is_explained_at_its_input():
    from tests.models.conftest import _mean_model

    model = _mean_model(1, np.array([1.0], np.float32), np.array([0.0], np.float32), "sigmoid")
    assert cam_layer(model) == model.layers[0].name
    x = np.zeros((1, 16, 16, 1), np.float32)
    x[0, 4:8, 9:12] = 1.0
    cams, _, layer = gradcam_batch(model, x)
    assert layer == model.layers[0].name
    assert np.array_equal(cams[0] > 0.5, x[0, :, :, 0] > 0.5)


def test_gradcam_peaks_at_the_spot_the_model_scores():
    x = np.full((2, 16, 16, 1), 0.5, np.float32)
    x[0, 3, 11] = 1.0
    x[1, 12, 2] = 1.0
    cams, probs, layer = gradcam_batch(spot_model(), x)
    assert layer == "features"
    assert cams.shape == (2, 16, 16)
    assert cams.max() == pytest.approx(1.0)
    assert np.unravel_index(np.argmax(cams[0]), (16, 16)) == (3, 11)
    assert np.unravel_index(np.argmax(cams[1]), (16, 16)) == (12, 2)
    assert probs == pytest.approx([1 / (1 + np.exp(-3.0))] * 2, rel=1e-5)


@pytest.mark.parametrize("shape", [(60, 30), (30, 60), (45, 45), (17, 101)])
def test_cam_to_image_undoes_fit_square(shape):
    # A map that is the preprocessed image itself must come back as the image (up to blur).
    h, w = shape
    image = np.zeros(shape, np.float32)
    image[h // 3, (2 * w) // 3] = 1.0
    image = np.maximum(image, np.roll(image, 1, axis=0))
    square = fit_square(image, 64)
    back = cam_to_image(square / square.max(), shape, 64)
    assert back.shape == shape
    y, x = np.unravel_index(np.argmax(back), shape)
    assert abs(int(y) - h // 3) <= 2
    assert abs(int(x) - (2 * w) // 3) <= 2
    top, left, new_h, new_w = content_box(shape, 64)
    assert square[:top].max(initial=0) == 0 and square[:, :left].max(initial=0) == 0
    assert (new_h, new_w) == (round(h * 64 / max(shape)), round(w * 64 / max(shape)))


def test_explain_images_reports_the_peak_in_original_pixels(spot_bundle):
    # Non-square images: the square input is padded, and the peak must still land on the spot.
    cases = [((96, 64), (40, 70)), ((64, 96), (80, 20)), ((80, 80), (12, 60))]
    images = [spot_image(shape, xy, radius=6) for shape, xy in cases]
    explanations = explain_images(images, ["WRIST", "ELBOW", "HAND"], spot_bundle)
    for (shape, (sx, sy)), e in zip(cases, explanations, strict=True):
        assert e.heatmap.shape == shape
        assert 0.0 <= e.heatmap.min() and e.heatmap.max() <= 1.0
        px, py = e.peak_xy
        assert abs(px - sx) <= 6 and abs(py - sy) <= 6, (shape, e.peak_xy)
        assert e.p_fracture > 0.9
        assert e.layer == "features"
    assert [e.part for e in explanations] == ["WRIST", "ELBOW", "HAND"]


def test_explain_images_refuses_a_part_without_a_model(spot_bundle):
    with pytest.raises(ValueError, match="no fracture model"):
        explain_images([np.ones((16, 16), np.float32)], ["KNEE"], spot_bundle)


def test_overlay_keeps_the_image_where_the_map_is_cold():
    pixels = np.linspace(0, 1, 40 * 30, dtype=np.float32).reshape(40, 30)
    heatmap = np.zeros_like(pixels)
    heatmap[5:10, 20:25] = 1.0
    rgb = overlay_heatmap(pixels, heatmap, mark_peak=False)
    assert rgb.shape == (40, 30, 3) and rgb.dtype == np.uint8
    grey = np.round(pixels * 255).astype(np.uint8)
    assert np.array_equal(rgb[30:, :, 0], grey[30:, :])
    hot = rgb[7, 22].astype(int)
    assert not (hot[0] == hot[1] == hot[2])  # coloured where the map is hot


def test_peak_in_box_allows_ten_percent_more_width_and_height():
    box = (100, 100, 200, 200)  # margin of 5 pixels on each side
    assert peak_in_box((150, 150), box)
    assert peak_in_box((204, 150), box)
    assert not peak_in_box((205, 150), box)
    assert peak_in_box((95, 150), box)
    assert not peak_in_box((94, 150), box)
    assert not peak_in_box((150, 94), box)
    assert not peak_in_box((204, 150), box, enlarge=0.0)


def test_synth_records_fracture_boxes_inside_the_image(tmp_path):
    from PIL import Image

    from bonewatch.worker.synth import synthesize

    summary = synthesize(tmp_path / "ph", studies=16, fmt="png", seed=3, size=96)
    boxes = read_fracture_boxes(tmp_path / "ph")
    assert sum(len(b) for b in boxes.values()) == summary.fractures > 0
    for path, items in boxes.items():
        assert path.is_file()
        assert "_positive" in path.parent.name
        width, height = Image.open(path).size
        for x0, y0, x1, y1 in items:
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height


def test_measure_localisation_counts_hits_refusals_and_parts(tmp_path, spot_bundle):
    root = tmp_path / "ds" / "train"
    spots = {
        "patient1/study1_positive/image1.png": (20, 30),
        "patient2/study1_positive/image1.png": (50, 50),
    }
    for rel, xy in spots.items():
        (root / "XR_WRIST" / rel).parent.mkdir(parents=True)
        write_png(root / "XR_WRIST" / rel, spot_image((64, 64), xy, radius=6))
    dark = root / "XR_WRIST" / "patient3" / "study1_positive" / "image1.png"
    dark.parent.mkdir(parents=True)
    write_png(dark, np.full((64, 64), 0.1, np.float32))  # stage 1 says `other`
    lines = ["path,x0,y0,x1,y1"]
    lines.append("train/XR_WRIST/patient1/study1_positive/image1.png,12,22,28,38")  # on the spot
    lines.append("train/XR_WRIST/patient2/study1_positive/image1.png,0,0,10,10")  # elsewhere
    lines.append("train/XR_WRIST/patient3/study1_positive/image1.png,0,0,10,10")
    (tmp_path / "ds" / "fractures.csv").write_text("\n".join(lines) + "\n")
    samples = load_dataset(tmp_path / "ds")
    result = measure_localisation(samples, read_fracture_boxes(tmp_path / "ds"), spot_bundle)
    assert (result.n_images, result.n_hits, result.n_refused) == (3, 1, 1)
    assert result.fraction == pytest.approx(1 / 3)
    assert result.per_part == {"WRIST": [1, 3]}
    assert result.to_dict()["fraction_peak_in_box"] == pytest.approx(0.3333)


@pytest.mark.slow
def test_demo_bundle_heatmap_peaks_inside_most_fracture_boxes(tmp_path):
    from bonewatch.worker.settings import DEMO_BUNDLE
    from bonewatch.worker.synth import synthesize

    synthesize(tmp_path / "heldout", studies=160, fmt="both", seed=LOCALISATION_SEED)
    boxes = read_fracture_boxes(tmp_path / "heldout")
    samples = load_dataset(tmp_path / "heldout")
    result = measure_localisation(samples, boxes, load_bundle(DEMO_BUNDLE))
    assert result.n_images >= 100
    assert result.fraction is not None and result.fraction >= 0.70, result.to_dict()
