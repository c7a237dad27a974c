"""The first hour with bonewatch: what a new user sees at the terminal.

Every check runs the real ``bonewatch`` command in a subprocess, at a fixed terminal width."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bonewatch.ingest import write_png
from bonewatch.worker.cli import COMMANDS


def bonewatch(*args: str, cwd: Path, columns: int = 80, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BONEWATCH_")}
    environ.update({"COLUMNS": str(columns), "BONEWATCH_PHI_SALT": "first-hour", **env})
    return subprocess.run(
        [sys.executable, "-m", "bonewatch", *args],
        cwd=cwd, env=environ, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def processed(tmp_path_factory, tiny_bundle_dir_module) -> tuple[Path, dict[str, str]]:
    """A folder with long paths, processed once with the tiny bundle; the env that reads it."""
    root = tmp_path_factory.mktemp("first-hour")
    deep = root / "exports" / "hospital-archive-2026" / "department-of-radiology" / "XR_WRIST"
    deep.mkdir(parents=True)
    rng = np.random.default_rng(7)
    for i in range(4):
        write_png(deep / f"image-{i:02d}.png", (0.6 + 0.4 * rng.random((64, 64))).astype("f4"))
    env = {
        "BONEWATCH_DATA_DIR": str(root / "data"),
        "BONEWATCH_BUNDLE": str(tiny_bundle_dir_module),
    }
    done = bonewatch("process", str(root / "exports"), cwd=root, **env)
    assert done.returncode == 0, done.stderr
    return root, env


@pytest.fixture(scope="module")
def tiny_bundle_dir_module(tmp_path_factory):
    from tests.models.conftest import build_tiny_bundle

    return build_tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny")


@pytest.mark.parametrize("columns", [80, 120])
def test_results_fit_the_terminal_with_status_part_score_and_label(processed, columns):
    root, env = processed
    run = bonewatch("results", cwd=root, columns=columns, **env)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert max(len(line) for line in lines) <= columns
    header = next(line for line in lines if "status" in line)
    for name in ("path", "status", "part", "p(fx)", "label"):
        assert name in header, header
    rows = [line for line in lines if "image-0" in line]
    assert len(rows) == 4
    for row in rows:
        assert "done" in row and "ELBOW" in row and ("positive" in row or "negative" in row)
        assert "…" in row  # the long path is cut from the left, its file name kept


def test_wide_and_chosen_columns(processed):
    root, env = processed
    wide = bonewatch("results", "--wide", cwd=root, columns=80, **env)
    assert "department-of-radiology" in wide.stdout.replace("\n", "")
    chosen = bonewatch("results", "--columns", "id,status", cwd=root, **env)
    header = next(line for line in chosen.stdout.splitlines() if "status" in line)
    assert "id" in header and "path" not in header


def test_results_by_id_path_and_limit(processed):
    root, env = processed
    rows = json.loads(bonewatch("results", "--format", "json", cwd=root, **env).stdout)
    first = rows[0]["id"]
    one = json.loads(
        bonewatch("results", "--id", str(first), "--format", "json", cwd=root, **env).stdout
    )
    assert [r["id"] for r in one] == [first]
    globbed = bonewatch("results", "--path", "*image-0[13]*", "--format", "json", cwd=root, **env)
    assert json.loads(globbed.stdout) == []  # a glob, not a regex: [13] is literal here
    matched = bonewatch("results", "--path", "*/image-01.png", "--format", "json", cwd=root, **env)
    assert [Path(r["path"]).name for r in json.loads(matched.stdout)] == ["image-01.png"]
    limited = bonewatch("results", "--limit", "2", "--format", "json", cwd=root, **env)
    assert len(json.loads(limited.stdout)) == 2


def test_the_study_csv_carries_the_bundle_like_the_json(processed):
    root, env = processed
    text = bonewatch("results", "--level", "study", "--format", "csv", cwd=root, **env).stdout
    row = list(csv.DictReader(io.StringIO(text)))[0]
    as_json = json.loads(
        bonewatch("results", "--level", "study", "--format", "json", cwd=root, **env).stdout
    )[0]
    assert set(row) == set(as_json)
    assert row["bundle"] == "tiny" and row["bundle_version"] == as_json["bundle_version"]


@pytest.mark.parametrize(
    "args",
    [
        ["--status", "bogus"],
        ["--label", "maybe"],
        ["--min-p", "2"],
        ["--since", "yesterday"],
        ["--max-p", "-0.1"],
    ],
)
def test_bad_filter_values_are_usage_errors(processed, args):
    root, env = processed
    run = bonewatch("results", *args, cwd=root, **env)
    assert run.returncode == 2, run.stdout
    assert args[0] in run.stderr


def test_since_names_its_formats_and_time_zone(processed):
    root, env = processed
    text = bonewatch("results", "--help", cwd=root).stdout
    assert "UTC" in text and "2026-12-03" in text
    run = bonewatch("results", "--since", "2000-01-01", "--format", "json", cwd=root, **env)
    assert len(json.loads(run.stdout)) == 4


def test_verbose_works_after_the_subcommand(processed):
    root, env = processed
    bad = {**env, "BONEWATCH_DATABASE_URL": "not-a-url"}
    after = bonewatch("status", "-v", cwd=root, **bad)
    assert after.returncode == 1 and "Traceback" in after.stderr


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["status"], {"BONEWATCH_DATABASE_URL": "not-a-url"}, "is not a database URL"),
        (
            ["status"],
            {"BONEWATCH_DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:1/none"},
            "cannot reach the ledger at postgresql+psycopg://postgres@127.0.0.1:1/none",
        ),
        (["process", "IN"], {"BONEWATCH_DATA_DIR": "/proc/no/such"}, "/proc/no"),
        (["process", "IN"], {"BONEWATCH_BUNDLE": "/no/such/bundle"}, "is not a bundle"),
        (["watch", "IN"], {"BONEWATCH_BUNDLE": "/no/such/bundle"}, "is not a bundle"),
        (["synth", "/proc/no/such"], {}, "/proc/no"),
    ],
)
def test_a_system_fault_is_one_line_and_exit_1(tmp_path, args, env, expected):
    inbox = tmp_path / "in"
    inbox.mkdir()
    args = [str(inbox) if a == "IN" else a for a in args]
    run = bonewatch(*args, cwd=tmp_path, **{"BONEWATCH_DATA_DIR": str(tmp_path / "d"), **env})
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, run.stderr
    assert expected in " ".join(run.stderr.split()), run.stderr


@pytest.mark.parametrize("command", ["status", "results"])
def test_read_only_commands_create_no_ledger(tmp_path, command):
    run = bonewatch(command, cwd=tmp_path)
    assert run.returncode == 1
    assert "no ledger at" in run.stderr and "bonewatch-data" in run.stderr
    assert list(tmp_path.iterdir()) == []


def test_results_read_a_ledger_that_cannot_be_written(processed, tmp_path):
    root, env = processed
    ledger = Path(env["BONEWATCH_DATA_DIR"]) / "bonewatch.sqlite"
    made_immutable = subprocess.run(["chattr", "+i", str(ledger)], capture_output=True)
    if made_immutable.returncode != 0:
        pytest.skip("chattr +i is not allowed here (needs CAP_LINUX_IMMUTABLE)")
    try:
        run = bonewatch("results", "--format", "json", cwd=root, **env)
    finally:
        subprocess.run(["chattr", "-i", str(ledger)], check=True)
    assert run.returncode == 0, run.stderr
    assert len(json.loads(run.stdout)) == 4


def test_serving_the_demo_bundle_says_so(processed, tmp_path):
    inbox = tmp_path / "in"
    inbox.mkdir()
    run = bonewatch("process", str(inbox), cwd=tmp_path, BONEWATCH_DATA_DIR=str(tmp_path / "d"))
    assert run.returncode == 0, run.stderr
    assert "demo-phantom" in run.stderr and "not for clinical use" in run.stderr
    root, env = processed
    quiet = bonewatch("results", cwd=root, **env)  # the tiny bundle claims no such thing
    assert "not for clinical use" not in quiet.stderr


def test_help_fits_80_columns_and_flags_take_no_value(tmp_path):
    from bonewatch.worker.cli import app

    prefix = {id(g.typer_instance): [g.name] for g in app.registered_groups}
    names = [[]] + [
        [*prefix.get(id(group), []), name or command.__name__.replace("_", "-")]
        for group, name, command in COMMANDS
    ]
    for words in names:
        text = bonewatch(*words, "--help", cwd=tmp_path).stdout
        assert text, words
        assert max(len(line) for line in text.splitlines()) <= 80, words
        assert "<bool>" not in text, words
        if "Commands:" in text:  # no summary cut short
            assert "..." not in text.split("Commands:")[1], words


def test_a_misspelled_setting_is_named_with_the_nearest_real_one(processed):
    root, env = processed
    run = bonewatch("status", cwd=root, BONEWATCH_BATCHSIZE="3", BONEWATCH_ZZZ="1", **env)
    assert run.returncode == 0, run.stderr
    text = " ".join(run.stderr.split())
    assert (
        "BONEWATCH_BATCHSIZE is not a bonewatch setting; did you mean BONEWATCH_BATCH_SIZE?" in text
    )
    assert "BONEWATCH_ZZZ is not a bonewatch setting" in text
