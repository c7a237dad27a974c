"""Ingest: turning image files (DICOM, PNG, JPEG) into ``DecodedImage`` values, and back.

Imports nothing else from bonewatch. ``ingest.dicom`` is the only module that imports pydicom,
besides ``ingest.listener``, the DICOM network (pynetdicom), which reads a received header.
"""

from bonewatch.ingest.archives import MEMBER_SEPARATOR, PathFilter, split_member_path
from bonewatch.ingest.errors import (
    BadFileNameError,
    CorruptFileError,
    EmptyFileError,
    FileChangedError,
    FileVanishedError,
    ImageTooLargeError,
    ImageTooSmallError,
    IngestError,
    NonImageFileError,
    NoPixelDataError,
    NotAnImageError,
    TruncatedFileError,
    UnreadableFileError,
    UnsafeArchiveMemberError,
    UnsupportedArchiveError,
    UnsupportedBodyPartError,
    UnsupportedFormatError,
    UnsupportedModalityError,
    UnsupportedMultiFrameError,
    UnsupportedPixelFormatError,
    UnsupportedTransferSyntaxError,
    without_values,
)
from bonewatch.ingest.mura import MURA_PARTS, parse_mura_path
from bonewatch.ingest.policy import body_part_hint, check_acceptance, minimum_side
from bonewatch.ingest.raster import MAX_DECODED_SIDE, downscale
from bonewatch.ingest.reader import (
    FileId,
    HeaderEntry,
    printable_path,
    read_header,
    read_headers,
    read_image,
    sha256_file,
)
from bonewatch.ingest.reduced import resize_as_full
from bonewatch.ingest.types import DecodedImage, ImageMeta, PixelGrid
from bonewatch.ingest.watcher import (
    InboxWatcher,
    SkipCounts,
    counting_skips,
    is_candidate_name,
    iter_candidate_files,
)
from bonewatch.ingest.writers import TRANSFER_SYNTAXES_WRITABLE, make_uid, write_dicom, write_png

__all__ = [
    "MAX_DECODED_SIDE",
    "MEMBER_SEPARATOR",
    "MURA_PARTS",
    "TRANSFER_SYNTAXES_WRITABLE",
    "BadFileNameError",
    "CorruptFileError",
    "DecodedImage",
    "EmptyFileError",
    "FileChangedError",
    "FileId",
    "FileVanishedError",
    "HeaderEntry",
    "ImageMeta",
    "ImageTooLargeError",
    "ImageTooSmallError",
    "InboxWatcher",
    "IngestError",
    "NoPixelDataError",
    "NonImageFileError",
    "NotAnImageError",
    "PathFilter",
    "PixelGrid",
    "SkipCounts",
    "TruncatedFileError",
    "UnreadableFileError",
    "UnsafeArchiveMemberError",
    "UnsupportedArchiveError",
    "UnsupportedBodyPartError",
    "UnsupportedFormatError",
    "UnsupportedModalityError",
    "UnsupportedMultiFrameError",
    "UnsupportedPixelFormatError",
    "UnsupportedTransferSyntaxError",
    "body_part_hint",
    "check_acceptance",
    "counting_skips",
    "downscale",
    "is_candidate_name",
    "iter_candidate_files",
    "make_uid",
    "minimum_side",
    "parse_mura_path",
    "printable_path",
    "read_header",
    "read_headers",
    "read_image",
    "resize_as_full",
    "split_member_path",
    "sha256_file",
    "write_dicom",
    "without_values",
    "write_png",
]
