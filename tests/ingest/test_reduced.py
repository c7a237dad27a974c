"""Decoding at the resolution the model needs (ingest/reduced.py): parity with full decoding."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate

from bonewatch.ingest import make_uid, read_image, reduced, write_dicom
from bonewatch.models.phantoms import PARTS, draw_phantom
from bonewatch.models.preprocess import PreprocessSpec, preprocess
from bonewatch.worker.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "models" / "bundles" / "demo-phantom"
J2K = "1.2.840.10008.1.2.4.90"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
PARITY = 0.01  # the largest |dp| allowed against full decoding


def test_reduction_is_the_smallest_scale_still_covering_twice_the_input():
    assert reduced.reduction_for(2000, 224, "j2k") == 4  # 500 >= 448, 250 < 448
    assert reduced.reduction_for(1760, 224, "j2k") == 2  # 880 >= 448, 440 < 448
    assert reduced.reduction_for(1760, 128, "j2k") == 4  # 440 >= 256, 220 < 256
    assert reduced.reduction_for(2400, 128, "jpeg") == 8  # JPEG scales to 1/8 at most: 300
    assert reduced.reduction_for(300, 224, "j2k") == 1
    assert reduced.reduction_for(3000, None, "j2k") == 1


def _write_j2k(path: Path, pixels: np.ndarray, transfer_syntax: str = J2K) -> Path:
    write_dicom(
        path,
        pixels,
        transfer_syntax=transfer_syntax,
        study_uid=make_uid(str(path), "study"),
        series_uid=make_uid(str(path), "series"),
        sop_uid=make_uid(str(path), "sop"),
    )
    return path


def _j2k_phantom(tmp_path: Path, region: str, i: int, size: int = 1600) -> Path:
    rng = np.random.default_rng(100 + i)
    ph = draw_phantom(region, fractured=i % 2 == 0, rng=rng, size=size)
    return _write_j2k(tmp_path / f"{region}{i}.dcm", ph.pixels)


def _jpeg_phantom(tmp_path: Path, region: str, i: int, size: int = 1600) -> Path:
    rng = np.random.default_rng(200 + i)
    ph = draw_phantom(region, fractured=i % 2 == 0, rng=rng, size=size)
    path = tmp_path / f"{region}{i}.jpg"
    Image.fromarray(np.round(ph.pixels * 255).astype(np.uint8)).save(path, quality=95)
    return path


def _jpeg_dicom_phantom(tmp_path: Path, region: str, i: int, size: int = 2000) -> Path:
    """An 8-bit baseline JPEG CR: the phantom's JPEG encapsulated in a Part 10 file."""
    rng = np.random.default_rng(300 + i)
    pixels = draw_phantom(region, fractured=i % 2 == 0, rng=rng, size=size).pixels
    path = tmp_path / f"{region}{i}.dcm"
    write_dicom(
        path,
        pixels,
        bits_stored=8,
        study_uid=make_uid(str(path), "study"),
        series_uid=make_uid(str(path), "series"),
        sop_uid=make_uid(str(path), "sop"),
    )
    ds = pydicom.dcmread(path)
    jpeg = io.BytesIO()
    Image.fromarray(ds.pixel_array.astype(np.uint8)).save(jpeg, format="JPEG", quality=95)
    ds.PixelData = encapsulate([jpeg.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEG_BASELINE
    ds.save_as(path, enforce_file_format=True)
    return path


def _cascade_gap(full_paths: list[Path], min_side: int, reduced_paths: list[Path] | None = None):
    """Largest |dp| (body-part probabilities and p_fracture) between full decodes of
    ``full_paths`` and reduced decodes of ``reduced_paths`` (the same files by default)."""
    from bonewatch.models.bundle import load_bundle
    from bonewatch.models.cascade import run_cascade

    bundle = load_bundle(DEMO, engine="onnx", precision="fp32")
    full = [read_image(p, salt="t") for p in full_paths]
    small = [read_image(p, salt="t", min_side=min_side) for p in reduced_paths or full_paths]
    for a, b in zip(full, small, strict=True):
        assert b.grid is not None and a.grid is None
        assert 2 * max(b.pixels.shape) <= max(a.pixels.shape)  # it really decoded less
        assert b.meta.rows == a.meta.rows  # the header's size is kept
        assert (b.grid.rows, b.grid.columns) == a.pixels.shape
    gaps = []
    for pf, ps in zip(run_cascade(full, bundle), run_cascade(small, bundle), strict=True):
        assert pf.body_part == ps.body_part
        gaps += [abs(pf.body_part_probs[k] - ps.body_part_probs[k]) for k in pf.body_part_probs]
        if pf.p_fracture is not None and ps.p_fracture is not None:
            gaps.append(abs(pf.p_fracture - ps.p_fracture))
    return max(gaps)


def test_reduced_pixels_are_resized_in_the_full_images_geometry(tmp_path):
    # A smooth picture on a 1281 x 1600 grid: a reduced side is ceil(1281 / f), whose pixels
    # do not cover the full image's extent; resized as a whole image they came out a row off.
    yy, xx = np.mgrid[0:1281, 0:1600].astype(np.float64)
    pixels = 0.5 + 0.4 * np.sin(xx / 97.0) * np.cos(yy / 61.0)
    pixels[300:900, 400:1100] += 0.1  # a step edge too
    path = _write_j2k(tmp_path / "smooth.dcm", np.clip(pixels, 0, 1))
    full = read_image(path, salt="t")
    small = read_image(path, salt="t", min_side=128)
    assert small.pixels.shape == (321, 400)  # 1/4
    spec = PreprocessSpec(input_size=128)
    want = preprocess(full.pixels, spec)
    got = preprocess(small.pixels, spec, small.grid)
    assert float(np.abs(got - want).max()) < 0.01
    # Ignoring the grid (the old behaviour) puts the picture off by a row at the edges.
    assert float(np.abs(preprocess(small.pixels, spec) - want).max()) > 0.05


def test_j2k_dicom_phantoms_predict_as_with_full_decoding(tmp_path):
    paths = [_j2k_phantom(tmp_path, part, i) for i, part in enumerate(PARTS)]
    gap = _cascade_gap(paths, 128)
    print(f"J2K phantoms (1,600 px, 1/4), reduced vs full decode: max |dp| {gap:.4f}")
    assert gap <= PARITY


def test_jpeg_phantoms_predict_as_with_full_decoding(tmp_path):
    paths = [_jpeg_phantom(tmp_path, part, i, size=2400) for i, part in enumerate(PARTS)]
    gap = _cascade_gap(paths, 128)
    print(f"JPEG phantoms (2,400 px, 1/8), reduced vs full decode: max |dp| {gap:.4f}")
    assert gap <= PARITY


def test_baseline_jpeg_dicom_phantoms_predict_as_with_full_decoding(tmp_path):
    paths = [_jpeg_dicom_phantom(tmp_path, part, i) for i, part in enumerate(PARTS)]
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == JPEG_BASELINE
    gap = _cascade_gap(paths, 128)
    print(f"JPEG baseline DICOM phantoms (2,000 px, 1/4), vs full decode: max |dp| {gap:.4f}")
    assert gap <= PARITY


@pytest.mark.parametrize(
    ("compressed", "uncompressed", "wavelet"),
    [("RG3_J2KR.dcm", "RG3_UNCR.dcm", "j2k-5-3"), ("RG3_J2KI.dcm", "RG3_UNCI.dcm", "j2k-9-7")],
)
def test_rg3_predicts_as_the_uncompressed_file_decoded_in_full(compressed, uncompressed, wavelet):
    data = pytest.importorskip("pydicom.data")
    j2k = Path(data.get_testdata_file(compressed))
    unc = Path(data.get_testdata_file(uncompressed))
    small = read_image(j2k, salt="t", min_side=224)
    assert small.pixels.shape == (880, 880)  # 1/2 for a 224 px model
    assert small.grid is not None and small.grid.stages == ((wavelet, 1),)
    gap = _cascade_gap([unc], 128, [j2k])  # 1/4 for the demo bundle's 128 px
    print(f"{compressed} reduced vs {uncompressed} in full: max |dp| {gap:.4f}")
    assert gap <= PARITY


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
    assert first.grid is None
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
        small = read_image(path, salt="t", min_side=128)
        assert small.grid is None
        np.testing.assert_array_equal(small.pixels, read_image(path, salt="t").pixels)


def test_reduced_decoding_is_on_by_default(monkeypatch):
    monkeypatch.delenv("BONEWATCH_REDUCED_DECODE", raising=False)
    assert Settings.resolve().reduced_decode is True


def test_heatmap_pictures_decode_at_their_own_size_and_explain_as_in_full(tmp_path):
    """explain and the Secondary Capture's picture decode a 2,400 px JPEG 2000 CR at 1/2 (the
    smallest level covering 1,024 px), and say what the full decode says."""
    from bonewatch.deliver.values import ImageOutcome
    from bonewatch.models.bundle import load_bundle
    from bonewatch.worker.delivery import heatmap_picture
    from bonewatch.worker.heatmaps import explain_file

    rng = np.random.default_rng(7)
    path = _write_j2k(
        tmp_path / "wrist.dcm",
        draw_phantom("WRIST", fractured=True, rng=rng, size=2400).pixels,
    )
    bundle = load_bundle(DEMO, engine="onnx", precision="fp32")
    full_settings = Settings(data_dir=tmp_path / "full", reduced_decode=False)
    small_settings = Settings(data_dir=tmp_path / "small", reduced_decode=True)
    full = explain_file(path, bundle, full_settings, out=tmp_path / "full.png", part="WRIST")
    small = explain_file(path, bundle, small_settings, out=tmp_path / "small.png", part="WRIST")
    with Image.open(full.heatmap) as a, Image.open(small.heatmap) as b:
        full_size, small_size = a.size, b.size
    # The picture is half the file's size on each side (the phantom is 2,400 px high).
    assert full_size[1] == 2400 and small_size[1] == 1200, (full_size, small_size)
    assert abs(2 * small_size[0] - full_size[0]) <= 1
    assert abs(full.p_fracture - small.p_fracture) <= PARITY
    # peak_xy stays in the file's own pixels, where the full decode puts it (within 2 %).
    assert all(0 <= v < 2400 for v in small.peak_xy)
    assert max(abs(a - b) for a, b in zip(full.peak_xy, small.peak_xy, strict=True)) <= 48
    outcome = ImageOutcome("1.2.3", "1.2.840.10008.5.1.4.1.1.1", "WRIST", small.p_fracture, 0.5)
    for settings, size in ((full_settings, full_size), (small_settings, small_size)):
        picture = heatmap_picture(str(path), outcome, bundle, settings)
        assert picture.shape == (size[1], size[0], 3)
