import numpy as np
import pytest

from bonewatch.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec, preprocess


def test_output_shape_and_dtype_follow_the_spec():
    x = preprocess(np.random.default_rng(0).random((300, 200), np.float32), PreprocessSpec(64, 3))
    assert x.shape == (64, 64, 3) and x.dtype == np.float32


def test_aspect_ratio_is_kept_by_black_padding():
    tall = np.ones((200, 100), np.float32)
    x = preprocess(tall, PreprocessSpec(20))[:, :, 0]
    assert x[:, :4].max() < 0.05 and x[:, -4:].max() < 0.05  # padded sides stay black
    assert x[:, 8:12].min() > 0.95


def test_imagenet_normalisation_uses_imagenet_statistics():
    x = preprocess(np.full((10, 10), 0.5, np.float32), PreprocessSpec(10, 3, "imagenet"))
    np.testing.assert_allclose(x[0, 0], (0.5 - IMAGENET_MEAN) / IMAGENET_STD, rtol=1e-5)


def test_minus_one_one_maps_the_unit_range():
    pixels = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
    x = preprocess(pixels, PreprocessSpec(8, 1, "minus_one_one"))
    assert x.min() >= -1.0 and x.max() <= 1.0


def test_spec_round_trips_through_the_manifest_dict():
    spec = PreprocessSpec(96, 1, "unit")
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    "bad",
    [
        {"input_size": 4},
        {"input_size": 32, "channels": 2},
        {"input_size": 32, "normalization": "zscore"},
    ],
)
def test_bad_specs_are_refused(bad):
    with pytest.raises(ValueError):
        PreprocessSpec.from_dict(bad)


def test_long_thin_images_never_allocate_a_full_square():
    import tracemalloc

    strip = np.ones((2, 60000), np.float32)
    tracemalloc.start()
    x = preprocess(strip, PreprocessSpec(64))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert x.shape == (64, 64, 1)
    assert peak < 50 * 1024 * 1024  # a padded 60000x60000 square would be 14 GB
