"""An inbox holding one file of every input class, and what the ledger must say about each.

Used by the worker tests, and the source of the README's table of inputs.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import (
    HTJ2KLossless,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    generate_uid,
)

from bonewatch.ingest import TRANSFER_SYNTAXES_WRITABLE, make_uid, write_dicom, write_png

PATIENT_ID = "PID-8675309"
PATIENT_NAME = "Doe^Jane"
RG3_J2KR = get_testdata_file("RG3_J2KR.dcm")
# A file name made of bytes that are not UTF-8 (a legacy archive, a Windows-1252 share).
NOT_UTF8_NAME = os.fsdecode(b"scan \xe9t\xe9.png")


@dataclass(frozen=True)
class Expected:
    """What the ledger must hold for one input: a row with one of ``statuses`` (none = no row)."""

    statuses: frozenset[str]
    error_class: str | None = None
    reason: str | None = None  # a fragment the reason must contain

    @classmethod
    def row(
        cls, *statuses: str, error_class: str | None = None, reason: str | None = None
    ) -> Expected:
        return cls(frozenset(statuses), error_class, reason)


NO_ROW = Expected(frozenset())
BRIGHT = np.full((40, 40), 0.9, np.float32)  # the tiny test bundle calls bright images ELBOW


def _dicom(path: Path, pixels: np.ndarray = BRIGHT, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    name = str(path)
    write_dicom(
        path,
        pixels,
        **{
            "study_uid": make_uid("study", name),
            "series_uid": make_uid("series", name),
            "sop_uid": make_uid("sop", name),
            "patient_id": PATIENT_ID,
            "patient_name": PATIENT_NAME,
            **options,
        },
    )
    return path


def _edit(path: Path, **attributes) -> Path:
    ds = pydicom.dcmread(path)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def _encapsulated(path: Path, codestream: bytes, tsyntax: str, shape: tuple[int, int]) -> Path:
    ds = pydicom.dcmread(_dicom(path))
    ds.file_meta.TransferSyntaxUID = tsyntax
    ds.Rows, ds.Columns = shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)
    return path


def _object_without_pixels(path: Path, sop_class: str, modality: str) -> Path:
    from tests.ingest.archive_factory import object_without_pixels

    data = object_without_pixels(
        sop_class, modality, PatientName=PATIENT_NAME, PatientID=PATIENT_ID
    )
    path.write_bytes(data)
    return path


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _png_bomb(path: Path, side: int = 12000) -> Path:
    compressor = zlib.compressobj(9)
    rows = b"\x00" * (side + 1) * 1000
    idat = b"".join(compressor.compress(rows) for _ in range(side // 1000)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )
    return path


def _twelve_bit(value: float = 0.9, shape: tuple[int, int] = (40, 40)) -> np.ndarray:
    return np.full(shape, int(value * 4095), np.uint16) + (np.arange(shape[1]) % 7).astype(
        np.uint16
    )


def make_every_input(inbox: Path, outside: Path) -> dict[str, Expected]:
    """Fill ``inbox`` with one file of every class; return the expectation for each.

    Keys are paths relative to ``inbox``. ``outside`` is a folder beside the inbox that a
    symlink points into. The unreadable file is ``bad/locked.png``: its mode is 000, which
    stops anyone but root (tests that run as root deny it another way).
    """
    good, bad = inbox / "good", inbox / "bad"
    good.mkdir(parents=True)
    bad.mkdir(parents=True)
    outside.mkdir(parents=True, exist_ok=True)
    expected: dict[str, Expected] = {}
    done = Expected.row("done")

    # --- decoded: every writable transfer syntax, colour-free grey, odd names ------------------
    for i, syntax in enumerate(TRANSFER_SYNTAXES_WRITABLE):
        photometric = "MONOCHROME1" if i % 2 else "MONOCHROME2"
        _dicom(good / f"cr_{i}_{syntax}.dcm", transfer_syntax=syntax, photometric=photometric)
        expected[f"good/cr_{i}_{syntax}.dcm"] = done
    _dicom(good / "dx.dcm", modality="DX", photometric="MONOCHROME1", body_part="HAND")
    expected["good/dx.dcm"] = done
    stored = _twelve_bit()
    _encapsulated(
        good / "jpeg_extended_12bit.dcm",
        imagecodecs.jpeg8_encode(stored, level=95, bitspersample=12),
        JPEGExtended12Bit,
        stored.shape,
    )
    _encapsulated(
        good / "jpeg_lossless.dcm",
        imagecodecs.jpeg8_encode(stored, lossless=True, bitspersample=12),
        JPEGLosslessSV1,
        stored.shape,
    )
    _encapsulated(good / "htj2k.dcm", imagecodecs.htj2k_encode(stored), HTJ2KLossless, stored.shape)
    for name in ("jpeg_extended_12bit.dcm", "jpeg_lossless.dcm", "htj2k.dcm"):
        expected[f"good/{name}"] = done
    write_png(good / "hand AP 1.png", BRIGHT)
    write_png(good / "Röntgen 手.png", np.full((40, 40), 0.8, np.float32))
    write_png(good / "sixteen.png", np.full((40, 40), 0.7, np.float32), bits=16)
    for name in ("hand AP 1.png", "Röntgen 手.png", "sixteen.png"):
        expected[f"good/{name}"] = done
    shutil.copy(RG3_J2KR, good / "RG3_J2KR.dcm")
    # A real lower leg labelled EXTREMITY: decoded, then the model decides.
    expected["good/RG3_J2KR.dcm"] = Expected.row("done", "unsupported")
    (bad / "x.dcm").mkdir()
    write_png(bad / "x.dcm" / "inside.png", np.full((40, 40), 0.95, np.float32))
    expected["bad/x.dcm/inside.png"] = done
    (inbox / "resent").mkdir()
    shutil.copy(good / "hand AP 1.png", inbox / "resent" / "hand again.png")  # after good/
    expected["resent/hand again.png"] = Expected.row("duplicate", reason="same bytes as image")

    # --- refused: what a folder also holds ------------------------------------------------------
    (bad / "empty.dcm").write_bytes(b"")
    expected["bad/empty.dcm"] = Expected.row("failed", error_class="EmptyFileError")
    (bad / "random.dcm").write_bytes(np.random.default_rng(5).bytes(4096))
    expected["bad/random.dcm"] = Expected.row("failed", error_class="NotAnImageError")
    (bad / "notes.txt").write_text("follow-up in two weeks\n")
    expected["bad/notes.txt"] = Expected.row(
        "unsupported", error_class="NonImageFileError", reason="a text file, not an image"
    )
    cut = _dicom(bad / "truncated.dcm", np.random.default_rng(1).random((64, 64)))
    cut.write_bytes(cut.read_bytes()[:-3000])
    expected["bad/truncated.dcm"] = Expected.row(
        "failed", error_class="TruncatedFileError", reason="cut short"
    )
    _object_without_pixels(bad / "report.dcm", "1.2.840.10008.5.1.4.1.1.88.33", "SR")
    expected["bad/report.dcm"] = Expected.row(
        "unsupported", error_class="NoPixelDataError", reason="a structured report (SR), not an"
    )
    _object_without_pixels(bad / "presentation_state.dcm", "1.2.840.10008.5.1.4.1.1.11.1", "PR")
    expected["bad/presentation_state.dcm"] = Expected.row(
        "unsupported", error_class="NoPixelDataError", reason="a presentation state, not an image"
    )
    _object_without_pixels(bad / "no_pixels.dcm", "1.2.840.10008.5.1.4.1.1.88.11", "CR")
    expected["bad/no_pixels.dcm"] = Expected.row(
        "unsupported", error_class="NoPixelDataError", reason="(Basic Text SR Storage, 1.2.840"
    )
    crc = bytearray((good / "hand AP 1.png").read_bytes())
    idat = crc.find(b"IDAT")
    crc[idat + 4 + struct.unpack(">I", crc[idat - 4 : idat])[0]] ^= 0xFF
    (bad / "bad_crc.png").write_bytes(bytes(crc))
    expected["bad/bad_crc.png"] = Expected.row(
        "failed", error_class="CorruptFileError", reason="checksum"
    )
    write_png(bad / "locked.png", BRIGHT)
    (bad / "locked.png").chmod(0)
    expected["bad/locked.png"] = Expected.row(
        "failed", error_class="UnreadableFileError", reason="Permission denied"
    )
    with open(os.fsencode(bad / NOT_UTF8_NAME), "wb") as fh:
        fh.write((good / "sixteen.png").read_bytes()[:-1] + b"\x01")  # not a copy of another
    expected["bad/" + os.fsencode(NOT_UTF8_NAME).decode("utf-8", "backslashreplace")] = (
        Expected.row("failed", error_class="BadFileNameError", reason="not valid UTF-8")
    )
    _edit(_dicom(bad / "ct_slice.dcm"), Modality="CT", SOPClassUID="1.2.840.10008.5.1.4.1.1.2")
    expected["bad/ct_slice.dcm"] = Expected.row(
        "unsupported", error_class="UnsupportedModalityError", reason="modality CT"
    )
    _dicom(bad / "chest.dcm", body_part="CHEST")
    expected["bad/chest.dcm"] = Expected.row(
        "unsupported", error_class="UnsupportedBodyPartError", reason="body part CHEST"
    )
    frames = pydicom.dcmread(_dicom(bad / "cine.dcm", bits_stored=8))
    frames.NumberOfFrames = 3
    frames.PixelData = frames.PixelData * 3
    frames.save_as(bad / "cine.dcm", enforce_file_format=True)
    expected["bad/cine.dcm"] = Expected.row(
        "unsupported", error_class="UnsupportedMultiFrameError", reason="3 frames"
    )
    _edit(_dicom(bad / "huge_header.dcm", bits_stored=8), Rows=60000, Columns=60000)
    expected["bad/huge_header.dcm"] = Expected.row(
        "failed", error_class="ImageTooLargeError", reason="60000x60000"
    )
    with open(bad / "huge_2gib.dcm", "wb") as fh:
        fh.truncate(2**31)  # sparse: claims 2 GiB, occupies nothing
    expected["bad/huge_2gib.dcm"] = Expected.row(
        "failed", error_class="ImageTooLargeError", reason="2147483648 bytes"
    )
    claim = bytearray(_dicom(bad / "claims_2gb.dcm", bits_stored=8).read_bytes())
    tag = claim.rfind(b"\xe0\x7f\x10\x00OB\x00\x00")
    claim[tag + 8 : tag + 12] = struct.pack("<I", 0x7FFFFFF0)
    (bad / "claims_2gb.dcm").write_bytes(bytes(claim))
    expected["bad/claims_2gb.dcm"] = Expected.row(
        "failed", error_class="TruncatedFileError", reason="declares 2147483632 bytes"
    )
    relabel = pydicom.dcmread(shutil.copy(RG3_J2KR, bad / "j2k_part2.dcm"))
    relabel.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.92"
    relabel.SOPInstanceUID = relabel.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    relabel.BodyPartExamined = "HAND"
    relabel.save_as(bad / "j2k_part2.dcm", enforce_file_format=True)
    expected["bad/j2k_part2.dcm"] = Expected.row(
        "unsupported",
        error_class="UnsupportedTransferSyntaxError",
        reason="JPEG 2000 Part 2 Multi-component Image Compression (Lossless Only)",
    )
    _png_bomb(bad / "bomb.png")
    expected["bad/bomb.png"] = Expected.row(
        "failed", error_class="ImageTooLargeError", reason="12000x12000"
    )
    bomb = _twelve_bit()
    codestream = bytearray(imagecodecs.jpeg8_encode(bomb, level=95, bitspersample=12))
    sof = codestream.find(b"\xff\xc1")
    codestream[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)
    _encapsulated(bad / "jpeg_bomb.dcm", bytes(codestream), JPEGExtended12Bit, bomb.shape)
    expected["bad/jpeg_bomb.dcm"] = Expected.row(
        "failed", error_class="CorruptFileError", reason="60000x60000 but the dataset says 40x40"
    )

    # --- never taken: not files of the inbox ----------------------------------------------------
    secret = _dicom(outside / "elsewhere.dcm")
    (bad / "link_out.dcm").symlink_to(secret)
    expected["bad/link_out.dcm"] = NO_ROW
    write_png(bad / ".hidden.png", BRIGHT)
    expected["bad/.hidden.png"] = NO_ROW
    (bad / "upload.png.part").write_bytes(io.BytesIO(b"half a file").getvalue())
    expected["bad/upload.png.part"] = NO_ROW
    os.mkfifo(bad / "pipe.dcm")
    expected["bad/pipe.dcm"] = NO_ROW
    return expected
