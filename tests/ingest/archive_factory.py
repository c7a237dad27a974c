"""Archives and non-image files as folders of studies hold them, for the ingest and worker tests.

Every builder writes one file and returns its path; members are given as bytes, so a test says
exactly what each member holds.
"""

from __future__ import annotations

import io
import stat
import struct
import tarfile
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from bonewatch.ingest import make_uid, write_dicom, write_png

BRIGHT = np.full((40, 40), 0.9, np.float32)  # the tiny test bundle calls bright images ELBOW


def dicom_bytes(name: str, pixels: np.ndarray = BRIGHT, **options: object) -> bytes:
    """A CR Part 10 file's bytes, its UIDs derived from ``name``."""
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "image.dcm"
        write_dicom(
            target,
            pixels,
            **{
                "study_uid": make_uid("study", name),
                "series_uid": make_uid("series", name),
                "sop_uid": make_uid("sop", name),
                **options,
            },
        )
        return target.read_bytes()


def png_bytes(value: float = 0.9, side: int = 40) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "image.png"
        write_png(target, np.full((side, side), value, np.float32))
        return target.read_bytes()


def object_without_pixels(sop_class: str, modality: str, **attributes: object) -> bytes:
    """A DICOM object with no image (a plan, a report, a presentation state...)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = modality
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def without_file_meta(part10: bytes) -> bytes:
    """A Part 10 file's dataset alone (no preamble, no file meta), as older systems wrote it."""
    ds = pydicom.dcmread(io.BytesIO(part10))
    ds.preamble = None
    ds.file_meta = FileMetaDataset()
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, implicit_vr=False, little_endian=True)
    data = buffer.getvalue()
    assert data[:2] == b"\x08\x00", "the dataset must start with group 0008"
    return data


# Member kinds that are not files: a folder, a symlink, a device.
FOLDER, LINK, DEVICE = object(), object(), object()


def write_zip(path: Path, members: Mapping[str, bytes | object], *, stored: bool = False) -> Path:
    """A ZIP of ``members`` (name -> bytes, or FOLDER / LINK / DEVICE)."""
    method = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(path, "w", method) as zf:
        for name, content in members.items():
            if content is FOLDER:
                zf.writestr(zipfile.ZipInfo(name.rstrip("/") + "/"), b"")
                continue
            info = zipfile.ZipInfo(name)
            info.compress_type = method
            if content is LINK:
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                zf.writestr(info, b"../../etc/passwd")
            elif content is DEVICE:
                info.external_attr = (stat.S_IFCHR | 0o600) << 16
                zf.writestr(info, b"")
            else:
                assert isinstance(content, bytes)
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                zf.writestr(info, content)
    return path


def write_tar(path: Path, members: Mapping[str, bytes | object], *, mode: str = "w") -> Path:
    """A TAR (``mode`` "w", "w:gz", "w:bz2" or "w:xz") of ``members``."""
    with tarfile.open(path, mode) as tf:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if content is FOLDER:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            elif content is LINK:
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tf.addfile(info)
            elif content is DEVICE:
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
                tf.addfile(info)
            else:
                assert isinstance(content, bytes)
                info.size = len(content)
                tf.addfile(info, io.BytesIO(content))
    return path


def lie_about_size(path: Path, member: str, declared: int) -> Path:
    """Rewrite a ZIP so ``member`` declares ``declared`` inflated bytes (local and central)."""
    data = bytearray(path.read_bytes())
    name = member.encode()
    for signature, size_at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        start = 0
        while (at := data.find(signature, start)) >= 0:
            name_at = at + (30 if signature == b"PK\x03\x04" else 46)
            if data[name_at : name_at + len(name)] == name:
                data[at + size_at : at + size_at + 4] = struct.pack("<I", declared)
            start = at + 4
    path.write_bytes(bytes(data))
    return path


# An OLE2 compound file's signature: Thumbs.db, old Office documents.
OLE_HEADER = bytes.fromhex("d0cf11e0a1b11ae1") + b"\x00" * 504
DS_STORE = b"\x00\x00\x00\x01Bud1" + b"\x00" * 120
