"""The ingest error family: a file that is bad is recorded and skipped, never retried.

Each class carries the ledger ``status`` it ends in (``failed`` or ``unsupported``) and a reason a
person can act on. Errors that mean "the world is broken" (an I/O error on a share that went away)
are not in this family: they propagate as ``OSError`` so the caller can retry them.
"""

from __future__ import annotations

import re


def printable(text: str) -> str:
    """``text`` on one line, with control characters and lone surrogates written as escapes.

    Reasons quote values from damaged files; a NUL or a surrogate in them would make the ledger
    (PostgreSQL text refuses NUL, UTF-8 refuses surrogates) reject the whole batch.
    """
    if text.isprintable():
        return text
    text = " ".join(text.split())  # decoder messages span lines; a reason is one line
    return "".join(
        char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
        for char in text
    )


# A quoted literal in a library's message: 'x', "x", b'x' or b"x" (no escapes inside).
_QUOTED = re.compile(r"(?<!\w)b?'[^'\n]*'|(?<!\w)b?\"[^\"\n]*\"")


def without_values(message: str) -> str:
    """A decoder's or parser's message with the values it quotes left out.

    pydicom and Pillow quote what they could not parse (``invalid literal for int(): 'SMITH'``,
    ``broken PNG file (chunk b'...')``); those are bytes of the file, and a reason must say what
    is wrong without repeating the file's content. Each quoted literal becomes ``'…'``.
    """
    return _QUOTED.sub("'…'", message)


class IngestError(Exception):
    """A file that cannot become a ``DecodedImage``; ``str(err)`` is the readable reason."""

    status: str = "failed"

    def __init__(self, reason: str) -> None:
        reason = printable(reason)
        super().__init__(reason)
        self.reason = reason

    @property
    def error_class(self) -> str:
        return type(self).__name__


class EmptyFileError(IngestError):
    """The file has zero bytes."""


class FileVanishedError(IngestError):
    """The file was deleted or moved away before it could be read."""


class UnreadableFileError(IngestError):
    """The file exists but cannot be opened (permissions, a directory with an image name)."""


class FileChangedError(IngestError):
    """The bytes on disk differ from the ones that were registered."""


class NotAnImageError(IngestError):
    """The bytes are neither DICOM nor a supported raster format, nor anything else known."""


class NonImageFileError(IngestError):
    """A file that is plainly no image: text, CSV, HTML, JSON, a PDF, Thumbs.db, .DS_Store...

    It is a valid file of another kind, so ``unsupported``; the reason says what it is.
    """

    status = "unsupported"


class UnsupportedFormatError(IngestError):
    """An image in a format bonewatch does not read (GIF, TIFF, BMP, WebP, bare JPEG 2000)."""

    status = "unsupported"


class UnsupportedArchiveError(IngestError):
    """An archive, or an archive member, that is not read: one inside another, encrypted, or
    compressed with a method that is not available."""

    status = "unsupported"


class UnsafeArchiveMemberError(IngestError):
    """An archive member whose name is absolute or climbs out with ``..``: never read, and its
    name is kept only escaped."""


class CorruptFileError(IngestError):
    """The format is recognised but the content is damaged (bad CRC, broken stream)."""


class TruncatedFileError(CorruptFileError):
    """The file ends before its declared content (a partial copy)."""


class ImageTooLargeError(IngestError):
    """The header declares more pixels or bytes than the configured limits allow."""


class NoPixelDataError(IngestError):
    """A DICOM object without an image (DICOMDIR, RT Plan, structured report, presentation
    state, ...)."""

    status = "unsupported"


class UnsupportedModalityError(IngestError):
    """A modality that is not a projection radiograph (CT, MR, US, ...)."""

    status = "unsupported"


class ImageTooSmallError(IngestError):
    """A matrix too small for the serving bundle's input: a thumbnail, an icon, a test pattern."""

    status = "unsupported"


class UnsupportedBodyPartError(IngestError):
    """BodyPartExamined names a region outside the seven MURA upper-limb parts."""

    status = "unsupported"


class UnsupportedTransferSyntaxError(IngestError):
    """Pixel data in a transfer syntax no installed decoder handles."""

    status = "unsupported"


class UnsupportedPixelFormatError(IngestError):
    """A pixel layout the reader does not turn into grey (e.g. an unknown photometric)."""

    status = "unsupported"


class UnsupportedMultiFrameError(IngestError):
    """A multi-frame object: bonewatch reads single-frame radiographs only."""

    status = "unsupported"

    @classmethod
    def for_frames(cls, frames: int) -> UnsupportedMultiFrameError:
        """The error for an object of ``frames`` frames, with the reason users see."""
        return cls(
            f"multi-frame object with {frames} frames; bonewatch reads single-frame "
            "radiographs only (split the frames into single-frame instances upstream)"
        )


class BadFileNameError(IngestError):
    """A file name that cannot be kept as text (bytes that are not UTF-8)."""
