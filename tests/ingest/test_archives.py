"""Archives read member by member (streamed, limits per member, names never used as paths),
files that are not images told apart, and datasets without the Part 10 header sniffed."""

from __future__ import annotations

import hashlib
import io
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from bonewatch.ingest import (
    FileChangedError,
    FileVanishedError,
    NonImageFileError,
    NotAnImageError,
    PathFilter,
    UnsupportedArchiveError,
    UnsupportedFormatError,
    iter_candidate_files,
    read_header,
    read_headers,
    read_image,
    split_member_path,
)
from bonewatch.ingest.archives import close_archives, member_name
from bonewatch.ingest.dicom import bare_dataset_start
from tests.ingest.archive_factory import (
    FOLDER,
    dicom_bytes,
    png_bytes,
    without_file_meta,
    write_tar,
    write_zip,
)

SALT = "s"


@pytest.fixture(autouse=True)
def _fresh_archive_cache():
    yield
    close_archives()


def _entries(path: Path, **limits) -> dict[str, object]:
    return {
        entry.path.rsplit("!", 1)[-1] if "!" in entry.path else "(archive)": entry
        for entry in read_headers(path, salt=SALT, **limits)
    }


@pytest.mark.parametrize(
    ("raw", "kept", "unsafe"),
    [
        ("PAT1/IM0001", "PAT1/IM0001", False),
        ("./PAT1//IM0001", "PAT1/IM0001", False),
        ("../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", True),
        ("/etc/passwd", "%2Fetc%2Fpasswd", True),
        ("PAT1\\..\\..\\boot.ini", "PAT1%5C..%5C..%5Cboot.ini", True),
        ("C:evil.dcm", "C%3Aevil.dcm", True),
        ("caf\udce9/x", "caf\\xe9/x", False),  # bytes that are not UTF-8 (a tar's surrogates)
        ("a\nb", "a\\nb", False),
    ],
)
def test_member_names_never_climb_out(raw, kept, unsafe) -> None:
    assert member_name(raw) == (kept, unsafe)
    assert ".." not in Path(f"/in/a.zip!{member_name(raw)[0]}").parts


def test_members_are_read_where_they_lie_in_any_order(tmp_path) -> None:
    members = {f"S/{k:02d}": png_bytes(0.5 + k / 100) for k in range(12)}
    for name, mode in (("a.zip", None), ("a.tar", "w"), ("a.tar.gz", "w:gz"), ("a.tar.xz", "w:xz")):
        archive = tmp_path / name
        write_zip(archive, members) if mode is None else write_tar(archive, members, mode=mode)
        listed = [e for e in read_headers(archive, salt=SALT) if e.meta is not None]
        assert [e.path for e in listed] == [f"{archive}!{m}" for m in members]
        for k in (11, 3, 4, 0, 11, 7):  # backwards too: a compressed TAR restarts or keeps it
            image = read_image(f"{archive}!S/{k:02d}", salt=SALT, sha256=listed[k].sha256)
            assert image.meta.sha256 == hashlib.sha256(members[f"S/{k:02d}"]).hexdigest()
            assert image.meta.path == f"{archive}!S/{k:02d}"
        assert read_header(f"{archive}!S/05", salt=SALT).rows == 40


def test_a_member_with_other_bytes_or_gone_is_refused(tmp_path) -> None:
    archive = write_zip(tmp_path / "a.zip", {"x.png": png_bytes(0.5)})
    (entry,) = read_headers(archive, salt=SALT)
    write_zip(archive, {"x.png": png_bytes(0.6)})  # replaced under the same name
    with pytest.raises(FileChangedError):
        read_image(f"{archive}!x.png", salt=SALT, sha256=entry.sha256)
    write_zip(archive, {"y.png": png_bytes(0.6)})
    with pytest.raises(FileVanishedError):
        read_image(f"{archive}!x.png", salt=SALT)


def test_a_file_named_with_a_bang_is_a_file(tmp_path) -> None:
    odd = tmp_path / "wow!.png"
    odd.write_bytes(png_bytes())
    assert split_member_path(odd) is None
    assert read_image(odd, salt=SALT).pixels.shape == (40, 40)
    archive = write_zip(tmp_path / "x!y.zip", {"a!b.png": png_bytes()})
    assert split_member_path(f"{archive}!a!b.png") == (archive, "a!b.png")


def test_limits_hold_per_member_and_bombs_cost_nothing(tmp_path) -> None:
    zeros = b"\0" * 50_000_000  # deflates to 50 kB
    archive = write_zip(tmp_path / "bomb.zip", {"big.dcm": zeros, "ok.png": png_bytes()})
    tgz = write_tar(tmp_path / "bomb.tgz", {"big.dcm": zeros, "ok.png": png_bytes()}, mode="w:gz")
    del zeros
    for path in (archive, tgz):
        tracemalloc.start()
        entries = _entries(path, max_bytes=1_000_000)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert entries["ok.png"].meta is not None
        error = entries["big.dcm"].error
        assert error.status == "failed" and type(error).__name__ == "ImageTooLargeError"
        assert "50000000 bytes, over the limit of 1000000 bytes" in error.reason
        assert peak < 4_000_000, peak  # never the 50 MB member, nor a tenth of it


def test_a_member_that_inflates_past_what_it_declares_stops_at_the_limit(tmp_path) -> None:
    # A TAR declares exactly what it holds; a ZIP may lie, and zipfile stops at the declared
    # size (then the checksum fails): either way no more than the limit is ever inflated.
    from tests.ingest.archive_factory import lie_about_size

    archive = write_zip(tmp_path / "liar.zip", {"liar.dcm": b"\1" * 3_000_000})
    lie_about_size(archive, "liar.dcm", 500)
    (entry,) = read_headers(archive, salt=SALT, max_bytes=1_000_000)
    assert entry.error.status == "failed" and "checksum" in entry.error.reason


def test_overlapping_zip_members_are_refused_as_a_whole(tmp_path) -> None:
    # The overlapping-file construction: many central entries pointing at one local record.
    kernel = zipfile.ZipInfo("k")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(kernel, b"\0" * 1_000_000)
    data = bytearray(buffer.getvalue())
    central = data.find(b"PK\x01\x02")
    end = data.find(b"PK\x05\x06")
    entry = bytes(data[central:end])
    copies = [entry.replace(b"k", bytes([ord("a") + n]), 1) for n in range(20)]
    directory = b"".join(copies)
    record = bytearray(data[end:])
    record[8:10] = record[10:12] = (20).to_bytes(2, "little")
    record[12:16] = len(directory).to_bytes(4, "little")
    bomb = tmp_path / "overlap.zip"
    bomb.write_bytes(bytes(data[:central]) + directory + bytes(record))
    entries = list(read_headers(bomb, salt=SALT))
    assert len(entries) == 1 and entries[0].path == str(bomb)
    assert type(entries[0].error).__name__ == "ImageTooLargeError"
    assert "overlap" in entries[0].error.reason


def test_archive_level_refusals(tmp_path) -> None:
    empty = write_zip(tmp_path / "empty.zip", {"A/": FOLDER})
    folder, row = read_headers(empty, salt=SALT)
    assert folder.skipped == "folder" and folder.path == f"{empty}!A"
    assert row.path == str(empty)  # an archive with no file in it still gets its row
    assert isinstance(row.error, UnsupportedArchiveError) and "no files" in row.error.reason
    docx = write_zip(tmp_path / "letter.docx", {"[Content_Types].xml": b"<x/>", "word/d": b"x"})
    (row,) = read_headers(docx, salt=SALT)
    assert isinstance(row.error, NonImageFileError) and row.error.reason.startswith(
        "an Office document"
    )
    cut = write_tar(
        tmp_path / "cut.tar.gz", {"a.png": png_bytes(), "b.png": png_bytes(0.2)}, mode="w:gz"
    )
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    member, archive = read_headers(cut, salt=SALT)
    assert member.path == f"{cut}!a.png" and "ends inside this member" in member.error.reason
    assert archive.path == str(cut) and archive.error.status == "failed"
    assert "cut short after 1 entries" in archive.error.reason
    seven = tmp_path / "x.7z"
    seven.write_bytes(b"7z\xbc\xaf\x27\x1c" + b"\0" * 40)
    with pytest.raises(UnsupportedArchiveError, match="7-Zip"):
        read_header(seven, salt=SALT)
    with pytest.raises(UnsupportedArchiveError, match="members one by one"):
        read_header(empty, salt=SALT)


@pytest.mark.parametrize(
    ("name", "content", "kind", "says"),
    [
        ("notes.txt", b"follow-up in two weeks\n", NonImageFileError, "a text file"),
        ("notes.dcm", "Befund: unauffällig\n".encode(), NonImageFileError, "a text file"),
        ("list.csv", b"a;b\n1;2\n", NonImageFileError, "a CSV table"),
        ("export", b"id,part,view\n1,HAND,PA\n2,WRIST,LAT\n3,", NonImageFileError, "a CSV table"),
        ("index.htm", b"\n <!DOCTYPE HTML>\n<html>", NonImageFileError, "an HTML page"),
        ("a.xml", b"<?xml version='1.0'?><a/>", NonImageFileError, "an XML file"),
        ("m.json", b'[{"a": 1}]', NonImageFileError, "a JSON file"),
        ("u16.txt", "hello".encode("utf-16"), NonImageFileError, "a text file"),
        ("r.pdf", b"%PDF-1.7\n", NonImageFileError, "a PDF document"),
        ("x.gz", b"\x1f\x8b\x08\x00" + b"\0" * 30, NonImageFileError, "gzip-compressed data"),
        ("a.gif", b"GIF89a" + b"\0" * 30, UnsupportedFormatError, "a GIF image"),
        ("a.tif", b"II*\x00" + b"\0" * 30, UnsupportedFormatError, "a TIFF image"),
        ("BMI report", b"BMI 21.4, normal\n", NonImageFileError, "a text file"),
        ("a.dcm", bytes(range(7, 255)), NotAnImageError, "no known image signature"),
    ],
)
def test_files_that_are_not_images_say_what_they_are(tmp_path, name, content, kind, says) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(kind) as info:
        read_header(path, salt=SALT)
    assert says in info.value.reason
    assert info.value.status == ("failed" if kind is NotAnImageError else "unsupported")


def test_a_dataset_without_preamble_and_file_meta_is_read(tmp_path) -> None:
    part10 = dicom_bytes("bare", np.full((40, 40), 0.9, np.float32))
    bare = tmp_path / "bare.dcm"
    bare.write_bytes(without_file_meta(part10))
    with_meta = read_image(_write(tmp_path / "meta.dcm", part10), salt=SALT)
    image = read_image(bare, salt=SALT)
    assert image.meta.format == "dicom" and image.meta.modality == "CR"
    np.testing.assert_array_equal(image.pixels, with_meta.pixels)
    # pydicom's no_meta.dcm: CT_small's dataset after one stray pad byte
    no_meta = open(get_testdata_file("no_meta.dcm"), "rb").read()
    assert bare_dataset_start(no_meta[:4096]) == 1
    meta = read_header(get_testdata_file("no_meta.dcm"), salt=SALT)
    assert (meta.modality, meta.rows, meta.columns) == ("CT", 128, 128)
    # group 0008 bytes followed by prose are not taken for a dataset
    fake = b"\x08\x00\x05\x00hello world, not a dataset at all"
    assert bare_dataset_start(fake) is None


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_include_and_exclude_globs() -> None:
    chosen = PathFilter.of("*.dcm, PAT*/*", ["*/scratch/*", "DICOMDIR"])
    assert chosen.takes_file("/in/a.DCM")
    assert chosen.takes_file("/in/PAT1/IM0001")
    assert not chosen.takes_file("/in/notes.txt")
    assert chosen.takes_file("/in/studies.ZIP")  # archives are opened whatever --include says
    assert not chosen.takes_file("/in/scratch/a.dcm")
    assert not chosen.takes_member("/in/cd.zip!DICOMDIR")
    assert chosen.takes_member("/in/cd.zip!PAT2/IM0001")
    assert not chosen.takes_member("/in/cd.zip!notes.txt")
    assert not PathFilter.of("", "")


def test_iter_candidate_files_filters_and_reports_what_it_leaves_out(tmp_path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    for name in ("a.dcm", "b.txt"):
        (tmp_path / "in" / name).write_bytes(b"x")
    (tmp_path / "in" / "link.dcm").symlink_to(tmp_path / "out")
    skipped: list[tuple[str, str]] = []
    found = iter_candidate_files(
        [tmp_path / "in"], exclude="*.txt", on_skip=lambda p, why: skipped.append((p.name, why))
    )
    assert [p.name for p in found] == ["a.dcm"]
    assert sorted(skipped) == [("b.txt", "excluded"), ("link.dcm", "link outside")]


def test_an_encrypted_member_is_unsupported(tmp_path) -> None:
    archive = write_zip(tmp_path / "locked.zip", {"x.dcm": dicom_bytes("locked")})
    data = bytearray(archive.read_bytes())
    for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        data[data.find(signature) + flags_at] |= 1  # the "encrypted" flag bit
    archive.write_bytes(bytes(data))
    (entry,) = read_headers(archive, salt=SALT)
    assert isinstance(entry.error, UnsupportedArchiveError)
    assert entry.error.reason == "the member is encrypted; bonewatch has no password"


def test_a_mura_layout_inside_an_archive_is_read_as_one(tmp_path) -> None:
    archive = write_zip(
        tmp_path / "MURA.zip", {"XR_WRIST/patient00007/study1_positive/image1.png": png_bytes()}
    )
    (entry,) = read_headers(archive, salt=SALT)
    assert (entry.meta.mura_part, entry.meta.mura_label) == ("WRIST", 1)
    assert entry.meta.mura_study == "XR_WRIST/patient00007/study1_positive"
