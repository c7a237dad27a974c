"""``bonewatch explain``: the heatmap PNG and the JSON contract."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from bonewatch.ingest import make_uid, write_dicom, write_png
from bonewatch.worker.cli import app
from tests.models.tiny_conv import build_spot_bundle, spot_image


@pytest.fixture(scope="module")
def spot_bundle_dir(tmp_path_factory):
    return build_spot_bundle(tmp_path_factory.mktemp("explain") / "spot")


@pytest.fixture
def explain(tmp_path, spot_bundle_dir, monkeypatch):
    monkeypatch.setenv("BONEWATCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("BONEWATCH_BUNDLE", str(spot_bundle_dir))
    monkeypatch.setenv("BONEWATCH_PHI_SALT", "explain-test")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, ["explain", *args], catch_exceptions=False)

    return invoke


def test_json_contract_and_peak_in_original_pixels(explain, tmp_path):
    path = tmp_path / "wrist.png"
    write_png(path, spot_image((120, 96), (60, 30), radius=8))  # tall: padded left and right
    result = explain(str(path), "--out", str(tmp_path / "heat.png"), "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"heatmap", "peak_xy", "p_fracture"}
    assert data["heatmap"] == str(tmp_path / "heat.png")
    x, y = data["peak_xy"]
    assert isinstance(x, int) and isinstance(y, int)
    assert abs(x - 60) <= 8 and abs(y - 30) <= 8
    assert data["p_fracture"] == pytest.approx(1 / (1 + np.exp(-3.0)), abs=0.02)
    with Image.open(tmp_path / "heat.png") as png:
        assert png.mode == "RGB" and png.size == (96, 120)  # the original's size, not the model's


def test_dicom_input_and_default_output_name(explain, tmp_path):
    path = tmp_path / "elbow.dcm"
    write_dicom(
        path,
        spot_image((80, 96), (20, 40), radius=6),
        photometric="MONOCHROME1",
        bits_stored=12,
        study_uid=make_uid("explain", "study"),
        series_uid=make_uid("explain", "series"),
        sop_uid=make_uid("explain", "sop"),
    )
    result = explain(str(path))
    assert result.exit_code == 0, result.output
    assert "ELBOW fracture model" in result.output
    assert (tmp_path / "elbow-gradcam.png").is_file()
    data = json.loads(explain(str(path), "--format", "json").stdout)
    x, y = data["peak_xy"]
    assert abs(x - 20) <= 6 and abs(y - 40) <= 6


def test_an_image_stage_one_refuses_needs_a_part(explain, tmp_path):
    path = tmp_path / "dark.png"
    write_png(path, np.full((32, 32), 0.1, np.float32))
    refused = explain(str(path), "--format", "json")
    assert refused.exit_code == 1
    assert "none of the seven upper-limb parts" in refused.output and "--part" in refused.output
    forced = explain(str(path), "--part", "hand", "--format", "json")
    assert forced.exit_code == 0, forced.output
    assert json.loads(forced.stdout)["p_fracture"] < 0.5


def test_bad_files_and_parts_are_clear_errors(explain, tmp_path):
    assert explain(str(tmp_path / "missing.png")).exit_code == 2
    junk = tmp_path / "notes.png"
    junk.write_text("not an image")
    result = explain(str(junk))
    assert result.exit_code == 1 and "error" in result.output
    path = tmp_path / "ok.png"
    write_png(path, spot_image((32, 32), (10, 10), radius=3))
    result = explain(str(path), "--part", "KNEE")
    assert result.exit_code == 1 and "no fracture model for KNEE" in result.output


def _yellow_pixels(png: Path, rows: int) -> int:
    with Image.open(png) as picture:
        band = np.asarray(picture.convert("RGB"))[-rows:].astype(int)
    return int(((band[..., 0] > 200) & (band[..., 1] > 170) & (band[..., 2] < 80)).sum())


def test_the_heatmap_carries_the_bundle_the_score_and_any_clinical_notice(
    explain, tmp_path, spot_bundle_dir, monkeypatch
):
    path = tmp_path / "wrist.png"
    write_png(path, spot_image((400, 400), (200, 300), radius=12))
    assert explain(str(path), "--out", str(tmp_path / "plain.png")).exit_code == 0
    with Image.open(tmp_path / "plain.png") as picture:
        bottom = np.asarray(picture.convert("RGB"))[-40:].astype(int)
    assert (bottom.min(axis=-1) > 200).sum() > 20  # the caption text, in its band
    assert _yellow_pixels(tmp_path / "plain.png", 60) == 0  # "tests only" makes no claim

    demo = tmp_path / "demo-like"
    shutil.copytree(spot_bundle_dir, demo)
    manifest = json.loads((demo / "manifest.json").read_text())
    manifest["intended_use"] = "Demonstration on phantoms. Not for clinical use."
    (demo / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("BONEWATCH_BUNDLE", str(demo))
    result = explain(str(path), "--out", str(tmp_path / "demo.png"))
    assert result.exit_code == 0
    assert "not for clinical use" in result.output
    assert _yellow_pixels(tmp_path / "demo.png", 60) > 50
    with Image.open(tmp_path / "demo.png") as picture:
        assert picture.size == (400, 400)  # burned in, not added around
