"""web/stats.py: the model against its reviewers, checked against scikit-learn."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score, roc_auc_score, roc_curve

from bonewatch.db.reviews import ReviewedStudy
from bonewatch.models.evaluate import Bootstrap
from bonewatch.web.stats import review_stats, roc_png, roc_points

WHEN = datetime(2026, 5, 1, tzinfo=UTC)


def _reviewed(truth, model, scores, parts):
    return [
        ReviewedStudy(
            study_uid=f"1.2.{i}",
            label="positive" if t else "negative",
            part=part,
            model_label="positive" if m else "negative",
            model_score=s,
            bundle_name="b",
            bundle_version="1",
            reviewer="bob",
            reviewed_at=WHEN,
        )
        for i, (t, m, s, part) in enumerate(zip(truth, model, scores, parts, strict=True))
    ]


@pytest.fixture
def sample():
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 2, 80)
    scores = np.clip(truth * 0.35 + rng.random(80) * 0.65, 0, 1)
    model = (scores >= 0.5).astype(int)
    parts = ["WRIST" if i % 2 else "ELBOW" for i in range(80)]
    return truth, model, scores, parts


def test_point_estimates_match_scikit_learn(sample):
    truth, model, scores, parts = sample
    report = review_stats(_reviewed(truth, model, scores, parts), Bootstrap(resamples=200))
    overall = report["overall"]
    assert overall["n_studies"] == 80 and overall["n_positive"] == int(truth.sum())
    assert overall["agreement"]["value"] == pytest.approx((truth == model).mean(), abs=1e-4)
    assert overall["kappa"]["value"] == pytest.approx(cohen_kappa_score(truth, model), abs=1e-4)
    assert overall["auroc"]["value"] == pytest.approx(roc_auc_score(truth, scores), abs=1e-4)
    sens = model[truth == 1].mean()
    spec = 1 - model[truth == 0].mean()
    assert overall["sensitivity"]["value"] == pytest.approx(sens, abs=1e-4)
    assert overall["specificity"]["value"] == pytest.approx(spec, abs=1e-4)
    wrist = np.array(parts) == "WRIST"
    got = report["per_part"]["WRIST"]["kappa"]["value"]
    assert got == pytest.approx(cohen_kappa_score(truth[wrist], model[wrist]), abs=1e-4)
    assert set(report["per_part"]) == {"ELBOW", "WRIST"}


def test_intervals_hold_the_estimate_and_are_seeded(sample):
    reviewed = _reviewed(*sample)
    first = review_stats(reviewed, Bootstrap(resamples=300, seed=1))
    again = review_stats(reviewed, Bootstrap(resamples=300, seed=1))
    assert first == again
    for metric in ("agreement", "sensitivity", "specificity", "kappa", "auroc"):
        value, (lo, hi) = first["overall"][metric]["value"], first["overall"][metric]["ci"]
        assert lo <= value + 1e-9 and value - 1e-9 <= hi, metric
    assert first["bootstrap"]["resamples"] == 300


def test_undefined_metrics_are_none():
    reviewed = _reviewed([1, 1], [1, 0], [0.9, 0.2], ["HAND", "HAND"])  # no negative study
    report = review_stats(reviewed, Bootstrap(resamples=50))
    assert report["overall"]["specificity"]["value"] is None
    assert report["overall"]["auroc"]["value"] is None
    assert report["overall"]["sensitivity"]["value"] == 0.5
    empty = review_stats([], Bootstrap(resamples=10))
    assert empty["overall"]["n_studies"] == 0 and empty["overall"]["kappa"]["value"] is None


def test_roc_points_match_scikit_learn(sample):
    truth, _, scores, _ = sample
    fpr, tpr = roc_points(truth, scores)
    ref_fpr, ref_tpr, _ = roc_curve(truth, scores, drop_intermediate=False)
    assert np.allclose(fpr, ref_fpr) and np.allclose(tpr, ref_tpr)


def test_roc_png_is_a_png(sample):
    data = roc_png(_reviewed(*sample), title="t")
    assert data.startswith(b"\x89PNG")
    assert roc_png([]).startswith(b"\x89PNG")
