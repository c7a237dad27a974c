import numpy as np

from bonewatch.ingest import DecodedImage, ImageMeta
from bonewatch.models.bundle import load_bundle
from bonewatch.models.cascade import run_cascade


def _image(value: float, body_part: str | None = None) -> DecodedImage:
    meta = ImageMeta(
        path="x.png", sha256="0" * 64, format="png", size_bytes=1, body_part_examined=body_part
    )
    return DecodedImage(np.full((40, 30), value, np.float32), meta)


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + np.exp(-z))


def test_bright_images_get_a_fracture_probability(tiny_bundle):
    # The tiny bundle sees the mean intensity m: padding to a square makes m = value * 30/40.
    pred = run_cascade([_image(1.0)], load_bundle(tiny_bundle))[0]
    m = 30 / 40
    assert pred.status == "done" and pred.body_part == "ELBOW"
    assert abs(pred.p_fracture - _sigmoid(10 * m - 5)) < 1e-3
    assert pred.label == "positive" and pred.threshold == 0.5
    assert set(pred.body_part_probs) >= {"ELBOW", "other"}


def test_other_is_never_forced_into_a_part(tiny_bundle):
    pred = run_cascade([_image(0.0)], load_bundle(tiny_bundle))[0]
    assert pred.status == "unsupported" and pred.body_part == "other"
    assert pred.p_fracture is None and pred.label is None
    assert "none of the seven" in pred.reason


def test_low_confidence_is_unsupported(tmp_path):
    from tests.models.conftest import build_tiny_bundle

    bundle = load_bundle(build_tiny_bundle(tmp_path / "strict", floor=0.999))
    # mean 0.55 after padding -> ELBOW wins with p about 0.3, far under the 0.999 floor
    pred = run_cascade([_image(0.55 * 40 / 30)], bundle)[0]
    assert pred.status == "unsupported" and "below the bundle's floor" in pred.reason


def test_batch_keeps_input_order_and_groups_by_part(tiny_bundle):
    images = [_image(v) for v in (1.0, 0.0, 0.9, 0.0, 1.0)]
    preds = run_cascade(images, load_bundle(tiny_bundle), batch_size=2)
    assert [p.status for p in preds] == ["done", "unsupported", "done", "unsupported", "done"]
    assert preds[0].p_fracture > preds[2].p_fracture


def test_body_part_examined_disagreement_is_recorded(tiny_bundle):
    agree, disagree, vague = run_cascade(
        [_image(1.0, "ELBOW"), _image(1.0, "HAND"), _image(1.0, "EXTREMITY")],
        load_bundle(tiny_bundle),
    )
    assert not agree.body_part_disagrees
    assert disagree.body_part_disagrees and disagree.body_part_examined == "HAND"
    assert not vague.body_part_disagrees


def test_empty_batch(tiny_bundle):
    assert run_cascade([], load_bundle(tiny_bundle)) == []


def test_inputs_prepared_ahead_give_the_same_predictions(tiny_bundle):
    from bonewatch.models.cascade import Preprocessed, input_specs, prepare_inputs

    bundle = load_bundle(tiny_bundle)
    images = [_image(v) for v in (1.0, 0.0, 0.9, 0.7)]
    specs = input_specs(bundle)
    ready = Preprocessed.from_rows([prepare_inputs(im.pixels, specs) for im in images], specs, 0.5)
    assert ready.tensors[specs[0]].shape == (4, 16, 16, 1)
    direct = run_cascade(images, bundle)
    ahead = run_cascade(images, bundle, preprocessed=ready)
    assert [(p.status, p.p_fracture) for p in ahead] == [(p.status, p.p_fracture) for p in direct]
    assert ahead[0].timings["preprocess_ms"] == 1000 * 0.5 / 4
