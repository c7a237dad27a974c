"""MURA metrics with bootstrap confidence intervals, on predictions built by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from bonewatch.ingest import write_png
from bonewatch.models.bundle import load_bundle
from bonewatch.models.cascade import Prediction
from bonewatch.models.datasets import Sample, load_dataset
from bonewatch.models.evaluate import (
    HEADLINE_METRICS,
    PART_METRICS,
    Bootstrap,
    Scored,
    binary_kappa,
    compute_metrics,
    evaluate_bundle,
    rank_auroc,
)
from tests.models.conftest import LABELS


def scored(
    study: str,
    label: int,
    p: float | None,
    *,
    part: str = "ELBOW",
    predicted_part: str | None = None,
    threshold: float = 0.5,
    image: int = 1,
) -> Scored:
    """One image of ``study`` with the cascade's answer: p(fracture) p (None: refused)."""
    sample = Sample(Path(f"{study}/image{image}.png"), part, label, study.split("/")[0], study)
    chosen = predicted_part or part
    prediction = Prediction(
        status="done" if p is not None else "unsupported",
        reason=None,
        body_part_probs={},
        body_part=chosen,
        body_part_confidence=1.0,
        body_part_examined=None,
        body_part_disagrees=False,
        p_fracture=p,
        label=None if p is None else ("positive" if p >= threshold else "negative"),
        threshold=None if p is None else threshold,
        fracture_model=None,
    )
    return Scored(sample, prediction)


def noisy_dataset(n_studies: int, seed: int) -> list[Scored]:
    """Two parts, 1-3 images per study, scores that separate the classes imperfectly."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n_studies):
        part = "ELBOW" if i % 2 else "WRIST"
        label = int(rng.random() < 0.5)
        for k in range(int(rng.integers(1, 4))):
            p = float(np.clip(rng.normal(0.35 + 0.3 * label, 0.2), 0, 1))
            items.append(scored(f"patient{i}/study1", label, p, part=part, image=k + 1))
    return items


@pytest.mark.parametrize("seed", range(5))
def test_rank_auroc_equals_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 60)
    p = np.round(rng.random(60), 1)  # many ties
    assert rank_auroc(y, p) == pytest.approx(roc_auc_score(y, p))


def test_rank_auroc_needs_both_classes():
    assert rank_auroc(np.array([1, 1]), np.array([0.2, 0.3])) is None


@pytest.mark.parametrize("seed", range(5))
def test_binary_kappa_equals_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 40)
    yhat = np.where(rng.random(40) < 0.7, y, 1 - y)
    assert binary_kappa(y, yhat) == pytest.approx(cohen_kappa_score(y, yhat))


def test_binary_kappa_of_constant_vectors():
    ones, zeros = np.ones(4, int), np.zeros(4, int)
    assert binary_kappa(ones, ones) == 1.0
    assert binary_kappa(ones, zeros) == 0.0
    assert binary_kappa(np.array([], int), np.array([], int)) is None


def test_point_estimates_come_with_intervals_that_contain_them():
    report = compute_metrics(noisy_dataset(80, seed=1), LABELS, bootstrap=Bootstrap(300, seed=4))
    assert report["bootstrap"]["resamples"] == 300 and report["bootstrap"]["unit"] == "study"
    for name in HEADLINE_METRICS:
        low, high = report["ci95"][name]
        assert low <= report[name] <= high, name
    assert report["ci95"]["fracture_auroc_study"][1] - report["ci95"]["fracture_auroc_study"][0] > 0
    for part in ("ELBOW", "WRIST"):
        block = report["per_part"][part]
        for name in PART_METRICS:
            low, high = block["ci95"][name]
            assert low <= block[name] <= high, (part, name)
    json.dumps(report)  # the CLI prints it as JSON


def test_intervals_are_reproducible_for_a_seed():
    data = noisy_dataset(40, seed=2)
    a = compute_metrics(data, LABELS, bootstrap=Bootstrap(200, seed=1))
    b = compute_metrics(data, LABELS, bootstrap=Bootstrap(200, seed=1))
    c = compute_metrics(data, LABELS, bootstrap=Bootstrap(200, seed=2))
    assert a["ci95"] == b["ci95"]
    assert a["ci95"] != c["ci95"]


def test_intervals_narrow_with_more_studies():
    small = compute_metrics(noisy_dataset(30, seed=3), LABELS, bootstrap=Bootstrap(300))
    large = compute_metrics(noisy_dataset(600, seed=3), LABELS, bootstrap=Bootstrap(300))

    def width(report):
        low, high = report["ci95"]["fracture_auroc_study"]
        return high - low

    assert width(large) < width(small) / 2


def test_bootstrap_resamples_whole_studies():
    # Two studies of ten images: one all right, one all wrong. Resampling studies gives an
    # accuracy of 0, 1/2 or 1, so the interval spans [0, 1]; resampling images would not.
    items = [scored("p1/study1", 0, 0.1, image=k) for k in range(10)]
    items += [scored("p2/study1", 0, 0.1, predicted_part="WRIST", image=k) for k in range(10)]
    report = compute_metrics(items, LABELS, bootstrap=Bootstrap(500))
    assert report["body_part_accuracy"] == 0.5
    assert report["ci95"]["body_part_accuracy"] == [0.0, 1.0]


def test_perfect_separation_has_a_degenerate_interval():
    items = [scored(f"p{i}/s", i % 2, 0.9 if i % 2 else 0.1) for i in range(30)]
    report = compute_metrics(items, LABELS, bootstrap=Bootstrap(200))
    assert report["fracture_auroc_study"] == 1.0
    assert report["ci95"]["fracture_auroc_study"] == [1.0, 1.0]
    assert report["ci95"]["kappa_study"] == [1.0, 1.0]


def test_a_study_scoring_exactly_its_threshold_is_positive():
    items = [scored("p1/s", 1, 0.3, threshold=0.3), scored("p2/s", 0, 0.29, threshold=0.3)]
    report = compute_metrics(items, LABELS, bootstrap=None)
    assert report["sensitivity_study"] == 1.0
    assert report["specificity_study"] == 1.0
    assert "ci95" not in report


def test_refused_and_other_images_stay_out_of_fracture_metrics():
    items = [
        scored("p1/s", 1, 0.9),
        scored("p2/s", 0, 0.2),
        scored("p3/s", 1, None),  # refused by stage 1
        scored("p4/s", 0, None, part="other", predicted_part="other"),
    ]
    report = compute_metrics(items, LABELS, bootstrap=Bootstrap(50))
    assert report["n_rejected"] == 1
    assert report["n_studies"] == 2
    assert report["per_part"]["ELBOW"]["n_images"] == 2
    assert report["body_part_accuracy"] == 1.0


def test_evaluate_bundle_reports_intervals_and_thresholds(tmp_path, tiny_bundle):
    root = tmp_path / "ds" / "train" / "XR_ELBOW"
    for i, (label, level) in enumerate([(1, 0.95), (1, 0.9), (0, 0.6), (0, 0.55), (1, 0.7)]):
        folder = root / f"patient{i + 1}" / f"study1_{'positive' if label else 'negative'}"
        folder.mkdir(parents=True)
        write_png(folder / "image1.png", np.full((20, 20), level, np.float32))
    report = evaluate_bundle(
        load_dataset(tmp_path / "ds"), load_bundle(tiny_bundle), bootstrap=Bootstrap(100)
    )
    assert report["thresholds"]["ELBOW"] == 0.5
    assert report["fracture_auroc_study"] == 1.0
    assert set(report["ci95"]) == set(HEADLINE_METRICS)
    assert set(report["per_part"]["ELBOW"]["ci95"]) == set(PART_METRICS)
