"""ZIP and TAR archives (also gzip, bzip2 and xz TARs): their members read as files, streamed,
never extracted.

A member is recorded as ``ARCHIVE!NAME`` (``studies.zip!PAT1/IM0001``): the archive's own path,
the separator, and the member's name as :func:`member_name` keeps it. Nothing is ever written
under that name, or under any name an archive chooses: a member's bytes are read into memory or
an anonymous temporary file (no name, gone when closed), hashed and parsed from there. A name
that is absolute or climbs out with ``..`` is kept escaped (``..%2Fescape.dcm``) and never read.

Limits hold per member: a member that declares more than ``max_bytes`` inflated bytes is refused
unread, and reading stops one chunk past ``max_bytes`` whatever it declared. A ZIP whose members
overlap one another (the overlapping-file zip bomb) is refused as a whole. Members that are
folders, links or devices are skipped. An archive inside an archive is refused (one level).

Later, the worker decodes a member by opening the archive again and reading that member alone
(:func:`read_member`); open archives are kept per process (a few), so the members of one archive
cost one pass over a compressed TAR, not one pass each.

This module does no image parsing; ``ingest.reader`` drives it.
"""

from __future__ import annotations

import bz2
import fnmatch
import functools
import gzip
import hashlib
import io
import logging
import lzma
import os
import re
import stat
import struct
import tarfile
import tempfile
import threading
import zipfile
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, cast
from urllib.parse import quote

from bonewatch.ingest.errors import (
    CorruptFileError,
    FileChangedError,
    FileVanishedError,
    ImageTooLargeError,
    IngestError,
    NonImageFileError,
    TruncatedFileError,
    UnsupportedArchiveError,
    without_values,
)

logger = logging.getLogger(__name__)

MEMBER_SEPARATOR = "!"
# Names an archive has, for --include (an archive is opened whatever --include says).
ARCHIVE_SUFFIXES: tuple[str, ...] = (
    ".zip",
    ".tar",
    ".tgz",
    ".tar.gz",
    ".tbz",
    ".tbz2",
    ".tar.bz2",
    ".txz",
    ".tar.xz",
)
# A member up to this size is held in memory while it is read; a larger one goes to an anonymous
# temporary file (O_TMPFILE where the system has it: it never has a name).
SPOOL_IN_MEMORY = 16 << 20
_CHUNK = 1 << 20
_TAR_BLOCK = 512
_ZIP_LOCAL_HEADER = 30
# Archives a process keeps open for decoding; members passed over in a compressed TAR that are
# kept for a moment, in case a decode thread asks for them just after another thread's member.
_OPEN_ARCHIVES = 4
_PASSED_MEMBERS = 8
_PASSED_MEMBER_BYTES = 32 << 20
_COMPRESSIONS = {b"\x1f\x8b": "gz", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz"}
_DECOMPRESS_ERRORS = (
    EOFError,
    zlib.error,
    lzma.LZMAError,
    OSError,  # gzip.BadGzipFile, bz2's "Invalid data stream"; a disk fault is SourceReadError
    tarfile.TarError,
    zipfile.BadZipFile,
    ValueError,
    struct.error,
)


@dataclass(frozen=True)
class ArchiveFormat:
    """What an archive is: ``zip`` or ``tar``, and a TAR's compression (None, gz, bz2, xz)."""

    kind: str
    compression: str | None = None

    @property
    def label(self) -> str:
        if self.kind == "zip":
            return "a ZIP archive"
        names = {"gz": "gzip", "bz2": "bzip2", "xz": "xz"}
        if self.compression:
            return f"a {names[self.compression]}-compressed TAR archive"
        return "a TAR archive"


def _is_tar_block(block: bytes) -> bool:
    """A valid TAR header block (checksum and all), as tarfile itself checks it."""
    if len(block) < _TAR_BLOCK:
        return False
    try:
        tarfile.TarInfo.frombuf(block[:_TAR_BLOCK], "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def _decompressed(fp: BinaryIO, compression: str) -> gzip.GzipFile | bz2.BZ2File | lzma.LZMAFile:
    """``fp`` read through the decompressor of ``compression`` (gz, bz2 or xz)."""
    if compression == "gz":
        return gzip.GzipFile(fileobj=fp, mode="rb")
    if compression == "bz2":
        return bz2.BZ2File(fp, "rb")
    return lzma.LZMAFile(fp, "rb")


def _first_block(fp: BinaryIO, compression: str) -> bytes:
    """The first 512 decompressed bytes of ``fp``; b"" when they cannot be had."""
    fp.seek(0)
    try:
        with _decompressed(fp, compression) as stream:
            return stream.read(_TAR_BLOCK)
    except _DECOMPRESS_ERRORS:
        return b""
    finally:
        fp.seek(0)


def archive_format(head: bytes, fp: BinaryIO | None = None) -> ArchiveFormat | None:
    """Tell a ZIP or TAR archive from its first bytes (and, for a compressed TAR, ``fp``).

    Args:
        head: The file's first bytes (at least 512 for a plain TAR).
        fp: The seekable file, to look inside gzip, bzip2 or xz data; left at its start.

    Returns:
        The format, or None for anything else (gzip data that holds no TAR included).
    """
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return ArchiveFormat("zip")
    if _is_tar_block(head):
        return ArchiveFormat("tar")
    for magic, compression in _COMPRESSIONS.items():
        if head.startswith(magic) and fp is not None:
            if _is_tar_block(_first_block(fp, compression)):
                return ArchiveFormat("tar", compression)
            return None
    return None


def compressed_data_label(head: bytes) -> str | None:
    """What compressed data that is no TAR archive is, for a reason; None if it is not."""
    labels = {"gz": "gzip", "bz2": "bzip2", "xz": "xz"}
    for magic, compression in _COMPRESSIONS.items():
        if head.startswith(magic):
            return f"{labels[compression]}-compressed data that holds no TAR archive"
    return None


def is_archive_name(name: str) -> bool:
    """Whether a file name has an archive's suffix (``.zip``, ``.tar.gz``, ...), any case."""
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def _split_patterns(patterns: str | Iterable[str]) -> tuple[str, ...]:
    items = patterns.split(",") if isinstance(patterns, str) else patterns
    return tuple(item.strip() for item in items if item and item.strip())


@dataclass(frozen=True)
class PathFilter:
    """``--include`` and ``--exclude`` globs, applied to files and archive members alike.

    A pattern without ``/`` matches the name of the file or member (``*.txt``, ``DICOMDIR``); one
    with ``/`` matches the end of its path (``scratch/*``, ``*/PAT1/*.dcm``; ``*`` crosses
    folders). Matching ignores case. A file or member matching an exclude pattern is left out;
    with include patterns, only what matches one of them is taken, except that an archive (by its
    name: ``.zip``, ``.tar``, ``.tar.gz``, ``.tgz``...) is always opened, its members then chosen
    by the same patterns.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @classmethod
    def of(cls, include: str | Iterable[str] = (), exclude: str | Iterable[str] = ()) -> PathFilter:
        """A filter from lists of globs, or from comma-separated strings of them."""
        return cls(_split_patterns(include), _split_patterns(exclude))

    def __bool__(self) -> bool:
        return bool(self.include or self.exclude)

    def takes_file(self, path: str | Path) -> bool:
        """Whether a file found in a folder is taken (an archive is, unless excluded)."""
        text = os.fspath(path)
        if _matches_any(text, self.exclude):
            return False
        return not self.include or is_archive_name(text) or _matches_any(text, self.include)

    def takes_member(self, path: str) -> bool:
        """Whether an archive member (its ledger path, ``ARCHIVE!NAME``) is taken."""
        if _matches_any(path, self.exclude):
            return False
        return not self.include or _matches_any(path, self.include)


def _matches_any(path: str, patterns: tuple[str, ...]) -> bool:
    if not patterns:
        return False
    # An archive member's path is matched as if the archive were a folder ("a.zip/PAT1/x").
    lowered = path.lower().replace(MEMBER_SEPARATOR, "/")
    name = lowered[lowered.rfind("/") + 1 :]
    for pattern in patterns:
        glob = pattern.lower()
        if "/" not in glob:
            if fnmatch.fnmatchcase(name, glob):
                return True
        elif fnmatch.fnmatchcase(lowered, glob) or fnmatch.fnmatchcase(
            lowered, "*/" + glob.lstrip("/")
        ):
            return True
    return False


_UNSAFE_PARTS = re.compile(r"[\\/]")
_DRIVE = re.compile(r"^[A-Za-z]:")


def _escaped(text: str) -> str:
    """``text`` with control characters written as escapes (``\\n``), nothing else changed."""
    if text.isprintable():
        return text
    return "".join(
        char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
        for char in text
    )


def member_name(raw: str) -> tuple[str, bool]:
    """A member's name as the ledger keeps it, and whether it is unsafe.

    Bytes that are not UTF-8 become ``\\xNN`` and control characters are escaped; ``.`` and
    empty components are dropped. A name that is absolute (``/x``, ``\\x``, ``C:x``) or has a
    ``..`` component (``/`` and ``\\`` both separate) is unsafe: it is kept percent-escaped as
    one component, so that even as a path it names nothing outside the archive's folder.
    """
    text = raw.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    parts = _UNSAFE_PARTS.split(text)
    kept = [part for part in text.split("/") if part not in ("", ".")]
    if text.startswith(("/", "\\")) or _DRIVE.match(text) or ".." in parts or not kept:
        return quote(text, safe=""), True
    return _escaped("/".join(kept)), False


def member_path(archive: str, name: str) -> str:
    """The ledger path of member ``name`` (as :func:`member_name` gives it) of ``archive``."""
    return f"{archive}{MEMBER_SEPARATOR}{name}"


def split_member_path(path: str | Path) -> tuple[Path, str] | None:
    """(archive, member name) when ``path`` names an archive member rather than a file.

    A path that exists as it is, is a file (names may hold ``!``); otherwise the first ``!``
    whose left side is an existing file splits it.
    """
    text = os.fspath(path)
    if MEMBER_SEPARATOR not in text or os.path.lexists(text):
        return None
    at = text.find(MEMBER_SEPARATOR)
    while at >= 0:
        head, tail = text[:at], text[at + 1 :]
        if head and tail and os.path.isfile(head):
            return Path(head), tail
        at = text.find(MEMBER_SEPARATOR, at + 1)
    return None


@dataclass(frozen=True)
class Member:
    """One archive entry: its ledger name, what it is, its declared size and how to open it.

    ``kind`` is ``file``, ``folder``, ``link`` or ``special`` (devices, FIFOs).
    """

    name: str
    kind: str
    size: int
    unsafe: bool
    open: Callable[[], IO[bytes]]


def _zip_kind(info: zipfile.ZipInfo) -> str:
    if info.is_dir():
        return "folder"
    mode = info.external_attr >> 16
    if info.create_system == 3 and mode:  # Unix: the mode says what the entry is
        if stat.S_ISLNK(mode):
            return "link"
        if stat.S_ISDIR(mode):
            return "folder"
        if not stat.S_ISREG(mode):
            return "special"
    return "file"


def _tar_kind(info: tarfile.TarInfo) -> str:
    if info.isreg():
        return "file"
    if info.isdir():
        return "folder"
    if info.issym() or info.islnk():
        return "link"
    return "special"


_OFFICE_MARKERS = {
    "[Content_Types].xml": "an Office document (Word, Excel or PowerPoint)",
    "mimetype": "an OpenDocument or EPUB file",
    "META-INF/MANIFEST.MF": "a Java archive",
}


def _check_zip(zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo]) -> None:
    """Refuse a ZIP that is a document, or whose members overlap (a zip bomb)."""
    names = {info.filename for info in infos[:64]}
    for marker, label in _OFFICE_MARKERS.items():
        if marker in names:
            raise NonImageFileError(f"{label}, not an image")
    ends = sorted(
        (info.header_offset, info.header_offset + _ZIP_LOCAL_HEADER + info.compress_size)
        for info in infos
    )
    limit = getattr(zf, "start_dir", None)
    for (start, end), following in zip(ends, [*(s for s, _ in ends[1:]), limit], strict=True):
        if following is not None and end > following:
            raise ImageTooLargeError(
                "the ZIP archive's members overlap one another, as in a zip bomb; nothing in "
                "it is read"
            )
        if start < 0:
            raise CorruptFileError("the ZIP archive's directory is damaged")


def _zip_members(fp: BinaryIO) -> Iterator[Member]:
    try:
        zf = zipfile.ZipFile(fp)
    except (zipfile.BadZipFile, *_DECOMPRESS_ERRORS) as exc:
        raise CorruptFileError(f"the ZIP archive is damaged: {_message(exc)}") from exc
    with zf:
        infos = zf.infolist()
        _check_zip(zf, infos)
        for info in infos:
            name, unsafe = member_name(info.filename)
            yield Member(
                name,
                _zip_kind(info),
                info.file_size,
                unsafe,
                functools.partial(zf.open, info),
            )


def _tar_mode(fmt: ArchiveFormat) -> str:
    # Read seeking: a plain TAR skips a member without reading it; a compressed one inflates
    # what it skips in small pieces (gzip, bz2 and lzma files bound each read's output), where
    # tarfile's stream mode would inflate each 10 kB read whole (10 MB of a zip-bomb member).
    return f"r:{fmt.compression or ''}"


def _tar_members(fp: BinaryIO, fmt: ArchiveFormat) -> Iterator[Member]:
    fp.seek(0)
    label = fmt.label
    try:
        tf = tarfile.open(fileobj=fp, mode=_tar_mode(fmt))  # type: ignore[call-overload]
    except _DECOMPRESS_ERRORS as exc:
        raise CorruptFileError(f"{label} cannot be read: {_message(exc)}") from exc
    with tf:
        count = 0
        while True:
            try:
                info = tf.next()
            except _DECOMPRESS_ERRORS as exc:
                raise TruncatedFileError(
                    f"{label} is damaged or cut short after {count} entries (those are read): "
                    f"{_message(exc)}"
                ) from exc
            if info is None:
                return
            tf.members.clear()  # next() keeps every header; nothing here looks back
            count += 1
            name, unsafe = member_name(info.name)
            kind = _tar_kind(info)
            yield Member(
                name,
                kind,
                info.size if kind == "file" else 0,
                unsafe,
                functools.partial(_tar_open, tf, info),
            )


def _tar_open(tf: tarfile.TarFile, info: tarfile.TarInfo) -> IO[bytes]:
    handle = tf.extractfile(info)
    if handle is None:
        raise CorruptFileError("the TAR entry has no data")
    return handle


def iter_members(fp: BinaryIO, fmt: ArchiveFormat) -> Iterator[Member]:
    """The entries of an archive, in the order it stores them.

    A member must be read (``member.open()``) before the next one is asked for: a compressed TAR
    is one stream.

    Raises:
        CorruptFileError, TruncatedFileError: The archive is damaged or cut short (a TAR after
            the entries given so far).
        ImageTooLargeError: A ZIP whose members overlap one another.
        NonImageFileError: A ZIP that is an Office or OpenDocument file.
    """
    if fmt.kind == "zip":
        return _zip_members(fp)
    return _tar_members(fp, fmt)


def _message(exc: BaseException) -> str:
    return without_values(str(exc)) or type(exc).__name__


def _reading_error(exc: BaseException) -> IngestError:
    """What went wrong reading a member's bytes, as the ingest error that says so."""
    text = _message(exc)
    if isinstance(exc, RuntimeError) and "encrypted" in text:
        return UnsupportedArchiveError("the member is encrypted; bonewatch has no password")
    if isinstance(exc, NotImplementedError):
        return UnsupportedArchiveError(f"the member is stored in a way that is not read: {text}")
    if isinstance(exc, EOFError) or "end of data" in text or "truncated" in text.lower():
        return TruncatedFileError(f"the archive ends inside this member: {text}")
    if "CRC" in text:
        return CorruptFileError(
            "the member's bytes do not match its checksum (Bad CRC-32): the archive is damaged, "
            "or the member inflates past the size it declares"
        )
    return CorruptFileError(f"the member cannot be read from the archive: {text}")


def _too_large(size: int, max_bytes: int) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"the member inflates to {size} bytes, over the limit of {max_bytes} bytes"
    )


def _copy_bounded(source: IO[bytes], sink: IO[bytes], max_bytes: int) -> tuple[str, int]:
    digest = hashlib.sha256()
    total = 0
    while chunk := source.read(_CHUNK):
        total += len(chunk)
        if total > max_bytes:
            raise ImageTooLargeError(
                f"the member inflates past the limit of {max_bytes} bytes (it declares less)"
            )
        digest.update(chunk)
        sink.write(chunk)
    return digest.hexdigest(), total


def _copy_member(member: Member, sink: IO[bytes], max_bytes: int) -> tuple[str, int]:
    """Copy a member's bytes into ``sink``, bounded; their sha256 and size."""
    if member.size > max_bytes:
        raise _too_large(member.size, max_bytes)
    try:
        with member.open() as source:
            return _copy_bounded(source, sink, max_bytes)
    except IngestError:
        raise
    except (*_DECOMPRESS_ERRORS, RuntimeError, NotImplementedError) as exc:
        if isinstance(exc, OSError) and not _is_data_error(exc):
            raise
        raise _reading_error(exc) from exc


def _is_data_error(exc: OSError) -> bool:
    """An OSError a decompressor raised for bad data, not a fault of the disk (those arrive as
    ``SourceReadError``, which is no OSError) or of the temporary spool."""
    return isinstance(exc, gzip.BadGzipFile) or exc.errno is None


def spool_member(member: Member, max_bytes: int) -> tuple[BinaryIO, str, int]:
    """A member's bytes in a temporary spool (memory, or an anonymous file), with their sha256
    and size; the spool is at its start and is the caller's to close.

    Raises:
        ImageTooLargeError: The member declares, or inflates to, more than ``max_bytes``.
        CorruptFileError, TruncatedFileError, UnsupportedArchiveError: It cannot be read.
    """
    # A binary file in all but its declared type (SpooledTemporaryFile is an IO[bytes]).
    spool = cast(BinaryIO, tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY))  # noqa: SIM115
    try:
        digest, size = _copy_member(member, spool, max_bytes)
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    return spool, digest, size


def _read_bounded(member: Member, max_bytes: int) -> tuple[bytes, str]:
    buffer = io.BytesIO()
    digest, _ = _copy_member(member, buffer, max_bytes)
    return buffer.getvalue(), digest


# --- reading one member again, for decoding ---------------------------------------------------

Opener = Callable[[Path], tuple[BinaryIO, os.stat_result]]


class _OpenArchive:
    """One archive kept open by this process, its members found by name.

    A ZIP and a plain TAR are read where each member lies; a compressed TAR is a stream, read
    forward from where the last member was found (members come in the order they were
    registered), keeping the last few members it passed over for a moment.
    """

    def __init__(self, fp: BinaryIO, identity: tuple[int, int, int, int], fmt: ArchiveFormat):
        self.fp, self.identity, self.fmt = fp, identity, fmt
        self.lock = threading.Lock()
        self.closed = False
        self._index: dict[str, list[Member]] | None = None
        self._holder: Any = None  # the open ZipFile or TarFile the index's members read from
        self._stream: Iterator[Member] | None = None
        self._passed: deque[tuple[str, str, bytes]] = deque(maxlen=_PASSED_MEMBERS)

    def close(self) -> None:
        self.closed = True
        if self._holder is not None:
            self._holder.close()
        self.fp.close()

    def _seekable_index(self) -> dict[str, list[Member]]:
        if self._index is None:
            self.fp.seek(0)
            index: dict[str, list[Member]] = {}
            if self.fmt.kind == "zip":
                self._holder = zf = zipfile.ZipFile(self.fp)
                infos = zf.infolist()
                _check_zip(zf, infos)
                for zinfo in infos:
                    name, unsafe = member_name(zinfo.filename)
                    if _zip_kind(zinfo) == "file" and not unsafe:
                        index.setdefault(name, []).append(
                            Member(
                                name,
                                "file",
                                zinfo.file_size,
                                False,
                                functools.partial(zf.open, zinfo),
                            )
                        )
            else:
                self._holder = tf = tarfile.open(fileobj=self.fp, mode="r:")
                for tinfo in tf.getmembers():
                    name, unsafe = member_name(tinfo.name)
                    if tinfo.isreg() and not unsafe:
                        index.setdefault(name, []).append(
                            Member(
                                name,
                                "file",
                                tinfo.size,
                                False,
                                functools.partial(_tar_open, tf, tinfo),
                            )
                        )
            self._index = index
        return self._index

    def read(self, name: str, sha256: str | None, max_bytes: int) -> bytes:
        if self.fmt.kind == "zip" or self.fmt.compression is None:
            candidates = self._seekable_index().get(name, [])
            if not candidates:
                raise FileVanishedError("the archive no longer holds this member")
            for member in candidates:
                data, digest = _read_bounded(member, max_bytes)
                if sha256 is None or digest == sha256:
                    return data
            raise _changed()
        return self._read_streamed(name, sha256, max_bytes)

    def _read_streamed(self, name: str, sha256: str | None, max_bytes: int) -> bytes:
        for at, (passed_name, digest, data) in enumerate(self._passed):
            if passed_name == name and (sha256 is None or digest == sha256):
                del self._passed[at]
                return data
        seen_name = False
        for restarted in (False, True):
            if self._stream is None or restarted:
                self.fp.seek(0)
                self._stream = _tar_members(self.fp, self.fmt)
            for member in self._stream:
                if member.kind != "file" or member.unsafe:
                    continue
                if member.name == name:
                    seen_name = True
                    data, digest = _read_bounded(member, max_bytes)
                    if sha256 is None or digest == sha256:
                        return data
                elif member.size <= _PASSED_MEMBER_BYTES:
                    data, digest = _read_bounded(member, _PASSED_MEMBER_BYTES)
                    self._passed.append((member.name, digest, data))
            self._stream = None
        if seen_name:
            raise _changed()
        raise FileVanishedError("the archive no longer holds this member")


def _changed() -> FileChangedError:
    return FileChangedError(
        "the archive member changed after it was registered; its new content is registered as "
        "a separate image when the archive is processed again"
    )


class _ArchiveCache:
    """The archives this process keeps open, least recently used dropped first."""

    def __init__(self) -> None:
        self._open: OrderedDict[str, _OpenArchive] = OrderedDict()
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def get(self, archive: Path, opener: Opener) -> _OpenArchive:
        key = os.fspath(archive)
        try:
            st = os.stat(key, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise FileVanishedError("the archive holding this member is gone") from exc
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            if self._pid != os.getpid():  # a forked child: the parent's handles are not ours
                self._open.clear()
                self._pid = os.getpid()
            cached = self._open.get(key)
            if cached is not None and cached.identity == identity:
                self._open.move_to_end(key)
                return cached
            if cached is not None:
                self._drop(key)
        fp, opened = opener(archive)
        try:
            head = fp.read(_TAR_BLOCK)
            fmt = archive_format(head, fp)
            if fmt is None:
                raise FileChangedError("the file that held this member is no archive any more")
        except BaseException:
            fp.close()
            raise
        entry = _OpenArchive(
            fp, (opened.st_dev, opened.st_ino, opened.st_size, opened.st_mtime_ns), fmt
        )
        with self._lock:
            self._open[key] = entry
            while len(self._open) > _OPEN_ARCHIVES:
                self._drop(next(iter(self._open)))
        return entry

    def _drop(self, key: str) -> None:
        entry = self._open.pop(key)
        with entry.lock:  # not while another thread reads from it
            entry.close()

    def clear(self) -> None:
        with self._lock:
            for key in list(self._open):
                self._drop(key)


_CACHE = _ArchiveCache()


def read_member(
    archive: Path, name: str, *, max_bytes: int, sha256: str | None, opener: Opener
) -> bytes:
    """The bytes of member ``name`` (its ledger name) of ``archive``.

    Args:
        archive: The archive file.
        name: The member, as :func:`member_name` keeps it.
        max_bytes: Most bytes the member may inflate to.
        sha256: The digest the member was registered with; another member of the same name with
            other bytes is passed over, and only other bytes is ``FileChangedError``.
        opener: Opens the archive safely (no symlink, regular files only), as ``ingest.reader``
            does; gives a buffered seekable stream and its stat.

    Raises:
        FileVanishedError: The archive, or the member in it, is gone.
        FileChangedError: The member's bytes are not those registered.
        ImageTooLargeError, CorruptFileError, TruncatedFileError, UnsupportedArchiveError.
        OSError: A read fault (transient).
    """
    while True:
        entry = _CACHE.get(archive, opener)
        with entry.lock:
            if entry.closed:  # dropped by another thread since it was handed out
                continue
            try:
                return entry.read(name, sha256, max_bytes)
            except IngestError:
                raise
            except _DECOMPRESS_ERRORS as exc:
                if isinstance(exc, OSError) and not _is_data_error(exc):
                    raise
                raise CorruptFileError(f"the archive cannot be read: {_message(exc)}") from exc


def close_archives() -> None:
    """Close the archives this process keeps open (tests; a long-lived process never needs to)."""
    _CACHE.clear()
