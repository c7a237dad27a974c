"""decode_claimed, the decode step of a batch: what it reads is what was registered, its reasons
hold no path, and what a batch keeps in memory has a budget."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import bonewatch.ingest.reader as reader_module
import bonewatch.worker.pipeline as pipeline_module
from bonewatch.db import ClaimedImage
from bonewatch.ingest import read_image, write_png
from bonewatch.models.cascade import prepare_inputs
from bonewatch.models.preprocess import PreprocessSpec
from bonewatch.worker.pipeline import DecodedBatch, decode_claimed
from bonewatch.worker.settings import Settings
from tests.ingest.memory_cases import measure


def _claim(path: Path, image_id: int = 1, sha256: str | None = None) -> ClaimedImage:
    digest = sha256 or hashlib.sha256(path.read_bytes()).hexdigest()
    return ClaimedImage(
        image_id=image_id,
        path=str(path),
        sha256=digest,
        attempts=1,
        queue="bulk",
        study_uid=None,
        body_part_examined=None,
    )


def _decode(claimed: list[ClaimedImage], settings: Settings, **kwargs: Any) -> DecodedBatch:
    with ThreadPoolExecutor(2) as pool:
        return decode_claimed(claimed, settings, pool, **kwargs)


def _png(path: Path, value: float, shape: tuple[int, int] = (48, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(path, np.full(shape, value, np.float32))
    return path


# --- A: the file decoded is the file registered -------------------------------------------------


def test_a_symlink_swapped_in_after_registration_is_not_followed(
    tmp_path: Path, settings: Settings
) -> None:
    inbox_file = _png(tmp_path / "inbox" / "scan.png", 0.8)
    claim = _claim(inbox_file)
    # The same bytes elsewhere, so only following the link could make it "pass".
    elsewhere = shutil.copy(inbox_file, tmp_path / "elsewhere.png")
    inbox_file.unlink()
    inbox_file.symlink_to(elsewhere)
    batch = _decode([claim], settings)
    assert not batch.images, "decode_claimed followed a symlink swapped in after registration"
    assert [f.error_class for f in batch.failures] == ["UnreadableFileError"]
    assert "symbolic link" in str(batch.failures[0].reason)


def test_bytes_swapped_in_after_registration_are_refused_before_parsing(
    tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _png(tmp_path / "scan.png", 0.8)
    claim = _claim(path)
    _png(tmp_path / "other.png", 0.2, (64, 64)).replace(path)  # another patient's image
    sniffed: list[object] = []
    real_sniff = reader_module._sniff
    monkeypatch.setattr(
        reader_module, "_sniff", lambda *a, **k: sniffed.append(a) or real_sniff(*a, **k)
    )
    batch = _decode([claim], settings)
    assert [f.error_class for f in batch.failures] == ["FileChangedError"]
    assert not sniffed, "the swapped-in bytes were sniffed and decoded before the sha256 check"


def test_a_fifo_in_place_of_a_registered_file_is_a_refused_row(
    tmp_path: Path, settings: Settings
) -> None:
    path = _png(tmp_path / "scan.png", 0.8)
    claim = _claim(path)
    path.unlink()
    os.mkfifo(path)
    batch = _decode([claim], settings)
    assert [f.error_class for f in batch.failures] == ["UnreadableFileError"]


# --- B: no path in what the ledger records ------------------------------------------------------


def test_failure_and_retry_reasons_hold_no_path(
    tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "Patient SMITH^JOHN"
    gone = _png(folder / "gone.png", 0.5)
    claim_gone = _claim(gone, 1)
    gone.unlink()
    flaky = _png(folder / "flaky.png", 0.5)
    claim_flaky = _claim(flaky, 2)
    real_open = reader_module._open_raw

    def eio_open(path: Path) -> Any:  # a share that went away: EIO, naming the file
        if str(path) == str(flaky):
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real_open(path)

    monkeypatch.setattr(reader_module, "_open_raw", eio_open)
    batch = _decode([claim_gone, claim_flaky], settings)
    assert [f.error_class for f in batch.failures] == ["FileVanishedError"]
    assert [claim.image_id for claim, _ in batch.transient] == [2]
    reasons = [str(f.reason) for f in batch.failures] + [reason for _, reason in batch.transient]
    assert "Input/output error" in reasons[1]
    for reason in reasons:
        assert "SMITH" not in reason and str(tmp_path) not in reason, reason


# --- C: what a batch holds ----------------------------------------------------------------------


def test_a_batch_of_huge_pngs_holds_a_bounded_number_of_bytes(tmp_path: Path) -> None:
    # Sixteen 97 kB files of 10,000 x 10,000 px held 6.4 GB of float32 and peaked at 7.8 GB.
    report = measure("png_batch", tmp_path / "files")
    assert report["peak_rss_mb"] < 1500, report
    decoded = [o for o in report["outcomes"] if o.startswith("decoded")]
    assert len(decoded) == 16, report
    held_mb = float(report["outcomes"][-1].split(": ")[1].split()[0])
    # The budget (512 MiB = 537 MB) whole, the rest as copies of at most 1024 px (4.2 MB).
    assert held_mb <= 537 + 16 * 4.2, report


def test_past_the_budget_images_keep_a_small_copy_and_the_model_inputs_do_not_change(
    tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline_module, "_COMPACT_SIDE", 64)
    paths = [_png(tmp_path / f"{i}.png", 0.1 + 0.1 * i, (300, 200 + i)) for i in range(4)]
    claimed = [_claim(p, i) for i, p in enumerate(paths)]
    specs = [PreprocessSpec(32)]
    one_image = 300 * 203 * 4
    batch = _decode(claimed, settings, specs=specs, pixel_budget=one_image)
    shapes = sorted(image.pixels.shape for _, image, _ in batch.images)
    assert len(shapes) == 4
    whole = [s for s in shapes if s[0] == 300]
    assert len(whole) == 1, shapes  # the budget holds one image whole
    assert all(max(s) <= 64 for s in shapes if s not in whole), shapes
    assert batch.preprocessed is not None
    for row, (claim, _, _) in enumerate(batch.images):
        full = read_image(claim.path, salt=settings.salt()).pixels
        expected = prepare_inputs(full, specs)[0]
        np.testing.assert_array_equal(batch.preprocessed.tensors[specs[0]][row], expected)


# --- D: JPEG 2000 decodes at the resolution the models need -------------------------------------


def test_jpeg2000_decodes_reduced_for_the_models_and_in_full_for_heatmaps(
    tmp_path: Path, settings: Settings
) -> None:
    from bonewatch.ingest import make_uid, write_dicom
    from bonewatch.models.preprocess import preprocess

    yy, xx = np.mgrid[0:640, 0:600].astype(np.float64)
    path = tmp_path / "cr.dcm"
    write_dicom(
        path,
        0.5 + 0.4 * np.sin(xx / 37.0) * np.cos(yy / 23.0),
        transfer_syntax="1.2.840.10008.1.2.4.90",
        study_uid=make_uid("st"),
        series_uid=make_uid("se"),
        sop_uid=make_uid("so"),
    )
    spec = PreprocessSpec(input_size=64)
    assert settings.reduced_decode  # the default
    batch = _decode([_claim(path)], settings, specs=[spec])
    image = batch.images[0][1]
    # 1/4: 160 px, the smallest level still covering twice the 64 px input.
    assert image.pixels.shape == (160, 150) and image.grid is not None
    assert (image.meta.rows, image.meta.columns) == (640, 600)
    assert batch.preprocessed is not None
    made = batch.preprocessed.tensors[spec][0]
    np.testing.assert_array_equal(made, preprocess(image.pixels, spec, image.grid))
    full = preprocess(read_image(path, salt="t").pixels, spec)
    assert float(np.abs(made - full).max()) < 0.01
    # Heatmaps are drawn over the file's own pixels: the batch keeps the full decode.
    heat = _decode([_claim(path)], settings.replace(heatmaps=True), specs=[spec])
    assert heat.images[0][1].pixels.shape == (640, 600) and heat.images[0][1].grid is None


# --- E: decoding processes ----------------------------------------------------------------------


def test_decoding_processes_give_what_the_threads_give(
    tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real CR (JPEG 2000, decoded reduced), a PNG, a truncated file and bytes changed after
    registration: each ends the same in a decoding process as in a decode thread."""
    from pydicom.data import get_testdata_file

    from bonewatch.worker.pipeline import decode_processes

    rg3 = Path(shutil.copy(get_testdata_file("RG3_J2KR.dcm"), tmp_path / "rg3.dcm"))
    png = _png(tmp_path / "scan.png", 0.6, (300, 280))
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(rg3.read_bytes()[:4000])
    changed = _png(tmp_path / "changed.png", 0.3)
    claims = [_claim(rg3, 1), _claim(png, 2), _claim(cut, 3), _claim(changed, 4)]
    _png(tmp_path / "other.png", 0.9).replace(changed)
    specs = [PreprocessSpec(224), PreprocessSpec(96)]
    threads = _decode(claims, settings, specs=specs)
    with (
        ThreadPoolExecutor(2) as pool,
        decode_processes(settings.replace(decode_processes=2)) as processes,
    ):
        assert processes is not None
        spawned = decode_claimed(claims, settings, pool, specs=specs, processes=processes)
    assert [c.image_id for c, _, _ in spawned.images] == [1, 2]
    assert spawned.images[0][1].grid is not None  # RG3 was decoded reduced there too
    for (_, ours, _), (_, theirs, _) in zip(spawned.images, threads.images, strict=True):
        np.testing.assert_array_equal(ours.pixels, theirs.pixels)
        assert ours.meta == theirs.meta
    assert spawned.failures == threads.failures and len(spawned.failures) == 2
    assert {f.error_class for f in spawned.failures} == {"FileChangedError", "TruncatedFileError"}
    assert spawned.preprocessed is not None and threads.preprocessed is not None
    for spec in specs:
        np.testing.assert_array_equal(
            spawned.preprocessed.tensors[spec], threads.preprocessed.tensors[spec]
        )


def test_in_a_decoding_process_an_image_past_its_share_of_the_budget_comes_back_small(
    tmp_path: Path, settings: Settings
) -> None:
    from bonewatch.worker.pipeline import decode_processes

    paths = [_png(tmp_path / f"{i}.png", 0.2 * (i + 1), (1500, 1400)) for i in range(2)]
    claims = [_claim(p, i) for i, p in enumerate(paths)]
    spec = PreprocessSpec(32)
    one_image = 1500 * 1400 * 4
    with (
        ThreadPoolExecutor(1) as pool,
        decode_processes(settings.replace(decode_processes=1)) as processes,
    ):
        small = decode_claimed(
            claims, settings, pool, specs=[spec], processes=processes, pixel_budget=one_image
        )
        whole = decode_claimed(
            claims, settings, pool, specs=[spec], processes=processes, pixel_budget=2 * one_image
        )
    assert len(small.images) == 2
    assert all(max(im.pixels.shape) <= 1024 for _, im, _ in small.images), small.images
    assert [im.pixels.shape for _, im, _ in whole.images] == [(1500, 1400)] * 2
    assert small.preprocessed is not None and whole.preprocessed is not None
    # The model inputs were made from the whole image either way.
    np.testing.assert_array_equal(
        small.preprocessed.tensors[spec], whole.preprocessed.tensors[spec]
    )
