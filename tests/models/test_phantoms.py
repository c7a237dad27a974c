"""Tests for models/phantoms.py: the synthetic radiographs the demo bundle is trained on."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from bonewatch.models.phantoms import OTHER_REGIONS, PARTS, Phantom, draw_phantom

REGIONS = PARTS + OTHER_REGIONS


def _draw(region: str, seed: int, *, fractured: bool = False, size: int = 512) -> Phantom:
    return draw_phantom(region, fractured=fractured, rng=np.random.default_rng(seed), size=size)


def test_region_lists_match_mura() -> None:
    assert PARTS == ("ELBOW", "FINGER", "FOREARM", "HAND", "HUMERUS", "SHOULDER", "WRIST")
    assert OTHER_REGIONS == ("CHEST", "KNEE", "PELVIS")


@pytest.mark.parametrize("region", REGIONS)
def test_every_region_draws_a_valid_image(region: str) -> None:
    p = _draw(region, 7)
    assert p.region == region
    assert p.pixels.dtype == np.float32
    assert p.pixels.ndim == 2
    assert max(p.pixels.shape) == 512
    assert min(p.pixels.shape) >= 0.5 * 512
    assert np.isfinite(p.pixels).all()
    assert p.pixels.min() >= 0.0 and p.pixels.max() <= 1.0
    assert p.laterality in ("L", "R")
    assert not p.fractured and p.fracture_boxes == ()
    # Bone must stand out from background: a real dynamic range, not a flat image.
    assert np.percentile(p.pixels, 99) - np.percentile(p.pixels, 5) > 0.3


@pytest.mark.parametrize("size", [96, 320, 700])
def test_size_sets_the_long_side(size: int) -> None:
    for region in ("HAND", "SHOULDER", "PELVIS"):
        assert max(_draw(region, 1, size=size).pixels.shape) == size


@pytest.mark.parametrize("region", ["FOREARM", "SHOULDER"])
def test_same_rng_state_gives_identical_phantom(region: str) -> None:
    a = _draw(region, 42, fractured=True)
    b = _draw(region, 42, fractured=True)
    np.testing.assert_array_equal(a.pixels, b.pixels)
    assert a.fracture_boxes == b.fracture_boxes
    assert a.laterality == b.laterality
    c = _draw(region, 43, fractured=True)
    assert not np.array_equal(a.pixels, c.pixels)


def test_consecutive_draws_from_one_generator_differ() -> None:
    rng = np.random.default_rng(0)
    a = draw_phantom("HAND", fractured=False, rng=rng)
    b = draw_phantom("HAND", fractured=False, rng=rng)
    assert not np.array_equal(a.pixels, b.pixels)


@pytest.mark.parametrize("region", PARTS)
def test_fracture_boxes_mark_where_the_image_changes(region: str) -> None:
    for seed in range(4):
        intact = _draw(region, seed, fractured=False)
        broken = _draw(region, seed, fractured=True)
        assert broken.fractured
        assert 1 <= len(broken.fracture_boxes) <= 2
        assert broken.pixels.shape == intact.pixels.shape
        assert broken.laterality == intact.laterality
        h, w = broken.pixels.shape
        diff = np.abs(broken.pixels - intact.pixels)
        changed = diff > 0.05
        for box in broken.fracture_boxes:
            assert all(isinstance(v, int) for v in box)
            x0, y0, x1, y1 = box
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            # Tight: a break, not half the image.
            assert (x1 - x0) * (y1 - y0) < 0.1 * h * w
            # The break darkens bone inside its box.
            inside = (broken.pixels - intact.pixels)[y0:y1, x0:x1]
            assert inside.min() < -0.1
        # Only the break, its swelling and a displaced fragment change; the rest of the pair is
        # pixel-identical (same pose, exposure, noise and marker).
        assert changed.any()
        assert changed.mean() < 0.15
        assert np.count_nonzero(diff) < 0.3 * diff.size


def test_fracture_gap_is_darker_than_the_bone_around_it() -> None:
    p = _draw("HUMERUS", 3, fractured=True)
    intact = _draw("HUMERUS", 3, fractured=False)
    x0, y0, x1, y1 = p.fracture_boxes[0]
    broken, whole = p.pixels[y0:y1, x0:x1], intact.pixels[y0:y1, x0:x1]
    # Bone pixels (brightest quarter of the intact box) turn dark where the gap cuts them;
    # the box mean is no guide, since swelling over the break brightens the soft tissue.
    bone = whole > np.percentile(whole, 75)
    assert (broken - whole)[bone].min() < -0.15


def test_fractured_and_intact_share_everything_else() -> None:
    """Pixel statistics outside bone must not tell fractured from intact images apart."""
    intact = [_draw("WRIST", s).pixels for s in range(30)]
    broken = [_draw("WRIST", s + 1000, fractured=True).pixels for s in range(30)]
    mean_i = np.mean([x.mean() for x in intact])
    mean_b = np.mean([x.mean() for x in broken])
    spread = np.std([x.mean() for x in intact])
    assert abs(mean_i - mean_b) < spread


@pytest.mark.parametrize("region", OTHER_REGIONS)
def test_other_regions_refuse_fractures(region: str) -> None:
    with pytest.raises(ValueError, match="fractures"):
        _draw(region, 0, fractured=True)


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown region"):
        _draw("ANKLE", 0)
    with pytest.raises(ValueError, match="size"):
        _draw("HAND", 0, size=8)


def test_laterality_and_marker_vary() -> None:
    sides = {_draw("ELBOW", s).laterality for s in range(12)}
    assert sides == {"L", "R"}


def test_phantom_is_frozen() -> None:
    p = _draw("FINGER", 0)
    with pytest.raises(AttributeError):
        p.region = "HAND"  # type: ignore[misc]


def _thumb(pixels: np.ndarray, side: int = 24) -> np.ndarray:
    img = Image.fromarray(pixels).resize((side, side), Image.Resampling.BOX)
    v = np.asarray(img, dtype=np.float32).ravel()
    return (v - v.mean()) / (v.std() + 1e-6)


def test_regions_are_separable_at_low_resolution() -> None:
    """A nearest-centroid classifier on 24x24 thumbnails beats chance by far across seeds."""
    per_class = 16
    rng_train = np.random.default_rng(100)
    rng_test = np.random.default_rng(200)
    centroids = []
    for region in REGIONS:
        feats = [
            _thumb(draw_phantom(region, fractured=False, rng=rng_train, size=192).pixels)
            for _ in range(per_class)
        ]
        centroids.append(np.mean(feats, axis=0))
    c = np.stack(centroids)
    correct = 0
    total = 0
    for label, region in enumerate(REGIONS):
        for _ in range(per_class):
            fractured = region in PARTS and bool(rng_test.random() < 0.5)
            p = draw_phantom(region, fractured=fractured, rng=rng_test, size=192)
            guess = int(np.argmin(((c - _thumb(p.pixels)) ** 2).sum(axis=1)))
            correct += guess == label
            total += 1
    assert correct / total >= 0.6


def test_drawing_is_fast() -> None:
    rng = np.random.default_rng(5)
    draw_phantom("HAND", fractured=True, rng=rng)  # warm up imports and caches
    start = time.perf_counter()
    for region in REGIONS:
        draw_phantom(region, fractured=region in PARTS, rng=rng)
    per_image = (time.perf_counter() - start) / len(REGIONS)
    # Generous against a loaded CI box; typical is ~25 ms.
    assert per_image < 0.25
