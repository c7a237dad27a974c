"""The shipped demo bundle on phantoms from a seed it never saw."""

from __future__ import annotations

import pytest

from bonewatch.models.bundle import load_bundle
from bonewatch.models.datasets import load_dataset
from bonewatch.models.evaluate import evaluate_bundle
from bonewatch.worker.settings import DEMO_BUNDLE

UNSEEN_SEED = 424242


@pytest.mark.slow
def test_demo_bundle_meets_its_accuracy_targets(tmp_path):
    from bonewatch.worker.synth import synthesize

    synthesize(tmp_path / "heldout", studies=240, fmt="both", seed=UNSEEN_SEED)
    bundle = load_bundle(DEMO_BUNDLE)
    report = evaluate_bundle(load_dataset(tmp_path / "heldout"), bundle)
    assert report["n_unreadable"] == 0
    assert report["body_part_accuracy"] >= 0.95
    assert report["fracture_auroc_study"] >= 0.90
