"""The inbox is untrusted: links, FIFOs and swaps are refused, reasons quote nothing of the file,
and what a file costs in memory follows the limits, not what its header or its deflate stream
claims.
"""

from __future__ import annotations

import os
import struct
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import DeflatedExplicitVRLittleEndian

import bonewatch.ingest.raster as raster_module
import bonewatch.ingest.reader as reader_module
from bonewatch.ingest import (
    EmptyFileError,
    FileChangedError,
    FileVanishedError,
    ImageTooLargeError,
    InboxWatcher,
    IngestError,
    NonImageFileError,
    NotAnImageError,
    UnreadableFileError,
    read_header,
    read_image,
    sha256_file,
)
from tests.ingest.memory_cases import measure

SALT = "s"
PEAK_MB = 400  # generous: the fixed cost of the interpreter and its imports is about 80 MB


def _refusal(call: Callable[[], Any], what: str) -> IngestError:
    """The IngestError ``call`` raises; a test failure saying ``what`` happened otherwise."""
    try:
        result = call()
    except IngestError as exc:
        return exc
    pytest.fail(f"{what}: it returned {type(result).__name__} instead of refusing")


# --- A: no symlink is followed, nothing but a regular file is opened, no swap goes unseen ------


def _other_patient(make_dicom) -> Path:
    return make_dicom("other/secret.dcm", patient_id="OTHER-PATIENT")


def _readers(path: Path) -> dict[str, Callable[[], Any]]:
    """Every way ingest reads a file's bytes, by name."""
    return {
        "read_header": lambda: read_header(path, salt=SALT),
        "read_image": lambda: read_image(path, salt=SALT),
        "sha256_file": lambda: sha256_file(path),
    }


def test_a_symlink_renamed_over_a_file_is_never_followed(tmp_path: Path, make_png, make_dicom):
    # A file of the inbox, then a link to another patient's image renamed over it (atomically,
    # as an attacker would, while the file is still settling).
    inbox_file = make_png("inbox/scan.png")
    secret = _other_patient(make_dicom)
    link = tmp_path / "inbox" / "link"
    link.symlink_to(secret)
    os.rename(link, inbox_file)
    for name, call in _readers(inbox_file).items():
        error = _refusal(call, f"{name} followed a symlink out of the inbox")
        assert isinstance(error, UnreadableFileError), (name, error)
        assert "symbolic link" in error.reason


def test_a_hard_link_to_a_file_outside_the_inbox_is_never_read(tmp_path: Path, make_dicom) -> None:
    # A hard link is no symlink: O_NOFOLLOW opens it, and its inode is that of another
    # patient's image outside the inbox.
    secret = _other_patient(make_dicom)
    (tmp_path / "inbox").mkdir()
    linked = tmp_path / "inbox" / "scan.dcm"
    os.link(secret, linked)
    for name, call in _readers(linked).items():
        error = _refusal(call, f"{name} read a hard link to a file outside the inbox")
        assert isinstance(error, UnreadableFileError), (name, error)
        assert "2 hard links" in error.reason and "copy it in" in error.reason
        assert str(tmp_path) not in error.reason and "secret" not in error.reason
    # Once the outside name is gone, the file is the inbox's own and is read.
    secret.unlink()
    assert read_header(linked, salt=SALT).rows == 36


def test_what_the_watcher_hands_out_after_a_swap_to_a_symlink_is_refused(
    tmp_path: Path, make_png, make_dicom
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    secret = _other_patient(make_dicom)
    handed_out: list[Path] = []
    with InboxWatcher(inbox, settle_seconds=0.5, poll_interval=0.1) as watcher:
        target = make_png("inbox/settling.png")
        handed_out += watcher.ready(timeout=0.2)  # seen, not settled yet
        (inbox / ".swap").symlink_to(secret)
        os.rename(inbox / ".swap", target)
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            handed_out += watcher.ready(timeout=0.3)
    for path in handed_out:  # a watcher may hand the name out or not; a reader must refuse it
        error = _refusal(
            lambda p=path: read_header(p, salt=SALT),
            "the header reader followed a symlink the watcher handed out",
        )
        assert isinstance(error, UnreadableFileError)


def test_a_fifo_swapped_in_after_the_file_was_looked_at_never_blocks(
    tmp_path: Path, make_png, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = make_png("swap.png")
    swapped = threading.Event()

    def swap_to_fifo() -> None:
        if not swapped.is_set():
            swapped.set()
            target.unlink()
            os.mkfifo(target)

    # The swap lands right after the reader first looks at the name, whichever way it does.
    real_stat, real_open = Path.stat, os.open

    def stat_then_swap(self: Path, *args: Any, **kwargs: Any) -> os.stat_result:
        result = real_stat(self, *args, **kwargs)
        if self == target:
            swap_to_fifo()
        return result

    def swap_then_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if os.fsdecode(path) == str(target):
            swap_to_fifo()
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat_then_swap)
    monkeypatch.setattr(os, "open", swap_then_open)
    outcome: list[BaseException | object] = []

    def run() -> None:
        try:
            outcome.append(read_image(target, salt=SALT))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    reader = threading.Thread(target=run, daemon=True)
    reader.start()
    reader.join(timeout=5.0)
    blocked = reader.is_alive()
    if blocked:  # let the stuck open() return, so the thread ends
        monkeypatch.undo()
        os.close(os.open(target, os.O_WRONLY | os.O_NONBLOCK))
    assert not blocked, "read_image blocked on a FIFO swapped in after the name was looked at"
    assert swapped.is_set()
    assert isinstance(outcome[0], UnreadableFileError), outcome
    assert "regular file" in outcome[0].reason


def test_the_file_seen_by_a_scan_is_the_one_read(tmp_path: Path, make_png) -> None:
    path = make_png("a.png")
    st = path.stat()
    assert read_header(path, salt=SALT, file_id=(st.st_dev, st.st_ino)).rows == 36
    other = make_png("b.png")
    os.replace(other, path)  # same name, another inode
    for call in (
        lambda: read_header(path, salt=SALT, file_id=(st.st_dev, st.st_ino)),
        lambda: read_image(path, salt=SALT, file_id=(st.st_dev, st.st_ino)),
        lambda: sha256_file(path, file_id=(st.st_dev, st.st_ino)),
    ):
        assert isinstance(_refusal(call, "a replaced file was read"), FileChangedError)


def test_bytes_that_differ_from_the_registered_ones_are_never_parsed(
    make_png, make_dicom, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_png("a.png")
    registered = read_header(path, salt=SALT).sha256
    path.write_bytes(make_dicom("b.dcm").read_bytes())  # new content under the name
    sniffed: list[object] = []
    real_sniff = reader_module._sniff
    monkeypatch.setattr(
        reader_module, "_sniff", lambda *a, **k: sniffed.append(a) or real_sniff(*a, **k)
    )
    error = _refusal(
        lambda: read_image(path, salt=SALT, sha256=registered), "changed bytes were decoded"
    )
    assert isinstance(error, FileChangedError)
    assert not sniffed, "the changed bytes were sniffed and parsed before the sha256 check"


# --- B: reasons say what is wrong without the file's bytes or its path -------------------------


def test_reasons_never_quote_the_file_or_its_path(tmp_path: Path, make_dicom) -> None:
    text = tmp_path / "notes.dcm"
    text.write_bytes(b"PATIENT SMITH^JOHN MRN 1234567: follow-up in two weeks\n")
    binary = tmp_path / "blob.dcm"
    binary.write_bytes(bytes(range(7, 255)))
    pdf = tmp_path / "report.dcm"
    pdf.write_bytes(b"%PDF-1.7\n% patient SMITH^JOHN\n")
    empty = tmp_path / "empty.dcm"
    empty.touch()
    folder = tmp_path / "folder.dcm"
    folder.mkdir()
    fifo = tmp_path / "pipe.dcm"
    os.mkfifo(fifo)
    big = tmp_path / "big.dcm"
    big.write_bytes(b"\0" * 100)
    # A header value that cannot be read, holding a name: the parser's message quotes it.
    frames = make_dicom("frames.dcm")
    rows = b"\x28\x00\x10\x00US"  # (0028,0010); NumberOfFrames (0028,0008) goes before it
    bad_frames = b"\x28\x00\x08\x00IS" + struct.pack("<H", 10) + b"SMITH^JOHN"
    frames.write_bytes(frames.read_bytes().replace(rows, bad_frames + rows, 1))

    cases: list[tuple[Callable[[], Any], type[IngestError], str]] = [
        (lambda: read_header(text, salt=SALT), NonImageFileError, "a text file, not an image"),
        (lambda: read_header(binary, salt=SALT), NotAnImageError, "no known image signature"),
        (lambda: read_header(pdf, salt=SALT), NonImageFileError, "a PDF document"),
        (lambda: read_header(tmp_path / "gone.dcm", salt=SALT), FileVanishedError, "not found"),
        (lambda: read_header(empty, salt=SALT), EmptyFileError, "zero bytes"),
        (lambda: read_header(folder, salt=SALT), UnreadableFileError, "directory"),
        (lambda: read_image(fifo, salt=SALT), UnreadableFileError, "regular file"),
        (lambda: read_image(big, salt=SALT, max_bytes=10), ImageTooLargeError, "over the limit"),
        (lambda: read_header(frames, salt=SALT), IngestError, ""),
    ]
    for call, kind, says in cases:
        error = _refusal(call, "a bad file was accepted")
        for content in (
            "PATIENT",
            "SMITH",
            "1234567",
            b"PATIENT ".hex(),
            bytes(range(7, 15)).hex(),
        ):
            assert content not in error.reason, (
                f"the reason quotes the file's bytes: {error.reason}"
            )
        assert str(tmp_path) not in error.reason, f"the reason holds the path: {error.reason}"
        assert isinstance(error, kind), (kind, error)
        assert says in error.reason, error.reason


# --- C: memory follows the limits ------------------------------------------------------------


def test_a_deflated_dicom_with_a_400_mb_private_element_stays_small(tmp_path: Path) -> None:
    # 400 kB on disk; pydicom alone inflates the whole dataset and reads the element (1.6 GB).
    report = measure("deflated", tmp_path / "files")
    assert report["outcomes"] == ["header 64x64", "decoded 64x64 float32"], report
    assert report["peak_rss_mb"] < PEAK_MB, report
    refused = measure("deflated", tmp_path / "files", max_bytes=50_000_000)
    assert refused["outcomes"][0].startswith("ImageTooLargeError: the deflated DICOM"), refused
    assert "inflates to more than 50000000 bytes" in refused["outcomes"][0]
    assert refused["peak_rss_mb"] < PEAK_MB, refused


def test_a_10000_px_png_decodes_reduced_in_little_memory(tmp_path: Path) -> None:
    # 97 kB on disk; decoded whole as float64 then float32 it took 1.4 GB.
    report = measure("png", tmp_path / "files")
    assert report["outcomes"] == ["header 10000x10000", "decoded 3334x3334 float32"], report
    assert report["peak_rss_mb"] < PEAK_MB, report


def _deflated(make_dicom, pixels: np.ndarray) -> Path:
    return make_dicom(
        "deflated.dcm", pixels=pixels, transfer_syntax=str(DeflatedExplicitVRLittleEndian)
    )


@pytest.mark.parametrize(
    "tag", [0x00091001, 0xFFFCFFFC], ids=["private-before-pixels", "padding-after-pixels"]
)
def test_a_deflate_bomb_is_refused_by_the_file_size_limit_and_never_held(
    make_dicom, tag: int
) -> None:
    path = _deflated(make_dicom, np.zeros((256, 256)))
    ds = pydicom.dcmread(path)
    ds.add_new(0x00090010, "LO", "bonewatch test")  # the private block's creator
    ds.add_new(tag, "OB", bytes(30_000_000))
    ds.save_as(path, enforce_file_format=True)
    assert path.stat().st_size < 200_000
    for read in (read_header, read_image):
        with pytest.raises(ImageTooLargeError, match="inflates to more than 10000000 bytes"):
            read(path, salt=SALT, max_bytes=10_000_000)
    tracemalloc.start()
    try:
        assert read_header(path, salt=SALT, max_bytes=40_000_000).rows == 256
        assert read_image(path, salt=SALT, max_bytes=40_000_000).pixels.shape == (256, 256)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8_000_000, f"{peak} bytes traced: the 30 MB element was held"


@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_a_cut_deflate_stream_is_a_damaged_file(tmp_path: Path, make_dicom, cut: float) -> None:
    data = _deflated(make_dicom, np.random.default_rng(3).random((64, 64))).read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: int(len(data) * cut)])
    for read in (read_header, read_image):
        error = _refusal(lambda r=read: r(path, salt=SALT), "a cut deflate stream was read")
        assert error.status == "failed" and not isinstance(error, ImageTooLargeError)


def test_a_deflated_dicom_decodes_as_pydicom_reads_it(make_dicom) -> None:
    pixels = np.random.default_rng(4).random((40, 52))
    path = _deflated(make_dicom, pixels)
    expected = read_image(make_dicom("plain.dcm", pixels=pixels), salt=SALT)
    image = read_image(path, salt=SALT)
    np.testing.assert_array_equal(image.pixels, expected.pixels)
    assert image.meta.transfer_syntax == str(DeflatedExplicitVRLittleEndian)
    assert image.meta.patient_hash == expected.meta.patient_hash


# --- C: big images are reduced while decoding; normal ones are untouched ------------------------


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(array, mode=mode).save(path)
    return path


@pytest.mark.parametrize(
    ("array", "max_side"),
    [
        (np.random.default_rng(1).integers(0, 256, (37, 53), dtype=np.uint8), 20),
        (np.random.default_rng(2).integers(0, 65536, (41, 30), dtype=np.uint16), 16),
        (np.random.default_rng(3).integers(0, 256, (25, 33, 3), dtype=np.uint8), 12),
    ],
    ids=["grey8", "grey16", "rgb"],
)
def test_a_png_over_the_side_limit_is_averaged_down(tmp_path: Path, array, max_side) -> None:
    path = _png(tmp_path / "x.png", array)
    whole = read_image(path, salt=SALT, max_side=None).pixels
    assert np.array_equal(read_image(path, salt=SALT, max_side=max(array.shape)).pixels, whole)
    reduced = read_image(path, salt=SALT, max_side=max_side).pixels
    factor = -(-max(array.shape[:2]) // max_side)
    assert reduced.dtype == np.float32 and max(reduced.shape) <= max_side
    assert reduced.shape == tuple(-(-s // factor) for s in array.shape[:2])
    np.testing.assert_allclose(reduced, raster_module.reduce_blocks(whole, factor), atol=1e-6)


def test_a_jpeg_over_the_side_limit_decodes_at_a_smaller_scale(tmp_path: Path) -> None:
    y, x = np.mgrid[0:400, 0:640]
    grey = ((x + y) % 256).astype(np.uint8)
    path = tmp_path / "x.jpg"
    Image.fromarray(grey).save(path, quality=95)
    whole = read_image(path, salt=SALT, max_side=None).pixels
    reduced = read_image(path, salt=SALT, max_side=100).pixels
    assert reduced.shape == (50, 80)  # decoded at 1/4 scale (160 x 100), then averaged by 2
    small = np.asarray(Image.fromarray(whole).resize(reduced.shape[::-1], Image.Resampling.BOX))
    assert np.abs(reduced - small).mean() < 0.03


def test_a_dicom_over_the_side_limit_is_averaged_on_its_stored_values(make_dicom) -> None:
    pixels = np.random.default_rng(5).random((50, 70))
    path = make_dicom("big.dcm", pixels=pixels, bits_stored=12)
    whole = read_image(path, salt=SALT, max_side=None).pixels
    reduced = read_image(path, salt=SALT, max_side=24)
    assert reduced.pixels.shape == (17, 24) and reduced.meta.rows == 50
    np.testing.assert_allclose(reduced.pixels, raster_module.reduce_blocks(whole, 3), atol=1e-3)


def test_reduce_blocks_matches_pillow_reduce_and_keeps_integer_dtypes() -> None:
    array = np.random.default_rng(6).integers(0, 256, (101, 67), dtype=np.uint8)
    ours = raster_module.reduce_blocks(array, 4)
    pillow = np.asarray(Image.fromarray(array).reduce(4))
    assert ours.dtype == np.uint8 and ours.shape == pillow.shape
    assert np.abs(ours.astype(int) - pillow.astype(int)).max() <= 1  # rounding of .5 only
    assert raster_module.reduce_blocks(array.astype(np.uint16) * 200, 3).dtype == np.uint16
    assert raster_module.reduce_blocks(array.astype(np.float64), 3).dtype == np.float32


def test_normal_images_decode_exactly_as_without_a_side_limit(tmp_path: Path, make_dicom) -> None:
    side = raster_module.MAX_DECODED_SIDE
    wide = np.random.default_rng(7).integers(0, 256, (64, side), dtype=np.uint8)
    path = _png(tmp_path / "wide.png", wide)
    np.testing.assert_array_equal(
        read_image(path, salt=SALT).pixels, read_image(path, salt=SALT, max_side=None).pixels
    )
    dcm = make_dicom("wide.dcm", pixels=wide / 255.0, bits_stored=8)
    np.testing.assert_array_equal(
        read_image(dcm, salt=SALT).pixels, read_image(dcm, salt=SALT, max_side=None).pixels
    )
