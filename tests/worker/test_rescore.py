"""Re-scoring finished images with another bundle keeps the old results beside the new."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from bonewatch.db import query_results, query_studies
from bonewatch.ingest import write_png
from bonewatch.worker.rescore import rescore
from bonewatch.worker.runner import open_ledger, process_paths


def _renamed_copy(bundle: Path, target: Path, name: str, version: str) -> Path:
    shutil.copytree(bundle, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["name"], manifest["version"] = name, version
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def test_rescore_adds_the_new_bundles_results_and_keeps_the_old(tmp_path, settings):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    rng = np.random.default_rng(11)
    for i in range(6):
        write_png(inbox / f"im{i}.png", (0.6 + 0.4 * rng.random((48, 48))).astype(np.float32))
    process_paths([inbox], settings)
    second = settings.replace(bundle=_renamed_copy(settings.bundle, tmp_path / "b2", "next", "2"))

    # `process` with the new bundle takes nothing: the files are registered and finished.
    again, drained = process_paths([inbox], second)
    assert again.new == 0 and drained.finished == 0

    summary = rescore(second)
    assert (summary.bundle, summary.version, summary.queued, summary.finished) == (
        "next",
        "2",
        6,
        6,
    )
    engine = open_ledger(second)
    latest = query_results(engine)
    assert {r["bundle"] for r in latest} == {"next"} and {r["status"] for r in latest} == {"done"}
    old = query_results(engine, bundle="tiny")
    assert len(old) == 6 and {r["bundle"] for r in old} == {"tiny"}
    studies = {(s["bundle"], s["bundle_version"]) for s in query_studies(engine)}
    assert studies == {("tiny", "1"), ("next", "2")}

    # Nothing is scored twice by one bundle version.
    assert rescore(second).queued == 0
    assert rescore(settings).queued == 0
    only_two = rescore(
        settings.replace(bundle=_renamed_copy(settings.bundle, tmp_path / "b3", "third", "1")),
        path_glob="*/im[0]*",
    )
    assert only_two.queued == 0  # a glob's brackets are literal
    one = rescore(settings.replace(bundle=tmp_path / "b3"), path_glob="*/im0.png")
    assert one.queued == 1 and one.finished == 1
