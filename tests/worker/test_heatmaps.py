"""BONEWATCH_HEATMAPS: the worker stores a Grad-CAM PNG for every positive image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from bonewatch.db import query_results
from bonewatch.ingest import write_png
from bonewatch.worker.cli import app
from bonewatch.worker.runner import open_ledger, process_paths
from bonewatch.worker.settings import Settings
from tests.models.tiny_conv import build_spot_bundle, spot_image


@pytest.fixture(scope="module")
def spot_bundle_dir(tmp_path_factory):
    return build_spot_bundle(tmp_path_factory.mktemp("heatmaps") / "spot")


def _inbox(root: Path) -> tuple[Path, Path]:
    """One image the spot bundle calls positive and one it calls negative."""
    positive = root / "positive.png"
    negative = root / "negative.png"
    root.mkdir(parents=True)
    write_png(positive, spot_image((64, 64), (40, 20), radius=5))
    write_png(negative, np.full((64, 64), 0.7, np.float32))
    return positive, negative


def test_settings_read_the_heatmap_switch(tmp_path, monkeypatch):
    monkeypatch.setenv("BONEWATCH_DATA_DIR", str(tmp_path / "d"))
    assert Settings().heatmaps is False
    monkeypatch.setenv("BONEWATCH_HEATMAPS", "1")
    settings = Settings()
    assert settings.heatmaps is True
    assert settings.resolved_heatmap_dir == tmp_path / "d" / "heatmaps"
    monkeypatch.setenv("BONEWATCH_HEATMAP_DIR", str(tmp_path / "elsewhere"))
    assert Settings().resolved_heatmap_dir == tmp_path / "elsewhere"


def test_positive_images_get_a_heatmap_and_negatives_do_not(tmp_path, spot_bundle_dir):
    positive, negative = _inbox(tmp_path / "inbox")
    settings = Settings(
        data_dir=tmp_path / "data", bundle=spot_bundle_dir, phi_salt="s", heatmaps=True
    )
    process_paths([tmp_path / "inbox"], settings)
    rows = {Path(r["path"]).name: r for r in query_results(open_ledger(settings))}
    assert rows["positive.png"]["label"] == "positive"
    assert rows["negative.png"]["label"] == "negative"
    assert rows["negative.png"]["heatmap_path"] is None
    heatmap = Path(rows["positive.png"]["heatmap_path"])
    assert heatmap.is_absolute() and heatmap.is_relative_to(tmp_path / "data" / "heatmaps")
    with Image.open(heatmap) as png:
        assert png.mode == "RGB" and png.size == (64, 64)
        rgb = np.asarray(png).astype(int)
    assert (rgb.max(axis=2) - rgb.min(axis=2)).max() > 40  # the map is blended in colour
    # The white ring marks the peak, which is the spot (centre x 40, y 20).
    ys, xs = np.nonzero((rgb == 255).all(axis=2))
    assert len(xs) and abs(xs.mean() - 40) <= 4 and abs(ys.mean() - 20) <= 4
    assert not list(heatmap.parent.glob(".*.tmp"))


def test_without_the_switch_no_heatmaps_are_made(tmp_path, spot_bundle_dir):
    _inbox(tmp_path / "inbox")
    settings = Settings(data_dir=tmp_path / "data", bundle=spot_bundle_dir, phi_salt="s")
    process_paths([tmp_path / "inbox"], settings)
    assert all(r["heatmap_path"] is None for r in query_results(open_ledger(settings)))
    assert not (tmp_path / "data" / "heatmaps").exists()


def test_a_failing_heatmap_costs_only_the_heatmap(tmp_path, spot_bundle_dir, monkeypatch):
    from bonewatch.models import gradcam

    def broken(*args, **kwargs):
        raise RuntimeError("no gradients today")

    monkeypatch.setattr(gradcam, "explain_images", broken)
    _inbox(tmp_path / "inbox")
    settings = Settings(
        data_dir=tmp_path / "data", bundle=spot_bundle_dir, phi_salt="s", heatmaps=True
    )
    process_paths([tmp_path / "inbox"], settings)
    rows = query_results(open_ledger(settings))
    assert {r["status"] for r in rows} == {"done"}
    assert all(r["heatmap_path"] is None for r in rows)


def test_results_show_the_heatmap_path(tmp_path, spot_bundle_dir, monkeypatch):
    _inbox(tmp_path / "inbox")
    monkeypatch.setenv("BONEWATCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("BONEWATCH_BUNDLE", str(spot_bundle_dir))
    monkeypatch.setenv("BONEWATCH_PHI_SALT", "s")
    monkeypatch.setenv("BONEWATCH_HEATMAPS", "1")
    runner = CliRunner()
    assert runner.invoke(app, ["process", str(tmp_path / "inbox")]).exit_code == 0
    rows = json.loads(runner.invoke(app, ["results", "--format", "json"]).stdout)
    paths = [r["heatmap_path"] for r in rows if r["label"] == "positive"]
    assert len(paths) == 1 and Path(paths[0]).is_file()
    csv_text = runner.invoke(app, ["results", "--format", "csv"]).stdout
    assert "heatmap_path" in csv_text.splitlines()[0] and paths[0] in csv_text
