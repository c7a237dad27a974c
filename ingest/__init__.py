"""Ingest: turning image files (DICOM, PNG, JPEG) into ``DecodedImage`` values, and back.

Imports nothing else from bonewatch. ``ingest.dicom`` is the only module that imports pydicom.
"""

from bonewatch.ingest.errors import (
    BadFileNameError,
    CorruptFileError,
    EmptyFileError,
    FileChangedError,
    FileVanishedError,
    ImageTooLargeError,
    IngestError,
    NoPixelDataError,
    NotAnImageError,
    TruncatedFileError,
    UnreadableFileError,
    UnsupportedBodyPartError,
    UnsupportedModalityError,
    UnsupportedMultiFrameError,
    UnsupportedPixelFormatError,
    UnsupportedTransferSyntaxError,
)
from bonewatch.ingest.mura import MURA_PARTS, parse_mura_path
from bonewatch.ingest.policy import body_part_hint, check_acceptance
from bonewatch.ingest.reader import printable_path, read_header, read_image, sha256_file
from bonewatch.ingest.types import DecodedImage, ImageMeta
from bonewatch.ingest.watcher import InboxWatcher, is_candidate_name, iter_candidate_files
from bonewatch.ingest.writers import TRANSFER_SYNTAXES_WRITABLE, make_uid, write_dicom, write_png

__all__ = [
    "MURA_PARTS",
    "TRANSFER_SYNTAXES_WRITABLE",
    "BadFileNameError",
    "CorruptFileError",
    "DecodedImage",
    "EmptyFileError",
    "FileChangedError",
    "FileVanishedError",
    "ImageMeta",
    "ImageTooLargeError",
    "InboxWatcher",
    "IngestError",
    "NoPixelDataError",
    "NotAnImageError",
    "TruncatedFileError",
    "UnreadableFileError",
    "UnsupportedBodyPartError",
    "UnsupportedModalityError",
    "UnsupportedMultiFrameError",
    "UnsupportedPixelFormatError",
    "UnsupportedTransferSyntaxError",
    "body_part_hint",
    "check_acceptance",
    "is_candidate_name",
    "iter_candidate_files",
    "make_uid",
    "parse_mura_path",
    "printable_path",
    "read_header",
    "read_image",
    "sha256_file",
    "write_dicom",
    "write_png",
]
