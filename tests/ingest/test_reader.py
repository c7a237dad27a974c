"""Sniffing by content, file-system failures, limits and MURA fields on read."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bonewatch.ingest.reader as reader_module
from bonewatch.ingest import (
    BadFileNameError,
    EmptyFileError,
    FileVanishedError,
    ImageTooLargeError,
    NotAnImageError,
    UnreadableFileError,
    printable_path,
    read_header,
    read_image,
    sha256_file,
)

SALT = "s"


def test_zero_bytes(tmp_path: Path) -> None:
    empty = tmp_path / "empty.dcm"
    empty.touch()
    for read in (read_header, read_image):
        with pytest.raises(EmptyFileError):
            read(empty, salt=SALT)


def test_random_bytes_named_dcm(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(np.random.default_rng(7).bytes(4096))
    for read in (read_header, read_image):
        with pytest.raises(NotAnImageError):
            read(junk, salt=SALT)


def test_text_starting_like_a_dicom_group_is_not_an_image(tmp_path: Path) -> None:
    fake = tmp_path / "fake.dcm"
    fake.write_bytes(b"\x08\x00" + b"hello world, not a dataset" * 20)
    with pytest.raises(NotAnImageError):
        read_header(fake, salt=SALT)


def test_directory_named_like_a_file(tmp_path: Path) -> None:
    folder = tmp_path / "x.dcm"
    folder.mkdir()
    for call in (read_header, read_image):
        with pytest.raises(UnreadableFileError, match="directory"):
            call(folder, salt=SALT)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileVanishedError):
        read_header(tmp_path / "gone.dcm", salt=SALT)
    with pytest.raises(FileVanishedError):
        sha256_file(tmp_path / "gone.dcm")


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.dcm"
    os.mkfifo(fifo)
    with pytest.raises(UnreadableFileError, match="regular"):
        read_image(fifo, salt=SALT)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied(make_png) -> None:
    path = make_png()
    path.chmod(0)
    with pytest.raises(UnreadableFileError):
        read_header(path, salt=SALT)


def _without_file_permission_override() -> None:
    """In a child of root: give up the capabilities that let root read any file.

    prctl(PR_CAPBSET_DROP) on CAP_DAC_OVERRIDE (1) and CAP_DAC_READ_SEARCH (2); at exec the
    child's capabilities are recomputed without them, so file modes apply to it as to anyone.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root needs its override taken away")
def test_permission_denied_even_for_root_without_its_override(make_png) -> None:
    path = make_png("locked.png")
    path.chmod(0)
    script = (
        "import sys\n"
        "from bonewatch.ingest import read_header, IngestError\n"
        "try:\n"
        "    read_header(sys.argv[1], salt='s')\n"
        "except IngestError as exc:\n"
        "    print(exc.error_class, exc.status, exc.reason)\n"
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", script, str(path)],
            preexec_fn=_without_file_permission_override,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=Path(reader_module.__file__).parents[1],
        )
    except subprocess.SubprocessError as exc:
        pytest.skip(f"cannot drop root's file capabilities here: {exc}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("UnreadableFileError failed cannot open "), result.stdout
    assert "Permission denied" in result.stdout


@pytest.mark.parametrize(
    "name", ["hand AP 1.png", "Röntgen Hand.png", "手の写真.png", "x-ray (copy).png", "a\nb.png"]
)
def test_names_with_spaces_and_non_ascii_characters_are_read(make_png, name: str) -> None:
    path = make_png(name)
    meta = read_header(path, salt=SALT)
    assert meta.path == str(path)
    assert read_image(path, salt=SALT).pixels.shape == (36, 52)


def test_a_name_that_is_not_utf8_is_refused_with_a_printable_reason(tmp_path, make_png) -> None:
    raw = os.fsencode(tmp_path) + b"/scan\xff\xfe.png"
    with open(raw, "wb") as fh:
        fh.write(make_png().read_bytes())
    path = Path(os.fsdecode(raw))
    with pytest.raises(BadFileNameError) as info:
        read_header(path, salt=SALT)
    assert info.value.status == "failed"
    # The path column keeps the name, escaped; the reason says what to do without repeating it.
    assert "scan" not in info.value.reason and "rename" in info.value.reason
    info.value.reason.encode("utf-8")  # the reason itself can be stored and logged
    assert printable_path(path) == f"{tmp_path}/scan\\xff\\xfe.png"
    assert printable_path(tmp_path / "Röntgen.png") == str(tmp_path / "Röntgen.png")


def test_format_comes_from_content_not_name(tmp_path: Path, make_png, make_dicom) -> None:
    png_named_dcm = make_png("really_png.dcm")
    dicom_named_png = make_dicom("really_dicom.png", bits_stored=8)
    assert read_header(png_named_dcm, salt=SALT).format == "png"
    assert read_header(dicom_named_png, salt=SALT).format == "dicom"


def test_sha256_and_size(make_dicom) -> None:
    path = make_dicom()
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert sha256_file(path) == expected
    header = read_header(path, salt=SALT)
    image = read_image(path, salt=SALT)
    assert header.sha256 == image.meta.sha256 == expected
    assert header.size_bytes == image.meta.size_bytes == path.stat().st_size
    assert header == image.meta


def test_byte_limit(make_png) -> None:
    path = make_png()
    size = path.stat().st_size
    with pytest.raises(ImageTooLargeError, match=f"{size} bytes, over the limit of 10 bytes"):
        read_header(path, salt=SALT, max_bytes=10)
    assert read_image(path, salt=SALT, max_bytes=size).meta.size_bytes == size


def test_mura_fields_from_the_path(make_png, make_dicom) -> None:
    png = make_png("MURA-v1.1/train/XR_WRIST/patient00042/study2_negative/image3.png")
    dcm = make_dicom("XR_ELBOW/patient00001/study1_positive/image1.dcm")
    png_meta = read_header(png, salt=SALT)
    assert (png_meta.mura_part, png_meta.mura_patient, png_meta.mura_label) == (
        "WRIST",
        "patient00042",
        0,
    )
    assert png_meta.mura_study == "XR_WRIST/patient00042/study2_negative"
    assert read_image(dcm, salt=SALT).meta.mura_label == 1
    assert read_header(make_png("elsewhere.png"), salt=SALT).mura_part is None


class _FailingFile(io.FileIO):
    """A file whose reads fail with EIO (a share going away) at a chosen point.

    ``fail_from`` None fails every read; N fails reads at offset N or later once the file has
    been read to its end (the hashing pass) and rewound.
    """

    def __init__(self, path: Path, fail_from: int | None) -> None:
        super().__init__(path, "r")
        self._fail_from = fail_from
        self._seen_eof = False
        self._rewound = False

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        position = super().seek(offset, whence)
        self._rewound = self._rewound or self._seen_eof
        return position

    def readinto(self, buffer) -> int | None:  # type: ignore[override]
        if self._fail_from is None or (self._rewound and self.tell() >= self._fail_from):
            raise OSError(errno.EIO, "Input/output error")
        count = super().readinto(buffer)
        self._seen_eof = self._seen_eof or count == 0
        return count


@pytest.mark.parametrize(
    ("kind", "fail_from"),
    [("png", None), ("dicom", None), ("png", 0), ("dicom", 0), ("dicom", 132)],
    ids=["png-hashing", "dicom-hashing", "png-sniffing", "dicom-sniffing", "inside-pydicom"],
)
def test_io_errors_stay_oserror(monkeypatch, make_png, make_dicom, kind, fail_from) -> None:
    path = make_png() if kind == "png" else make_dicom()
    # A small buffer makes pydicom's reads past the 132-byte preamble reach the file itself.
    monkeypatch.setattr(reader_module, "_CHUNK", 16)
    monkeypatch.setattr(reader_module, "_open_raw", lambda p: _FailingFile(p, fail_from))
    with pytest.raises(OSError) as info:
        read_header(path, salt=SALT)
    assert info.value.errno == errno.EIO
    if fail_from is None:
        with pytest.raises(OSError):
            read_image(path, salt=SALT)
