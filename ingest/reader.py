"""Reading any supported image file: format sniffing by content, limits, and dispatch.

``read_header`` looks without decoding pixels; ``read_image`` decodes. Both map what can go
wrong with a file to the ingest error family, except genuine I/O faults (EIO on a share that
went away), which stay ``OSError`` so the caller retries.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

from bonewatch.ingest import dicom, raster
from bonewatch.ingest.errors import (
    BadFileNameError,
    EmptyFileError,
    FileVanishedError,
    ImageTooLargeError,
    NotAnImageError,
    UnreadableFileError,
)
from bonewatch.ingest.mura import parse_mura_path
from bonewatch.ingest.phi import patient_hash
from bonewatch.ingest.types import DecodedImage, ImageMeta

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8\xff"
_CHUNK = 1 << 20


class _GuardedRaw(io.RawIOBase):
    """A raw file whose I/O errors surface as ``dicom.SourceReadError`` (see its docstring)."""

    def __init__(self, raw: io.FileIO) -> None:
        super().__init__()
        self._raw = raw

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        try:
            return self._raw.readinto(buffer)
        except OSError as exc:
            raise dicom.SourceReadError(exc) from exc

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        try:
            return self._raw.seek(offset, whence)
        except OSError as exc:
            raise dicom.SourceReadError(exc) from exc

    def tell(self) -> int:
        return self._raw.tell()

    @property
    def name(self) -> str | bytes | int:
        # pydicom labels datasets with the stream's name.
        return self._raw.name


def _stat_regular(path: Path) -> os.stat_result:
    """Stat a path that must be a regular file, mapping the usual ways it is not."""
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise FileVanishedError(f"file not found: {path}") from exc
    except PermissionError as exc:
        raise UnreadableFileError(f"permission denied: {path}") from exc
    if stat.S_ISDIR(st.st_mode):
        raise UnreadableFileError(f"is a directory, not a file: {path}")
    if not stat.S_ISREG(st.st_mode):
        # Opening a FIFO or device would block or stream forever.
        raise UnreadableFileError(f"not a regular file: {path}")
    return st


def _open_raw(path: Path) -> io.FileIO:
    try:
        return io.FileIO(path, "r")
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise FileVanishedError(f"file not found: {path}") from exc
    except (PermissionError, IsADirectoryError) as exc:
        raise UnreadableFileError(f"cannot open {path}: {exc.strerror}") from exc


def _check_size(path: Path, size: int, max_bytes: int) -> None:
    if size == 0:
        raise EmptyFileError(f"file has zero bytes: {path}")
    if size > max_bytes:
        raise ImageTooLargeError(
            f"file has {size} bytes, over the limit of {max_bytes} bytes: {path}"
        )


def _read_bounded(path: Path, expected: int, max_bytes: int) -> bytes:
    """Read a whole file, stopping one chunk past ``max_bytes`` if it grew since stat."""
    with io.BufferedReader(_open_raw(path), buffer_size=_CHUNK) as fh:
        # One allocation of the stat size (plus a byte to notice growth), not of max_bytes.
        data = fh.read(expected + 1)
        if len(data) <= expected:
            return data
        chunks = [data]
        total = len(data)
        while total <= max_bytes and (chunk := fh.read(_CHUNK)):
            chunks.append(chunk)
            total += len(chunk)
    return b"".join(chunks)


def _check_pixels(rows: int | None, columns: int | None, max_pixels: int) -> None:
    if rows is None or columns is None:
        return
    if rows * columns > max_pixels:
        raise ImageTooLargeError(
            f"header declares {rows}x{columns} = {rows * columns} pixels, over the limit of "
            f"{max_pixels} pixels"
        )


def printable_path(path: str | Path) -> str:
    """The path as text any database or log can hold: bytes that are not UTF-8 become ``\\xNN``.

    Valid names come back unchanged (``str(path)``).
    """
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _check_name(path: Path) -> None:
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        # A name from a non-UTF-8 file system or a legacy archive: Python keeps the raw bytes as
        # surrogates, which no ledger column can store and no later run could open again.
        raise BadFileNameError(
            f"file name is not valid UTF-8 and cannot be recorded as it is: "
            f"{printable_path(path)}; rename the file"
        ) from None


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks.

    Raises:
        FileVanishedError, UnreadableFileError: The path is gone or not a readable file.
        OSError: A read fault (transient).
    """
    p = Path(path)
    _stat_regular(p)
    digest = hashlib.sha256()
    with _open_raw(p) as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _sniff(fp: BinaryIO) -> str:
    fp.seek(0)
    head = fp.read(132)
    if len(head) == 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(_PNG_SIGNATURE):
        return "png"
    if head.startswith(_JPEG_SOI):
        return "jpeg"
    if dicom.is_dicom(fp):
        return "dicom"
    raise NotAnImageError(f"bytes are not DICOM, PNG or JPEG (starting {head[:8].hex()})")


def _header_fields(fp: BinaryIO, fmt: str, salt: str) -> dict[str, Any]:
    if fmt == "dicom":
        return dicom.read_dicom_header(fp, salt=salt)
    rows, columns = raster.read_raster_size(fp, fmt)
    return {"format": fmt, "rows": rows, "columns": columns}


def _build_meta(path: Path, digest: str, size: int, fields: dict[str, Any], salt: str) -> ImageMeta:
    mura: dict[str, Any] = parse_mura_path(path) or {}
    if fields.get("patient_hash") is None and mura:
        # A MURA-layout path names its patient; keep that only as a salted hash too.
        fields = {**fields, "patient_hash": patient_hash(salt, "mura:" + mura["mura_patient"])}
    return ImageMeta(path=str(path), sha256=digest, size_bytes=size, **fields, **mura)


def read_header(
    path: str | Path,
    *,
    salt: str,
    max_pixels: int = 100_000_000,
    max_bytes: int = 2_000_000_000,
) -> ImageMeta:
    """Identify an image file and read its header, without decoding pixels.

    Args:
        path: The file; its format is told from its bytes, not its name.
        salt: Site secret mixed into ``patient_hash``.
        max_pixels: Largest rows*columns accepted.
        max_bytes: Largest file size accepted.

    Returns:
        The file's ``ImageMeta`` (sha256, size, format, DICOM fields, MURA path fields).

    Raises:
        IngestError: A subclass saying why the file cannot be used; ``BadFileNameError`` for a
            path that is not valid UTF-8, which no ledger could record.
        OSError: A read fault (transient; retry).
    """
    p = Path(path)
    _check_name(p)
    st = _stat_regular(p)
    _check_size(p, st.st_size, max_bytes)
    raw = _open_raw(p)
    try:
        with io.BufferedReader(_GuardedRaw(raw), buffer_size=_CHUNK) as fh:
            digest = hashlib.sha256()
            size = 0
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
            # Re-check on the bytes actually read: the file may have changed since stat.
            _check_size(p, size, max_bytes)
            fmt = _sniff(fh)
            fields = _header_fields(fh, fmt, salt)
    except dicom.SourceReadError as exc:
        raise exc.error from None
    finally:
        raw.close()
    _check_pixels(fields["rows"], fields["columns"], max_pixels)
    return _build_meta(p, digest.hexdigest(), size, fields, salt)


def read_image(
    path: str | Path,
    *,
    salt: str,
    max_pixels: int = 100_000_000,
    max_bytes: int = 2_000_000_000,
) -> DecodedImage:
    """Read and decode an image file to display grey pixels.

    The file is read once into memory, so the sha256 in the meta is that of the bytes decoded.
    Limits are checked on the header before any pixel is decoded.

    Args:
        path: The file (DICOM, PNG or JPEG, told apart by content).
        salt: Site secret mixed into ``patient_hash``.
        max_pixels: Largest rows*columns accepted.
        max_bytes: Largest file size accepted.

    Returns:
        ``DecodedImage`` with float32 (H, W) pixels in [0, 1], 1 = bright (bone).

    Raises:
        IngestError: A subclass saying why the file cannot be used.
        OSError: A read fault (transient; retry).
    """
    p = Path(path)
    st = _stat_regular(p)
    _check_size(p, st.st_size, max_bytes)
    data = _read_bounded(p, st.st_size, max_bytes)
    _check_size(p, len(data), max_bytes)
    stream = io.BytesIO(data)
    fmt = _sniff(stream)
    fields = _header_fields(stream, fmt, salt)
    _check_pixels(fields["rows"], fields["columns"], max_pixels)
    meta = _build_meta(p, hashlib.sha256(data).hexdigest(), len(data), fields, salt)
    if fmt == "dicom":
        pixels = dicom.decode_dicom(data)
    else:
        pixels = raster.decode_raster(data, fmt)
    return DecodedImage(pixels=pixels, meta=meta)
