"""`bonewatch listen` and `bonewatch echo` as a new user meets them: help that fits 80 columns,
one-line errors; and study completeness for files that came through `process`."""

from __future__ import annotations

import socket

import pytest
from typer.testing import CliRunner

from bonewatch.db import make_engine, query_arrivals
from bonewatch.worker.cli import app
from bonewatch.worker.runner import process_paths
from tests.worker.dicom_net import phantom_instances


@pytest.mark.parametrize("command", ["listen", "echo"])
def test_help_fits_80_columns(command):
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0
    assert max(len(line) for line in result.output.splitlines()) <= 80, result.output


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["listen", "--ae-title", "A" * 17], "--ae-title"),
        (["listen", "--ae-title", "BAD\\AE"], "no backslash"),
        (["listen", "--port", "70000"], "--port"),
        (["echo", "PACS@host"], "is not AET@HOST:PORT"),
        (["echo", "PACS@host:0"], "is not AET@HOST:PORT"),
    ],
)
def test_usage_errors_are_one_line(argv, message, tmp_path):
    result = CliRunner().invoke(app, argv, env={"BONEWATCH_DATA_DIR": str(tmp_path)})
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


def test_tls_options_must_come_together(tmp_path):
    pem = tmp_path / "x.pem"
    pem.write_text("x")
    for argv, message in [
        (["--tls-key", str(pem)], "--tls-cert and --tls-key go together"),
        (["--tls-ca", str(pem)], "--tls-ca needs --tls-cert"),
    ]:
        result = CliRunner().invoke(app, ["listen", *argv])
        assert result.exit_code == 2 and message in result.output


def test_a_bad_peer_list_is_named(tmp_path, settings):
    env = {
        "BONEWATCH_DATA_DIR": str(tmp_path),
        "BONEWATCH_DICOM_PEERS": "CT1@",
        "BONEWATCH_BUNDLE": str(settings.bundle),
    }
    result = CliRunner().invoke(app, ["listen", "--no-process", "--port", "0"], env=env)
    assert result.exit_code == 2
    assert "BONEWATCH_DICOM_PEERS" in result.output


def test_echo_to_a_closed_port_says_so_in_one_line():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        result = CliRunner().invoke(app, ["echo", f"PACS@127.0.0.1:{port}", "--timeout", "2"])
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert text.startswith("error: C-ECHO PACS@127.0.0.1") and "Connection refused" in text


def test_process_marks_studies_complete_by_registration_times(settings, tmp_path):
    files = phantom_instances(tmp_path / "inbox", 4, studies=2, tag="proc")
    process_paths([tmp_path / "inbox"], settings.replace(study_stable_seconds=0))
    engine = make_engine(settings.resolved_database_url)
    try:
        arrivals = query_arrivals(engine)
    finally:
        engine.dispose()
    assert len(arrivals) == 2 and sum(a["n_received"] for a in arrivals) == len(files)
    assert all(a["stable_at"] == a["last_received_at"] for a in arrivals)
