"""What the ledger and the data directory reveal: paths, the patient key, file modes, and which
bundle is allowed to serve."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bonewatch.db import query_results
from bonewatch.ingest import write_png
from bonewatch.models.bundle import BundleError, bundle_digest, load_bundle
from bonewatch.worker.pipeline import serving_bundle
from bonewatch.worker.runner import open_ledger, process_paths


def _patient_folder(root: Path) -> Path:
    """An export whose folder names a patient, as many PACS exports do."""
    folder = root / "exports" / "DOE_JANE_19450317"
    (folder / "series1").mkdir(parents=True)
    for i in range(3):
        write_png(folder / "series1" / f"im{i}.png", np.full((64, 64), 0.7 + i / 10, np.float32))
    return folder


def test_paths_are_stored_relative_to_the_root_when_asked(tmp_path, settings):
    folder = _patient_folder(tmp_path)
    relative = settings.replace(store_relative_paths=True, path_root=folder)

    registered, drained = process_paths([folder], relative)

    assert registered.new == 3 and drained.finished == 3
    rows = query_results(open_ledger(relative))
    assert sorted(r["path"] for r in rows) == [f"series1/im{i}.png" for i in range(3)]
    assert {r["status"] for r in rows} == {"done"}  # found again through the root
    dump = "\n".join(sqlite3.connect(relative.data_dir / "bonewatch.sqlite").iterdump())
    assert "DOE_JANE" not in dump


def test_by_default_paths_are_stored_whole(tmp_path, settings):
    folder = _patient_folder(tmp_path)
    process_paths([folder], settings)
    assert all("DOE_JANE_19450317" in r["path"] for r in query_results(open_ledger(settings)))


def test_process_refuses_relative_paths_without_a_root(tmp_path):
    folder = _patient_folder(tmp_path)
    env = {**os.environ, "BONEWATCH_DATA_DIR": str(tmp_path / "data")}
    env["BONEWATCH_STORE_RELATIVE_PATHS"] = "true"
    run = subprocess.run(
        [sys.executable, "-m", "bonewatch", "process", str(folder)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2 and "needs BONEWATCH_PATH_ROOT" in run.stderr
    env["BONEWATCH_PATH_ROOT"] = str(tmp_path / "elsewhere")
    run = subprocess.run(
        [sys.executable, "-m", "bonewatch", "process", str(folder)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2 and "not under BONEWATCH_PATH_ROOT" in run.stderr


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_data_directory_and_what_it_holds_are_private(tmp_path, tiny_bundle_dir):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    write_png(inbox / "a.png", np.full((64, 64), 0.9, np.float32))
    data = tmp_path / "data"
    env = {
        **os.environ,
        "BONEWATCH_DATA_DIR": str(data),
        "BONEWATCH_BUNDLE": str(tiny_bundle_dir),
        "BONEWATCH_HEATMAPS": "true",
        "BONEWATCH_ENGINE": "keras",
    }
    env.pop("BONEWATCH_UMASK", None)
    old = os.umask(0o022)  # a usual login shell's mask; bonewatch must not rely on it
    try:
        run = subprocess.run(
            [sys.executable, "-m", "bonewatch", "process", str(inbox)],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        os.umask(old)
    assert run.returncode == 0, run.stderr
    assert _mode(data) == 0o700
    written = [p for p in data.rglob("*")]
    assert any(p.name == "bonewatch.sqlite" for p in written)
    for path in written:
        expected = 0o700 if path.is_dir() else 0o600
        assert _mode(path) == expected, f"{path.relative_to(data)} is {oct(_mode(path))}"


def test_a_pinned_bundle_digest_refuses_any_other_bundle(tiny_bundle_dir, settings):
    digest = bundle_digest(tiny_bundle_dir)
    assert load_bundle(tiny_bundle_dir, digest=digest).name == "tiny"
    with pytest.raises(BundleError, match="BONEWATCH_BUNDLE_SHA256"):
        load_bundle(tiny_bundle_dir, digest="0" * 64)
    with pytest.raises(BundleError, match="refusing to serve it"):
        serving_bundle(settings.replace(bundle_sha256="f" * 64))
