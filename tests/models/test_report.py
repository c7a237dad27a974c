"""The HTML evaluation report and its plots."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bonewatch.ingest import write_png
from bonewatch.models.evaluate import Bootstrap, compute_metrics
from bonewatch.models.report import confident_errors, manifest_history, write_report
from tests.models.conftest import LABELS
from tests.models.test_evaluate import scored


@pytest.fixture
def predictions(tmp_path):
    """Twelve one-image studies on disk, two parts, with two study errors of each kind."""
    rng = np.random.default_rng(0)
    cases = [
        # (part, label, p): errors are the negatives above 0.5 and positives below it
        ("ELBOW", 1, 0.9),
        ("ELBOW", 1, 0.8),
        ("ELBOW", 1, 0.3),  # false negative
        ("ELBOW", 0, 0.2),
        ("ELBOW", 0, 0.95),  # false positive, the most confident
        ("ELBOW", 0, 0.1),
        ("WRIST", 1, 0.7),
        ("WRIST", 1, 0.05),  # false negative, the most confident
        ("WRIST", 1, 0.6),
        ("WRIST", 0, 0.4),
        ("WRIST", 0, 0.55),  # false positive
        ("WRIST", 0, 0.3),
    ]
    items = []
    for i, (part, label, p) in enumerate(cases):
        study = tmp_path / f"XR_{part}/patient{i}/study1_{'positive' if label else 'negative'}"
        study.mkdir(parents=True)
        item = scored(str(study), label, p, part=part)
        write_png(item.sample.path, rng.random((40, 30)).astype(np.float32))
        items.append(item)
    return items


def test_confident_errors_are_study_errors_ranked_by_margin(predictions):
    fp, fn = confident_errors(predictions, 5)
    assert [round(e.study.score, 2) for e in fp] == [0.95, 0.55]
    assert [round(e.study.score, 2) for e in fn] == [0.05, 0.3]
    assert all(e.image.sample.study == e.study.study for e in fp + fn)
    assert len(confident_errors(predictions, 1)[0]) == 1


def test_report_writes_html_and_readable_plots(tmp_path, predictions):
    metrics = compute_metrics(predictions, LABELS, bootstrap=Bootstrap(100))
    histories = {
        "fold 1": {
            "body_part": {"loss": [1.0, 0.5], "val_loss": [1.1, 0.7], "val_accuracy": [0.5, 0.8]}
        },
        "fold 2": {"body_part": {"loss": [0.9, 0.4], "val_loss": [1.0, 0.6]}},
    }
    index = write_report(
        tmp_path / "report", metrics, predictions, title="test <report>", histories=histories
    )
    page = index.read_text()
    assert "test &lt;report&gt;" in page
    for name in ("roc.png", "confusion.png", "training.png", "errors.png"):
        assert f'src="{name}"' in page
        with Image.open(tmp_path / "report" / name) as png:
            assert png.format == "PNG" and png.width > 400 and png.height > 300
    assert "0.950" in page and "0.050" in page  # the error listing
    ci = metrics["ci95"]["fracture_auroc_study"]
    assert f"({ci[0]:.3f}–{ci[1]:.3f})" in page


def test_report_without_training_curves_says_so(tmp_path, predictions):
    metrics = compute_metrics(predictions, LABELS, bootstrap=None)
    index = write_report(tmp_path / "r", metrics, predictions, title="t")
    assert not (tmp_path / "r" / "training.png").exists()
    assert "records no training curves" in index.read_text()


def test_manifest_history_reads_the_recorded_curves(tiny_bundle):
    from bonewatch.models.bundle import Manifest, read_manifest

    manifest = read_manifest(tiny_bundle)
    assert manifest_history(manifest) is None
    data = manifest.model_dump()
    data["history"] = {"body_part": {"loss": [1.0, 0.5]}, "notes": "x", "ELBOW": {"lr": "0.1"}}
    assert manifest_history(Manifest.model_validate(data)) == {"body_part": {"loss": [1.0, 0.5]}}
