"""The CLI's output contracts, through typer's runner in-process."""

from __future__ import annotations

import contextlib
import csv
import io
import json

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from bonewatch.ingest import write_png
from bonewatch.worker.cli import app

RESULT_KEYS = {
    "path",
    "status",
    "reason",
    "study_uid",
    "sop_instance_uid",
    "body_part",
    "body_part_confidence",
    "p_fracture",
    "label",
    "bundle",
    "bundle_version",
}


@pytest.fixture
def cli(tmp_path, tiny_bundle_dir, monkeypatch):
    monkeypatch.setenv("BONEWATCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("BONEWATCH_BUNDLE", str(tiny_bundle_dir))
    monkeypatch.setenv("BONEWATCH_PHI_SALT", "cli-test")
    runner = CliRunner()

    def invoke(*args: str):
        result = runner.invoke(app, list(args), catch_exceptions=False)
        return result

    return invoke


def test_synth_process_results_status(cli, tmp_path):
    inbox = tmp_path / "inbox"
    synth = cli("synth", str(inbox), "--studies", "4", "--format", "both", "--seed", "1")
    assert synth.exit_code == 0
    # one image the tiny bundle is sure about, so a study row must exist
    bright = inbox / "train" / "XR_ELBOW" / "patient99999" / "study1_positive" / "image1.png"
    bright.parent.mkdir(parents=True)
    write_png(bright, np.ones((32, 32), np.float32))
    result = cli("process", str(inbox / "train"))
    assert result.exit_code == 0, result.output
    assert "processed" in result.output

    rows = json.loads(cli("results", "--format", "json").stdout)
    n_files = sum(1 for p in inbox.rglob("image*.*"))
    assert len(rows) == n_files
    for row in rows:
        assert RESULT_KEYS <= set(row)
        assert row["label"] in {"positive", "negative", None}

    status = json.loads(cli("status", "--format", "json").stdout)
    counts = status["counts"]
    assert set(counts) >= {"queued", "processing", "done", "failed", "unsupported", "duplicate"}
    assert sum(counts.values()) == status["total"] == n_files
    assert status["lost"] == 0 and status["queues"] is None
    assert status["health"]["double_predictions"] == 0

    table = list(csv.DictReader(io.StringIO(cli("results", "--format", "csv").stdout)))
    assert len(table) == n_files

    done = json.loads(cli("results", "--status", "done", "--format", "json").stdout)
    assert all(r["status"] == "done" for r in done)
    studies = json.loads(cli("results", "--level", "study", "--format", "json").stdout)
    assert {s["study_uid"] for s in studies} == {r["study_uid"] for r in done}
    assert "XR_ELBOW/patient99999/study1_positive" in {s["study_uid"] for s in studies}
    assert all(s["mean_p_fracture"] is not None for s in studies)


def test_process_missing_path_is_a_clear_error(cli, tmp_path):
    result = cli("process", str(tmp_path / "nope"))
    assert result.exit_code == 2
    assert "no such file or folder" in result.output


def test_bundle_show_prints_the_model_card(cli, tiny_bundle_dir):
    result = cli("bundle", "show", str(tiny_bundle_dir))
    assert result.exit_code == 0 and "tests only" in result.output
    data = json.loads(cli("bundle", "show", str(tiny_bundle_dir), "--format", "json").stdout)
    assert data["fracture"]["WRIST"]["threshold"] == 0.5


def test_db_upgrade(cli):
    result = cli("db", "upgrade")
    assert result.exit_code == 0 and "revision" in result.output


def test_study_level_refuses_image_filters(cli):
    result = cli("results", "--level", "study", "--status", "done")
    assert result.exit_code == 2
    assert "--status" in result.output


def test_names_cannot_forge_table_rows_or_spreadsheet_formulas(tmp_path, monkeypatch):
    from bonewatch.worker.cli._common import OutputFormat, render

    rows = [{"path": '=HYPERLINK("http://x")\n| forged | row |\x1b[31m', "status": "done"}]
    with contextlib.redirect_stdout(io.StringIO()) as buf:
        render(rows, ["path", "status"], OutputFormat.csv)
    assert buf.getvalue().splitlines()[1].startswith("\"'=HYPERLINK")
    console = Console(file=io.StringIO(), width=200, force_terminal=True)
    monkeypatch.setattr("bonewatch.worker.cli._common.out", console)
    render(
        rows + [{"path": "[bold]x[/bold]", "status": "done"}],
        ["path", "status"],
        OutputFormat.table,
    )
    shown = console.file.getvalue()
    assert "\x1b[31m" not in shown and "\\x1b[31m" in shown and "\\n" in shown
    assert "[bold]x[/bold]" in shown  # Rich markup in a name is shown, not applied
