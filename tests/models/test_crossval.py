"""k-fold cross-validation: the fold recipe, the summary over folds, and one real run."""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from bonewatch.models.crossval import fold_config, parse_overrides, summarise_folds
from bonewatch.models.evaluate import HEADLINE_METRICS
from bonewatch.models.train import TrainConfig


def test_fold_recipe_moves_the_test_share_to_training():
    recorded = {"epochs": 15, "fractions": [0.7, 0.15, 0.15], "seed": 3, "unknown_key": 1}
    config = fold_config(recorded, {"epochs": 2})
    assert config.epochs == 2
    assert config.seed == 3
    assert config.fractions == pytest.approx((0.85, 0.15, 0.0))
    assert fold_config({}).fractions == pytest.approx((0.85, 0.15, 0.0))


def test_overrides_parse_values_and_refuse_unknown_keys():
    assert parse_overrides(["epochs=3", "augment=full", "learning_rate=1e-3"]) == {
        "epochs": 3,
        "augment": "full",
        "learning_rate": 0.001,
    }
    with pytest.raises(ValueError, match="unknown training setting"):
        parse_overrides(["epoch=3"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["epochs"])
    assert set(parse_overrides([])) <= {f for f in TrainConfig.__dataclass_fields__}


def test_summary_is_the_mean_and_a_t_interval_over_folds():
    folds = [
        {"fracture_auroc_study": 0.8, "kappa_study": -0.2, "body_part_accuracy": None},
        {"fracture_auroc_study": 0.9, "kappa_study": 0.0, "body_part_accuracy": None},
        {"fracture_auroc_study": 1.0, "kappa_study": 0.2, "body_part_accuracy": 0.5},
    ]
    mean, ci95 = summarise_folds(folds)
    assert set(mean) == set(ci95) == set(HEADLINE_METRICS)
    # sd 0.1 over 3 folds: half width t(0.975, 2) * 0.1 / sqrt(3) = 4.3027 * 0.0577 = 0.2484
    assert mean["fracture_auroc_study"] == pytest.approx(0.9)
    assert ci95["fracture_auroc_study"] == pytest.approx([0.6516, 1.0], abs=1e-4)  # clipped at 1
    # kappa may go below zero: sd 0.2, half width 0.4969
    assert ci95["kappa_study"] == pytest.approx([-0.4969, 0.4969], abs=1e-4)
    # one fold only: a mean but no interval; no fold at all: neither
    assert mean["body_part_accuracy"] == 0.5 and ci95["body_part_accuracy"] is None
    assert mean["sensitivity_study"] is None and ci95["sensitivity_study"] is None


@pytest.mark.slow
def test_evaluate_folds_trains_per_fold_and_keeps_the_json_contract(tmp_path, monkeypatch):
    from bonewatch.models.bundle import read_manifest, write_manifest
    from bonewatch.models.datasets import load_dataset
    from bonewatch.worker.cli import app
    from bonewatch.worker.synth import synthesize
    from tests.models.conftest import build_tiny_bundle

    synthesize(tmp_path / "ph", studies=40, fmt="png", seed=21, size=64)
    samples = load_dataset(tmp_path / "ph")
    # The folds need only the bundle's recorded recipe, so a hand-wired bundle carries one.
    recipe = TrainConfig(input_size=32, epochs=1, fracture_epochs=1, part_epochs=1, width=4)
    build_tiny_bundle(tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    write_manifest(tmp_path / "b", {**manifest, "training": dataclasses.asdict(recipe)})
    monkeypatch.setenv("BONEWATCH_DATA_DIR", str(tmp_path / "data"))
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(tmp_path / "ph"),
            "--bundle",
            str(tmp_path / "b"),
            "--folds",
            "2",
            "--bootstrap",
            "50",
            "--set",
            "fracture_epochs=2",
            "--report",
            str(tmp_path / "report"),
            "--format",
            "json",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["k"] == 2 and len(report["folds"]) == 2
    assert report["training"]["fracture_epochs"] == 2
    assert report["training"]["input_size"] == 32  # from the bundle's recorded recipe
    assert set(report["mean"]) == set(report["ci95"]) == set(HEADLINE_METRICS)
    assert sum(f["n_images"] for f in report["folds"]) == len(samples)
    assert report["pooled"]["n_images"] == len(samples)
    for fold in report["folds"]:
        assert {"fold", "n_train_images", "n_test_patients", "ci95", "per_part"} <= set(fold)
        assert fold["n_train_images"] + fold["n_images"] == len(samples)
    assert (tmp_path / "report" / "training.png").is_file()
    assert "2-fold cross-validation" in (tmp_path / "report" / "index.html").read_text()
    assert read_manifest(tmp_path / "b").name == "tiny"  # the given bundle is left as it was
