"""Reading any supported image file: format sniffing by content, limits, and dispatch.

``read_header`` looks without decoding pixels; ``read_image`` decodes. Both map what can go
wrong with a file to the ingest error family, except genuine I/O faults (EIO on a share that
went away), which stay ``OSError`` so the caller retries.

Files come from an untrusted inbox: each is opened once, never through a symlink, and only a
regular file with a single link is read (checked on the open handle: a hard link can make a file
from outside the inbox appear in it); everything after comes from that handle.
Reasons say what is wrong without the file's bytes or its path (the ledger keeps the path
beside the reason).
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from bonewatch.ingest import archives, dicom, raster, reduced
from bonewatch.ingest.errors import (
    BadFileNameError,
    EmptyFileError,
    FileChangedError,
    FileVanishedError,
    ImageTooLargeError,
    IngestError,
    NonImageFileError,
    NotAnImageError,
    UnreadableFileError,
    UnsafeArchiveMemberError,
    UnsupportedArchiveError,
    UnsupportedFormatError,
)
from bonewatch.ingest.mura import parse_mura_path
from bonewatch.ingest.phi import patient_hash
from bonewatch.ingest.types import DecodedImage, ImageMeta

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8\xff"
_CHUNK = 1 << 20
# Bytes looked at to tell what a file is (a TAR header is 512, text is judged on its start).
_SNIFF_BYTES = 4096


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

    def close(self) -> None:
        self._raw.close()
        super().close()

    # No ``name``: a library that learns the path may open it again by name (pydicom reads a
    # deferred element that way), which would read whatever the name leads to by then.


# No symlink is followed and nothing but a regular file is read: O_NOFOLLOW refuses a link in
# the last component (ELOOP), O_NONBLOCK keeps a FIFO from blocking the open (O_NOCTTY a terminal
# from becoming ours), and the open handle is checked with fstat, so a file swapped in after a
# stat of the name is never read.
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

FileId = tuple[int, int]  # (st_dev, st_ino) of a file as a scan or a registration saw it


def _opener(path: str, flags: int) -> int:
    return os.open(path, flags | _OPEN_FLAGS)


def _open_raw(path: Path) -> io.FileIO:
    """Open ``path`` for reading without following a symlink or blocking; map the refusals.

    Reasons never carry the path: it is recorded beside them already.
    """
    try:
        return io.FileIO(path, "r", opener=_opener)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise FileVanishedError("file not found") from exc
    except IsADirectoryError as exc:
        raise UnreadableFileError("is a directory, not a file") from exc
    except PermissionError as exc:
        raise UnreadableFileError(f"cannot open the file: {exc.strerror}") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnreadableFileError(
                "is a symbolic link; bonewatch never follows links to the files it reads"
            ) from exc
        if exc.errno == errno.ENXIO:  # a socket, or a device without its driver
            raise UnreadableFileError("not a regular file") from exc
        raise


def _open_regular(path: Path, file_id: FileId | None) -> tuple[io.FileIO, os.stat_result]:
    """Open ``path`` and check the handle: a regular file, and the one the caller saw if known.

    Raises:
        UnreadableFileError: A symlink, directory, FIFO, socket or device, or a regular file
            with more than one hard link.
        FileChangedError: ``file_id`` is given and another file now has the name.
    """
    raw = _open_raw(path)
    try:
        st = os.fstat(raw.fileno())
        if stat.S_ISDIR(st.st_mode):
            raise UnreadableFileError("is a directory, not a file")
        if not stat.S_ISREG(st.st_mode):
            # A FIFO or device would block or stream forever; O_NONBLOCK got us this far.
            raise UnreadableFileError("not a regular file")
        if st.st_nlink > 1:
            # A hard link shares its inode with a name elsewhere, perhaps outside the inbox
            # (another patient's image, a file no one meant to send): O_NOFOLLOW cannot tell.
            raise UnreadableFileError(
                f"the file has {st.st_nlink} hard links, so its bytes may belong to a file "
                "outside the inbox; bonewatch reads only files with one link: copy it in "
                "rather than linking it"
            )
        if file_id is not None and (st.st_dev, st.st_ino) != tuple(file_id):
            raise FileChangedError(
                "another file has taken this name since it was seen; the new one is read "
                "when it is seen itself"
            )
        os.set_blocking(raw.fileno(), True)  # a regular file: plain reads from here on
    except BaseException:
        raw.close()
        raise
    return raw, st


def _check_size(size: int, max_bytes: int) -> None:
    if size == 0:
        raise EmptyFileError("file has zero bytes")
    if size > max_bytes:
        raise ImageTooLargeError(f"file has {size} bytes, over the limit of {max_bytes} bytes")


def _read_bounded(raw: io.FileIO, expected: int, max_bytes: int) -> bytes:
    """Read a whole open file, stopping one chunk past ``max_bytes`` if it grew since fstat."""
    with io.BufferedReader(raw, buffer_size=_CHUNK) as fh:
        # One allocation of the fstat size (plus a byte to notice growth), not of max_bytes.
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
            "file name is not valid UTF-8 and cannot be recorded as it is (the ledger keeps it "
            "with the odd bytes escaped); rename the file"
        ) from None


def sha256_file(path: str | Path, *, file_id: FileId | None = None) -> str:
    """Hex sha256 of a file's bytes, read in chunks (never through a symlink).

    Raises:
        FileVanishedError, UnreadableFileError: The path is gone or not a regular file.
        FileChangedError: ``file_id`` is given and is not the file's.
        OSError: A read fault (transient).
    """
    raw, _ = _open_regular(Path(path), file_id)
    digest = hashlib.sha256()
    with raw:
        while chunk := raw.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _sniff(fp: BinaryIO, max_bytes: int, name: str | None = None) -> str:
    """The image format of a stream ("dicom", "png" or "jpeg"), told from its bytes.

    Raises:
        NonImageFileError: Plainly no image (text, CSV, HTML, JSON, PDF, Thumbs.db, ...).
        NoPixelDataError: Not raised here; DICOM objects without images are told apart when
            their header is read.
        UnsupportedFormatError: An image in a format bonewatch does not read.
        UnsupportedArchiveError: An archive (``read_headers`` reads their members).
        NotAnImageError: Bytes nothing recognises.
    """
    fp.seek(0)
    head = fp.read(_SNIFF_BYTES)
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(_PNG_SIGNATURE):
        return "png"
    if head.startswith(_JPEG_SOI):
        return "jpeg"
    fmt = archives.archive_format(head, fp)
    if fmt is not None:
        raise UnsupportedArchiveError(
            f"{fmt.label}: `bonewatch process` reads its members one by one; one file at a "
            "time it is not read"
        )
    if dicom.is_dicom(fp, max_inflated=max_bytes):
        return "dicom"
    raise _not_an_image(head, name)


# Formats a folder of images also holds, by their signature: named, never quoted.
_OTHER_IMAGES: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"\x00\x00\x00\x0cjP  \r\n", "a JPEG 2000 file (not wrapped in DICOM)"),
    (b"\xffO\xffQ", "a JPEG 2000 codestream (not wrapped in DICOM)"),
)
_OTHER_FILES: tuple[tuple[bytes, str], ...] = (
    (b"%PDF", "a PDF document"),
    (b"\x00\x00\x00\x01Bud1", "a macOS folder settings file (.DS_Store)"),
    (b"\x00\x05\x16\x07", "a macOS resource fork (an AppleDouble ._ file)"),
    (b"{\\rtf", "an RTF document"),
)
_OTHER_ARCHIVES: tuple[tuple[bytes, str], ...] = (
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"Rar!\x1a\x07", "a RAR archive"),
)
_OLE = bytes.fromhex("d0cf11e0a1b11ae1")  # OLE2 compound file: Thumbs.db, old Office files
_BMP_HEADER_SIZES = (12, 40, 52, 56, 64, 108, 124)
_HTML = re.compile(r"^(<!doctype html|<html|<head|<body|<meta|<!--)", re.IGNORECASE)
_CSV_DELIMITERS = (",", ";", "\t", "|")


def _not_an_image(head: bytes, name: str | None) -> IngestError:
    """Why a file no image reader took is not read: what it is, without a byte of its content.

    Known kinds of file are ``unsupported`` (they are valid, just not images bonewatch reads);
    bytes nothing recognises stay ``failed`` (a damaged image, most likely).
    """
    lower = (name or "").lower()
    for signature, label in _OTHER_IMAGES:
        if head.startswith(signature):
            return UnsupportedFormatError(f"{label}; bonewatch reads DICOM, PNG and JPEG")
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return UnsupportedFormatError("a WebP image; bonewatch reads DICOM, PNG and JPEG")
    if head.startswith(b"BM") and len(head) >= 18:
        if struct.unpack_from("<I", head, 14)[0] in _BMP_HEADER_SIZES:
            return UnsupportedFormatError("a BMP image; bonewatch reads DICOM, PNG and JPEG")
    if head.startswith(_OLE):
        if lower in ("thumbs.db", "ehthumbs.db"):
            return NonImageFileError("a Windows thumbnail cache (Thumbs.db), not an image")
        return NonImageFileError(
            "an OLE compound file (an old Office document or a Thumbs.db), not an image"
        )
    for signature, label in _OTHER_FILES:
        if head.startswith(signature):
            return NonImageFileError(f"{label}, not an image")
    for signature, label in _OTHER_ARCHIVES:
        if head.startswith(signature):
            return UnsupportedArchiveError(
                f"{label}; bonewatch reads ZIP and TAR archives: unpack it, or repack it as ZIP"
            )
    compressed = archives.compressed_data_label(head)
    if compressed:
        return NonImageFileError(f"{compressed}, not an image")
    text = _as_text(head)
    if text is not None:
        return NonImageFileError(f"{_text_kind(text, lower)}, not an image")
    return NotAnImageError(
        "the file is not DICOM, PNG or JPEG: its bytes match no known image signature"
    )


def _as_text(head: bytes) -> str | None:
    """The start of a file as text, if it is text (UTF-8, or UTF-16 with its BOM); else None."""
    if not head:
        return None
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = head[: len(head) // 2 * 2].decode("utf-16", "ignore")
    else:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError as exc:
            # A multi-byte character cut at the end of the sample is still text.
            if exc.start < len(head) - 3:
                return None
            text = head[: exc.start].decode("utf-8")
    text = text.removeprefix("\ufeff")
    if text.strip() and all(ch.isprintable() or ch in "\t\r\n\f" for ch in text):
        return text
    return None


def _text_kind(text: str, lower_name: str) -> str:
    """What a text file is, by its start (and its name, for CSV)."""
    start = text.lstrip()
    if _HTML.match(start):
        return "an HTML page"
    if start.startswith("<?xml") or (start.startswith("<") and ">" in start):
        return "an XML file"
    if start[:1] in "{[" and (lower_name.endswith(".json") or start[1:].lstrip()[:1] in '"{[]}'):
        return "a JSON file"
    if lower_name.endswith((".csv", ".tsv")):
        return "a CSV table"
    lines = [line for line in text.splitlines()[:6] if line.strip()]
    complete = lines[:-1] if len(lines) > 2 else lines  # the last line may be cut
    for delimiter in _CSV_DELIMITERS:
        counts = {line.count(delimiter) for line in complete}
        if len(complete) >= 2 and len(counts) == 1 and counts.pop() >= 1:
            return "a CSV table"
    return "a text file"


def _header_fields(fp: BinaryIO, fmt: str, salt: str, max_bytes: int) -> dict[str, Any]:
    if fmt == "dicom":
        return dicom.read_dicom_header(fp, salt=salt, max_inflated=max_bytes)
    rows, columns = raster.read_raster_size(fp, fmt)
    return {"format": fmt, "rows": rows, "columns": columns}


def _build_meta(
    path: str | Path, digest: str, size: int, fields: dict[str, Any], salt: str
) -> ImageMeta:
    # An archive member's path ("studies.zip!XR_WRIST/patient1/...") reads as a MURA path too,
    # the archive counting as a folder.
    layout = os.fspath(path).replace(archives.MEMBER_SEPARATOR, "/")
    mura: dict[str, Any] = parse_mura_path(layout) or {}
    if fields.get("patient_hash") is None and mura:
        # A MURA-layout path names its patient; keep that only as a salted hash too.
        fields = {**fields, "patient_hash": patient_hash(salt, "mura:" + mura["mura_patient"])}
    return ImageMeta(path=os.fspath(path), sha256=digest, size_bytes=size, **fields, **mura)


def read_header(
    path: str | Path,
    *,
    salt: str,
    max_pixels: int = 100_000_000,
    max_bytes: int = 2_000_000_000,
    file_id: FileId | None = None,
) -> ImageMeta:
    """Identify an image file and read its header, without decoding pixels.

    The file is opened once, without following a symlink, and everything (size, sha256, header)
    comes from that one open handle.

    Args:
        path: The file; its format is told from its bytes, not its name.
        salt: Site secret mixed into ``patient_hash``.
        max_pixels: Largest rows*columns accepted.
        max_bytes: Largest file size accepted, and largest a deflated DICOM dataset may inflate
            to.
        file_id: (st_dev, st_ino) of the file as the caller's scan saw it, when known.

    Returns:
        The file's ``ImageMeta`` (sha256, size, format, DICOM fields, MURA path fields).

    Raises:
        IngestError: A subclass saying why the file cannot be used; ``BadFileNameError`` for a
            path that is not valid UTF-8, which no ledger could record; ``UnreadableFileError``
            for a symlink, FIFO, device or directory; ``FileChangedError`` when ``file_id`` is
            not the open file's.
        OSError: A read fault (transient; retry).
    """
    member = archives.split_member_path(path)
    if member is not None:
        data = _member_bytes(member, max_bytes=max_bytes, sha256=None)
        return _meta_of_bytes(os.fspath(path), data, salt, max_pixels, max_bytes)
    p = Path(path)
    _check_name(p)
    raw, st = _open_regular(p, file_id)
    try:
        _check_size(st.st_size, max_bytes)
        with io.BufferedReader(_GuardedRaw(raw), buffer_size=_CHUNK) as fh:
            digest = hashlib.sha256()
            size = 0
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
            # Re-check on the bytes actually read: the file may have grown since fstat.
            _check_size(size, max_bytes)
            fmt = _sniff(fh, max_bytes, p.name)
            fields = _header_fields(fh, fmt, salt, max_bytes)
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
    sha256: str | None = None,
    file_id: FileId | None = None,
    max_side: int | None = raster.MAX_DECODED_SIDE,
    min_side: int | None = None,
) -> DecodedImage:
    """Read and decode an image file to display grey pixels.

    The file is opened once, without following a symlink, and read once into memory, so the
    sha256 in the meta is that of the bytes decoded. With ``sha256`` (the registered digest),
    bytes that differ are refused before anything parses them. Limits are checked on the header
    before any pixel is decoded.

    Args:
        path: The file (DICOM, PNG or JPEG, told apart by content).
        salt: Site secret mixed into ``patient_hash``.
        max_pixels: Largest rows*columns accepted.
        max_bytes: Largest file size accepted, and largest a deflated DICOM dataset may inflate
            to.
        sha256: Hex digest the bytes must have (the one registered), when known.
        file_id: (st_dev, st_ino) the file must have, when known.
        max_side: An image longer than this on a side is reduced by the smallest whole factor
            that fits it (averaging blocks of pixels) while it is decoded; None keeps every
            pixel. Images within it decode exactly as without it.
        min_side: JPEG 2000 and JPEG are decoded at the smallest resolution level or DCT
            scale whose long side still covers twice this (the largest model input); None
            decodes in full. A reduction that fails falls back to full decoding (logged once).

    Returns:
        ``DecodedImage`` with float32 (H, W) pixels in [0, 1], 1 = bright (bone); ``meta.rows``
        and ``meta.columns`` stay those of the header when the pixels were reduced, and
        ``grid`` says where the reduced pixels lie (preprocessing resizes through it).

    Raises:
        IngestError: A subclass saying why the file cannot be used; ``FileChangedError`` when
            ``sha256`` or ``file_id`` does not match.
        OSError: A read fault (transient; retry).
    """
    member = archives.split_member_path(path)
    if member is not None:
        # A member of an archive: read from the archive, checked against the registered digest.
        data = _member_bytes(member, max_bytes=max_bytes, sha256=sha256)
    else:
        raw, st = _open_regular(Path(path), file_id)
        try:
            _check_size(st.st_size, max_bytes)
            data = _read_bounded(raw, st.st_size, max_bytes)
        finally:
            raw.close()
    _check_size(len(data), max_bytes)
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256:
        raise FileChangedError(
            "the file changed after it was registered; its new content is registered as a "
            "separate image when it is seen again"
        )
    stream = io.BytesIO(data)
    fmt = _sniff(stream, max_bytes, _base_name(path))
    fields = _header_fields(stream, fmt, salt, max_bytes)
    _check_pixels(fields["rows"], fields["columns"], max_pixels)
    meta = _build_meta(os.fspath(path), digest, len(data), fields, salt)
    grid = None
    if fmt == "dicom":
        pixels, grid = dicom.decode_dicom_on_grid(
            data, max_inflated=max_bytes, max_side=max_side, min_side=min_side
        )
    else:
        reduced_jpeg = reduced.jpeg_file_reduced(data, min_side) if fmt == "jpeg" else None
        if reduced_jpeg is None:
            pixels = raster.decode_raster(data, fmt, max_side=max_side)
        else:
            pixels, grid = reduced_jpeg
    return DecodedImage(pixels=pixels, meta=meta, grid=grid)


def _base_name(path: str | Path) -> str:
    """A file's or member's own name (after the last ``/`` or ``!``)."""
    text = os.fspath(path)
    return text[max(text.rfind("/"), text.rfind(archives.MEMBER_SEPARATOR)) + 1 :]


def _meta_of_bytes(path: str, data: bytes, salt: str, max_pixels: int, max_bytes: int) -> ImageMeta:
    """The header of an image held in memory (an archive member)."""
    _check_size(len(data), max_bytes)
    stream = io.BytesIO(data)
    return _meta_of_stream(
        path, stream, hashlib.sha256(data).hexdigest(), len(data), salt, max_pixels, max_bytes
    )


def _meta_of_stream(
    path: str, fp: BinaryIO, digest: str, size: int, salt: str, max_pixels: int, max_bytes: int
) -> ImageMeta:
    fmt = _sniff(fp, max_bytes, _base_name(path))
    fields = _header_fields(fp, fmt, salt, max_bytes)
    _check_pixels(fields["rows"], fields["columns"], max_pixels)
    return _build_meta(path, digest, size, fields, salt)


def _open_archive(path: Path) -> tuple[BinaryIO, os.stat_result]:
    """An archive opened as every input is (no symlink, a regular file), buffered and guarded."""
    raw, st = _open_regular(path, None)
    return io.BufferedReader(_GuardedRaw(raw), buffer_size=_CHUNK), st


def _member_bytes(member: tuple[Path, str], *, max_bytes: int, sha256: str | None) -> bytes:
    archive, name = member
    try:
        return archives.read_member(
            archive, name, max_bytes=max_bytes, sha256=sha256, opener=_open_archive
        )
    except dicom.SourceReadError as exc:
        raise exc.error from None


@dataclass(frozen=True)
class HeaderEntry:
    """One thing :func:`read_headers` found: a file, an archive member, or a skipped entry.

    ``path`` is the file's path, or ``ARCHIVE!MEMBER`` for a member. Exactly one of ``meta``
    (readable) and ``error`` (refused) is set, unless ``skipped`` says why the entry gets no
    row (``folder``, ``link``, ``special`` for archive entries that are no files, ``excluded``
    for members --include/--exclude leave out). ``sha256`` and ``size_bytes`` are those of a
    refused member's bytes when they were read; for a file (``member`` False) the caller
    fingerprints a refused file itself. An error on an archive as a whole (damaged, empty, a
    document) is an entry for the archive's own path.
    """

    path: str
    meta: ImageMeta | None = None
    error: IngestError | None = None
    member: bool = False
    sha256: str | None = None
    size_bytes: int | None = None
    skipped: str | None = None


def read_headers(
    path: str | Path,
    *,
    salt: str,
    max_pixels: int = 100_000_000,
    max_bytes: int = 2_000_000_000,
    wanted: Callable[[str], bool] | None = None,
) -> Iterator[HeaderEntry]:
    """The header of a file, or of every member of an archive (ZIP, TAR, compressed TAR).

    A plain file gives one entry, as :func:`read_header` reads it. An archive gives one entry per
    member, read in the archive's order, each member streamed into memory or an anonymous
    temporary file (never extracted) with the limits applied to it alone; folders, links and
    devices are skipped entries; an archive inside the archive is refused (one level).

    Args:
        path: A file, perhaps an archive (told from its bytes).
        salt, max_pixels, max_bytes: As for :func:`read_header`, per member.
        wanted: Called with a member's ledger path; False leaves the member out unread.

    Yields:
        ``HeaderEntry`` values; nothing is raised for a bad file or member.

    Raises:
        OSError: A read fault (transient; retry the whole file).
    """
    p = Path(path)
    try:
        _check_name(p)
        raw, _ = _open_regular(p, None)
    except IngestError as exc:
        yield HeaderEntry(printable_path(p), error=exc)
        return
    try:
        with io.BufferedReader(_GuardedRaw(raw), buffer_size=_CHUNK) as fh:
            head = fh.read(_SNIFF_BYTES)
            # A Part 10 file is DICOM whatever its preamble holds (a TIFF or ZIP header, even).
            dicm = len(head) >= 132 and head[128:132] == b"DICM"
            fmt = None if dicm else archives.archive_format(head, fh)
            if fmt is not None:
                yield from _archive_entries(p, fh, fmt, salt, max_pixels, max_bytes, wanted)
                return
    except dicom.SourceReadError as exc:
        raise exc.error from None
    finally:
        raw.close()
    try:
        yield HeaderEntry(
            str(p), meta=read_header(p, salt=salt, max_pixels=max_pixels, max_bytes=max_bytes)
        )
    except IngestError as exc:
        yield HeaderEntry(str(p), error=exc)


def _archive_entries(
    path: Path,
    fh: BinaryIO,
    fmt: archives.ArchiveFormat,
    salt: str,
    max_pixels: int,
    max_bytes: int,
    wanted: Callable[[str], bool] | None,
) -> Iterator[HeaderEntry]:
    files = skipped = excluded = 0
    try:
        for member in archives.iter_members(fh, fmt):
            where = archives.member_path(str(path), member.name)
            if member.kind != "file":
                skipped += 1
                yield HeaderEntry(where, member=True, skipped=member.kind)
                continue
            if wanted is not None and not wanted(where):
                excluded += 1
                yield HeaderEntry(where, member=True, skipped="excluded")
                continue
            files += 1
            yield _member_entry(where, member, salt, max_pixels, max_bytes)
    except IngestError as exc:
        yield HeaderEntry(str(path), error=exc)
        return
    if not files and not excluded:  # an empty archive still gets its row: nothing is lost
        yield HeaderEntry(
            str(path),
            error=UnsupportedArchiveError(
                f"{fmt.label} with no files in it ({skipped} other entries skipped)"
            ),
        )


def _member_entry(
    where: str, member: archives.Member, salt: str, max_pixels: int, max_bytes: int
) -> HeaderEntry:
    if member.unsafe:
        return HeaderEntry(
            where,
            member=True,
            error=UnsafeArchiveMemberError(
                "the member's name is absolute or climbs out of the archive with '..'; "
                "bonewatch neither reads it nor uses its name as a path (kept escaped here)"
            ),
        )
    try:
        spool, digest, size = archives.spool_member(member, max_bytes)
    except IngestError as exc:
        return HeaderEntry(where, member=True, error=exc)
    with spool:
        try:
            _check_size(size, max_bytes)
            nested = archives.archive_format(spool.read(_SNIFF_BYTES), spool)
            if nested is not None:
                raise UnsupportedArchiveError(
                    f"{nested.label} inside an archive; bonewatch reads one level of archives "
                    "(unpack the outer one)"
                )
            meta = _meta_of_stream(where, spool, digest, size, salt, max_pixels, max_bytes)
        except IngestError as exc:
            return HeaderEntry(where, member=True, error=exc, sha256=digest, size_bytes=size)
    return HeaderEntry(where, meta=meta, member=True, sha256=digest, size_bytes=size)
