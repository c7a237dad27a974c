"""Duplicates in a processed folder: the reason names the original's stored path, and a good copy
registered beside a damaged one of the same instance is processed once the damaged one fails."""

from __future__ import annotations

import numpy as np

from bonewatch.db import query_results
from bonewatch.worker.runner import open_ledger, process_paths
from tests.ingest.archive_factory import dicom_bytes


def test_a_good_copy_beside_a_damaged_one_is_processed(tmp_path, settings):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    whole = dicom_bytes("one-instance", np.full((64, 64), 0.9, np.float32))
    (inbox / "a_cut.dcm").write_bytes(whole[:-3000])  # sorts first: registered first
    (inbox / "b_whole.dcm").write_bytes(whole)
    (inbox / "c_copy.dcm").write_bytes(whole)

    process_paths([inbox], settings)

    rows = {r["path"].rsplit("/", 1)[-1]: r for r in query_results(open_ledger(settings))}
    assert rows["a_cut.dcm"]["status"] == "failed"
    assert rows["b_whole.dcm"]["status"] == "done", rows["b_whole.dcm"]
    assert rows["c_copy.dcm"]["status"] == "duplicate"
    assert rows["c_copy.dcm"]["duplicate_of"] == rows["b_whole.dcm"]["id"]
    assert rows["c_copy.dcm"]["reason"] == (
        f"same bytes as image {rows['b_whole.dcm']['id']} ({inbox / 'b_whole.dcm'})"
    )
