"""``bonewatch evaluate`` and ``bonewatch bundle show`` through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from bonewatch.ingest import write_png
from bonewatch.models.bundle import write_manifest
from bonewatch.models.evaluate import HEADLINE_METRICS, PART_METRICS
from bonewatch.worker.cli import app
from tests.models.conftest import build_tiny_bundle

CONTRACT = {
    "body_part_accuracy",
    "fracture_auroc_image",
    "fracture_auroc_study",
    "kappa_study",
    "sensitivity_study",
    "specificity_study",
    "body_part_confusion",
    "body_part_labels",
    "n_images",
    "n_unreadable",
    "n_rejected",
    "per_part",
    "ci95",
    "bootstrap",
    "thresholds",
}


@pytest.fixture
def cli(tmp_path, tiny_bundle_dir, monkeypatch):
    monkeypatch.setenv("BONEWATCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("BONEWATCH_BUNDLE", str(tiny_bundle_dir))
    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "ds" / "valid" / "XR_ELBOW"
    levels = [(1, 0.95), (1, 0.9), (0, 0.6), (0, 0.55), (1, 0.7), (0, 0.65)]
    for i, (label, level) in enumerate(levels):
        folder = root / f"patient{i + 1}" / f"study1_{'positive' if label else 'negative'}"
        folder.mkdir(parents=True)
        write_png(folder / "image1.png", np.full((24, 24), level, np.float32))
    return tmp_path / "ds"


def test_evaluate_json_keeps_its_contract_and_adds_intervals(cli, dataset, tmp_path):
    result = cli("evaluate", str(dataset), "--format", "json", "--bootstrap", "200")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert CONTRACT <= set(report)
    assert set(report["ci95"]) == set(HEADLINE_METRICS)
    assert report["bootstrap"]["resamples"] == 200
    elbow = report["per_part"]["ELBOW"]
    assert {"auroc_study", "kappa_study", "n_studies", "auroc_image", "ci95"} <= set(elbow)
    assert set(elbow["ci95"]) == set(PART_METRICS)
    assert report["thresholds"]["ELBOW"] == 0.5


def test_evaluate_table_and_report(cli, dataset, tmp_path):
    result = cli("evaluate", str(dataset), "--report", str(tmp_path / "rep"), "--bootstrap", "50")
    assert result.exit_code == 0, result.output
    assert "95 % CI" in result.output and "ELBOW" in result.output
    assert (tmp_path / "rep" / "index.html").is_file()
    assert (tmp_path / "rep" / "roc.png").is_file()


def test_evaluate_refuses_option_mixes(cli, dataset):
    assert cli("evaluate", str(dataset), "--set", "epochs=1").exit_code == 2
    result = cli("evaluate", str(dataset), "--localisation")
    assert result.exit_code == 2 and "fractures.csv" in result.output
    assert cli("evaluate", str(dataset), "--localisation", "--folds", "2").exit_code == 2


def test_evaluate_localisation_on_phantoms(cli, tmp_path):
    from bonewatch.worker.synth import synthesize

    synthesize(tmp_path / "ph", studies=8, fmt="png", seed=4, size=64)
    result = cli("evaluate", str(tmp_path / "ph"), "--localisation", "--format", "json")
    assert result.exit_code == 0, result.output
    loc = json.loads(result.stdout)["localisation"]
    n_boxed = len({line.split(",")[0] for line in (tmp_path / "ph" / "fractures.csv").open()}) - 1
    assert loc["n_images"] == n_boxed > 0
    assert loc["box_enlargement"] == 0.1
    assert 0 <= loc["n_hits"] <= loc["n_images"]


def test_bundle_show_is_a_model_card_with_intervals(cli, tmp_path):
    root = build_tiny_bundle(tmp_path / "card")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest.update(
        trained_on={
            "dataset": "/data/MURA-v1.1",
            "fingerprint": "ab" * 32,
            "n_images": 100,
            "n_studies": 50,
            "n_patients": 40,
            "split": {"train": 70, "validation": 15, "test": 15},
            "split_rule": "by patient, shuffled with the seed",
        },
        command="bonewatch train /data/MURA-v1.1 --out card",
        library_versions={"tensorflow": "2.99.0", "keras": "3.99.0"},
        training={"backbone": "small_cnn", "epochs": 3},
        metrics={
            "split": "held-out test patients",
            "fracture_auroc_study": 0.91,
            "ci95": {"fracture_auroc_study": [0.85, 0.95]},
            "per_part": {
                "ELBOW": {
                    "auroc_study": 0.88,
                    "n_studies": 12,
                    "ci95": {"auroc_study": [0.7, 0.97]},
                }
            },
        },
    )
    write_manifest(root, manifest)
    result = cli("bundle", "show", str(root))
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for expected in (
        "tiny 1",
        "tests only",
        "ab" * 32,
        "bonewatch train /data/MURA-v1.1 --out card",
        "tensorflow 2.99.0",
        "by patient, shuffled with the seed",
        "youden",
        "0.910",
        "0.850–0.950",
        "0.880 (0.700–0.970)",
    ):
        assert expected in text, expected


def test_evaluate_reads_fracture_normal_folders_with_the_part_given(cli, tmp_path):
    root = tmp_path / "seed-layout"
    rng = np.random.default_rng(3)
    for label, level in (("Fracture", 0.95), ("Normal", 0.6)):
        for patient in range(3):
            folder = root / label / f"patient{patient}"
            folder.mkdir(parents=True)
            write_png(
                folder / "a.png", np.full((24, 24), level, np.float32) + rng.random((24, 24)) * 0.01
            )
    result = cli(
        "evaluate", str(root), "--layout", "folders", "--part", "ELBOW", "--format", "json"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n_images"] == 6
    # the tiny bundle scores bright images higher: fractures are perfectly separated
    assert report["per_part"]["ELBOW"]["auroc_image"] == 1.0

    missing = cli("evaluate", str(root), "--layout", "folders", "--format", "json")
    assert missing.exit_code == 2 and "part" in missing.output.lower()
