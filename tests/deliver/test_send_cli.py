"""`bonewatch send` as a user meets it: help in 80 columns, one-line usage errors, and
`--out`, whose files dciodvfy (Debian package dicom3tools) finds no error in."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from typer.testing import CliRunner

from bonewatch.worker.cli import app
from tests.conftest import _unavailable
from tests.deliver.pacs import base_env, run, synth


def test_help_fits_80_columns():
    result = CliRunner().invoke(app, ["send", "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0
    assert max(len(line) for line in result.output.splitlines()) <= 80, result.output
    assert "--all-images" in result.output and "<bool>" not in result.output


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["send", "--to", "PACS@host"], "is not AET@host:port"),
        (["send", "--to", "PACS@host:70000"], "is not AET@host:port"),
        (["send"], "no destination"),
    ],
)
def test_usage_errors_are_one_line(argv, message, tmp_path):
    env = {"BONEWATCH_DATA_DIR": str(tmp_path), "BONEWATCH_DICOM_DESTINATIONS": ""}
    result = CliRunner().invoke(app, argv, env=env)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert result.output.startswith("error: "), result.output


@pytest.mark.slow
def test_out_writes_objects_that_dciodvfy_finds_no_error_in(tmp_path: Path) -> None:
    if shutil.which("dciodvfy") is None:
        _unavailable("dciodvfy is missing: install the Debian package dicom3tools")
    env = base_env(tmp_path / "data", study_stable_seconds="0")
    sources = synth(tmp_path / "in", 2, env, seed=2)
    assert run(["process", str(tmp_path / "in")], env).returncode == 0
    out = tmp_path / "out"
    result = run(["send", "--out", str(out), "--all-images"], env)
    assert result.returncode == 0, result.stdout + result.stderr
    files = sorted(out.rglob("*.dcm"))
    kinds = {p.name.split("-")[0] for p in files}
    assert kinds == {"sr", "sc"}, files
    for path in files:
        check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
        report = check.stdout + check.stderr
        assert "Error" not in report, f"{path.name}\n{report}"
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == path.parent.name
        assert ds.StudyInstanceUID in {str(s.StudyInstanceUID) for s in sources.values()}
    assert result.stdout.startswith(f"{len(files)} object(s) written")
    # nothing was sent or enqueued
    assert "sent 0" not in result.stdout
