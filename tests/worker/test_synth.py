"""Phantom studies on disk: MURA layout, CSVs, fracture boxes, DICOM variety, determinism."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np

from bonewatch.ingest import read_header, read_image
from bonewatch.models.datasets import load_dataset
from bonewatch.worker.synth import synthesize


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_files(tmp_path):
    synthesize(tmp_path / "a", studies=6, fmt="both", seed=5)
    synthesize(tmp_path / "b", studies=6, fmt="both", seed=5)
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    # the CSVs embed the output folder's name; everything else is byte-identical
    csvs = {k for k in a if k.endswith("_image_paths.csv") or k.endswith("_studies.csv")}
    assert {k: v for k, v in a.items() if k not in csvs} == {
        k: v for k, v in b.items() if k not in csvs
    }


def test_mura_layout_and_csvs_are_readable_as_a_dataset(tmp_path):
    out = tmp_path / "phantoms"
    summary = synthesize(out, studies=16, fmt="png", seed=1)
    samples = load_dataset(out)
    assert len(samples) == summary.images
    assert {s.part for s in samples} >= {"ELBOW", "WRIST", "other"}
    labels = list(csv.reader((out / "train_labeled_studies.csv").open()))
    assert len(labels) == 16 and all(row[1] in {"0", "1"} for row in labels)
    paths = (out / "train_image_paths.csv").read_text().split()
    assert all(p.startswith("phantoms/train/XR_") for p in paths)


def test_fracture_boxes_lie_inside_the_written_images(tmp_path):
    out = tmp_path / "p"
    synthesize(out, studies=24, fmt="png", seed=2)
    rows = list(csv.DictReader((out / "fractures.csv").open()))
    assert rows, "positive studies must carry fractures"
    for row in rows:
        image = read_image(out / row["path"], salt="s")
        h, w = image.pixels.shape
        x0, y0, x1, y1 = (int(row[k]) for k in ("x0", "y0", "x1", "y1"))
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert "_positive" in row["path"]


def test_dicom_phantoms_vary_in_encoding(tmp_path):
    out = tmp_path / "d"
    synthesize(out, studies=16, fmt="dicom", seed=3)
    metas = [read_header(p, salt="s") for p in sorted(out.rglob("*.dcm"))]
    assert {m.photometric for m in metas} == {"MONOCHROME1", "MONOCHROME2"}
    assert len({m.transfer_syntax for m in metas}) >= 2
    assert len({m.bits_stored for m in metas}) >= 2
    assert {m.modality for m in metas} <= {"CR", "DX"}
    assert all(m.sop_instance_uid and m.study_uid for m in metas)
    assert len({m.sop_instance_uid for m in metas}) == len(metas)
    # MONOCHROME1 files still decode bone-bright
    for path in list(sorted(out.rglob("*.dcm")))[:4]:
        pixels = read_image(path, salt="s").pixels
        assert 0.0 <= pixels.min() and pixels.max() <= 1.0 and np.isfinite(pixels).all()
