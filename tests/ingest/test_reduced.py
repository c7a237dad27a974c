"""Decoding at the resolution the model needs (ingest/reduced.py): parity with full decoding."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bonewatch.ingest import make_uid, read_image, reduced, write_dicom
from bonewatch.models.phantoms import PARTS, draw_phantom

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "models" / "bundles" / "demo-phantom"
J2K = "1.2.840.10008.1.2.4.90"


def test_reduction_is_the_smallest_scale_still_covering_the_input():
    assert reduced.reduction_for(1760, 224, "j2k") == 4  # 440 >= 224, 220 < 224
    assert reduced.reduction_for(1760, 220, "j2k") == 8
    assert reduced.reduction_for(2400, 128, "jpeg") == 4  # JPEG keeps 4x the input: 600 px
    assert reduced.reduction_for(2000, 128, "j2k") == 8  # 250, then 125 < 128
    assert reduced.reduction_for(300, 224, "j2k") == 1
    assert reduced.reduction_for(3000, None, "j2k") == 1


def _j2k_phantom(tmp_path: Path, region: str, i: int, size: int = 1600) -> Path:
    rng = np.random.default_rng(100 + i)
    ph = draw_phantom(region, fractured=i % 2 == 0, rng=rng, size=size)
    path = tmp_path / f"{region}{i}.dcm"
    write_dicom(
        path,
        ph.pixels,
        transfer_syntax=J2K,
        study_uid=make_uid(str(path), "study"),
        series_uid=make_uid(str(path), "series"),
        sop_uid=make_uid(str(path), "sop"),
    )
    return path


def _jpeg_phantom(tmp_path: Path, region: str, i: int, size: int = 1600) -> Path:
    rng = np.random.default_rng(200 + i)
    ph = draw_phantom(region, fractured=i % 2 == 0, rng=rng, size=size)
    path = tmp_path / f"{region}{i}.jpg"
    Image.fromarray(np.round(ph.pixels * 255).astype(np.uint8)).save(path, quality=95)
    return path


def _cascade_gap(paths: list[Path], min_side: int) -> float:
    from bonewatch.models.bundle import load_bundle
    from bonewatch.models.cascade import run_cascade

    bundle = load_bundle(DEMO, engine="onnx", precision="fp32")
    full = [read_image(p, salt="t") for p in paths]
    small = [read_image(p, salt="t", min_side=min_side) for p in paths]
    for a, b in zip(full, small, strict=True):
        assert max(b.pixels.shape) < max(a.pixels.shape)  # it really decoded less
        assert b.meta.rows == a.meta.rows  # the header's size is kept
    gaps = []
    for pf, ps in zip(run_cascade(full, bundle), run_cascade(small, bundle), strict=True):
        gaps += [abs(pf.body_part_probs[k] - ps.body_part_probs[k]) for k in pf.body_part_probs]
        if pf.p_fracture is not None and ps.p_fracture is not None:
            gaps.append(abs(pf.p_fracture - ps.p_fracture))
    return max(gaps)


@pytest.mark.xfail(
    reason="open: one of seven 1,600 px J2K phantoms moves p by 0.33 at 1/8 and 1/4 scale "
    "although its pixels match the full decode's block means; BONEWATCH_REDUCED_DECODE is off "
    "by default until this is understood",
    strict=False,
)
def test_j2k_dicom_phantoms_predict_as_with_full_decoding(tmp_path):
    paths = [_j2k_phantom(tmp_path, part, i) for i, part in enumerate(PARTS)]
    gap = _cascade_gap(paths, 128)
    print(f"J2K phantoms, reduced vs full decode: max |dp| {gap:.4f}")
    assert gap <= 0.01


def test_jpeg_phantoms_predict_as_with_full_decoding(tmp_path):
    paths = [_jpeg_phantom(tmp_path, part, i, size=2400) for i, part in enumerate(PARTS)]
    gap = _cascade_gap(paths, 128)
    print(f"JPEG phantoms, reduced vs full decode: max |dp| {gap:.4f}")
    assert gap <= 0.01


def test_rg3_j2kr_predicts_as_with_full_decoding():
    data = pytest.importorskip("pydicom.data")
    path = Path(data.get_testdata_file("RG3_J2KR.dcm"))
    full = read_image(path, salt="t")
    small = read_image(path, salt="t", min_side=224)
    assert small.pixels.shape == (440, 440)
    # The lowest resolution level is the full image's low-pass: the same picture, smaller.
    block = full.pixels.reshape(440, 4, 440, 4).mean(axis=(1, 3))
    assert float(np.abs(block - small.pixels).mean()) < 0.01
    gap = _cascade_gap([path], 128)
    print(f"RG3_J2KR, reduced vs full decode: max |dp| {gap:.4f}")
    assert gap <= 0.01


def test_a_codestream_that_refuses_falls_back_to_full_decoding_logged_once(
    tmp_path, monkeypatch, caplog
):
    path = _j2k_phantom(tmp_path, "WRIST", 1, size=800)

    def refuse(codestream: bytes, factor: int) -> np.ndarray:
        raise OSError("codestream refuses reduction")

    monkeypatch.setattr(reduced, "_j2k_array", refuse)
    monkeypatch.setattr(reduced, "_logged", set())
    full = read_image(path, salt="t")
    with caplog.at_level(logging.WARNING, logger="bonewatch.ingest.reduced"):
        first = read_image(path, salt="t", min_side=128)
        read_image(path, salt="t", min_side=128)
    np.testing.assert_array_equal(first.pixels, full.pixels)
    assert sum("decoding in full" in r.message for r in caplog.records) == 1


def test_other_syntaxes_and_png_are_unchanged(tmp_path):
    rng = np.random.default_rng(3)
    pixels = draw_phantom("HAND", fractured=False, rng=rng, size=900).pixels
    png = tmp_path / "a.png"
    Image.fromarray(np.round(pixels * 255).astype(np.uint8)).save(png)
    dcm = tmp_path / "a.dcm"
    write_dicom(
        dcm, pixels, study_uid=make_uid("s"), series_uid=make_uid("r"), sop_uid=make_uid("i")
    )
    for path in (png, dcm):
        np.testing.assert_array_equal(
            read_image(path, salt="t", min_side=128).pixels, read_image(path, salt="t").pixels
        )
