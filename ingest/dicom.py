"""DICOM files: header, pixel decoding and encoding. The only module that imports pydicom.

Reading follows the DICOM grey pipeline (PS3.3 C.11, PS3.4 N.2): stored values -> Modality LUT
-> VOI LUT or window -> MONOCHROME1/INVERSE inversion, normalised to [0, 1] with 1 = bright.
"""

from __future__ import annotations

import io
import logging
import struct
import zlib
from typing import Any, BinaryIO, cast

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.multival import MultiValue
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    apply_windowing,
    get_decoder,
    pixel_array,
)
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from bonewatch.ingest import reduced
from bonewatch.ingest.errors import (
    CorruptFileError,
    ImageTooLargeError,
    IngestError,
    NoPixelDataError,
    TruncatedFileError,
    UnsupportedMultiFrameError,
    UnsupportedPixelFormatError,
    UnsupportedTransferSyntaxError,
    without_values,
)
from bonewatch.ingest.phi import patient_hash
from bonewatch.ingest.raster import luminance, reduce_blocks, reduction_factor
from bonewatch.ingest.types import PixelGrid

logger = logging.getLogger(__name__)

TRANSFER_SYNTAXES_WRITABLE: tuple[str, ...] = (
    str(ExplicitVRLittleEndian),
    str(ImplicitVRLittleEndian),
    str(DeflatedExplicitVRLittleEndian),
    str(RLELossless),
    str(JPEG2000Lossless),
    str(JPEGLSLossless),
)
_NATIVE_WRITABLE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)

_SOP_CLASS_FOR_MODALITY = {
    "CR": ComputedRadiographyImageStorage,
    "DX": DigitalXRayImageStorageForPresentation,
}
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# (7FE0,0008) Float, (7FE0,0009) Double Float and (7FE0,0010) Pixel Data, as little-endian bytes.
_PIXEL_TAG_BYTES = (b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00", b"\xe0\x7f\x10\x00")
# imagecodecs (libjpeg-turbo) is ours, registered below for 12-bit JPEG Extended and JPEG
# Lossless, where pydicom would otherwise have only GDCM or nothing.
_DECODER_PREFERENCE = ("pylibjpeg", "pyjpegls", "pydicom", "imagecodecs", "pillow", "gdcm")
_IMAGECODECS_PLUGIN = ("imagecodecs", ("bonewatch.ingest.dicom_jpeg", "_decode_frame"))
_IMAGECODECS_SYNTAXES = (JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1)
# Encoders by syntax; GDCM's RLE encoder aborts the process on odd widths, so it is never used.
_ENCODING_PLUGIN = {
    RLELossless: "pylibjpeg",
    JPEG2000Lossless: "pylibjpeg",
    JPEGLSLossless: "pyjpegls",
}
# pylibjpeg-openjpeg always encodes 6 DWT resolutions, which needs 2**5 pixels per side.
_J2K_MIN_SIDE = 32
# A preamble-less dataset starts with file meta (0002,xxxx) or identifying (0008,xxxx) elements.
_FIRST_GROUPS = (0x0002, 0x0008)
# Bytes looked at to find a dataset without preamble and file meta.
_SNIFF_BYTES = 4096
# Space or NUL bytes that may come before such a dataset: one cut from its file meta a byte late
# keeps the meta's last pad byte (pydicom's no_meta.dcm starts so).
_MAX_LEADING_PAD = 8
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL "
    b"UN UR US UT UV".split()
)
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
# The first elements of a dataset are short identifying values, never megabytes.
_MAX_FIRST_LENGTH = 1 << 16
_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
# Elements longer than this are skipped while parsing and read only if asked for (pixel data):
# a 400 MB private element costs nothing unless something reads it, and nothing does.
_DEFER_SIZE = 1 << 20
# The default inflation limit, as read_image's default file-size limit.
_MAX_INFLATED = 2_000_000_000
_INFLATE_CHUNK = 1 << 20
_INFLATED_WINDOW = 1 << 16  # inflated bytes kept behind the read position, for short rewinds
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})


def _register_decoder_plugins() -> None:
    """Add the imagecodecs JPEG plugin to pydicom's decoders (once; pydicom's own are kept)."""
    label, import_path = _IMAGECODECS_PLUGIN
    for tsyntax in _IMAGECODECS_SYNTAXES:
        decoder = get_decoder(tsyntax)
        known = decoder.available_plugins + tuple(decoder.missing_dependencies)
        if not any(name == label or name.startswith(f"{label} ") for name in known):
            decoder.add_plugin(label, import_path)


# At import, before any decoding thread starts: pydicom's add_plugin is not thread-safe.
_register_decoder_plugins()


class SourceReadError(Exception):
    """Carries an ``OSError`` of the underlying file through pydicom and Pillow.

    Both libraries raise ``OSError`` for bad bytes too, so ingest.reader wraps real read errors
    in this type (which neither library catches) and unwraps them afterwards: a disk fault stays
    a retryable ``OSError`` and never turns into a "corrupt file" verdict.
    """

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class _Unnamed:
    """A stream as pydicom gets it: read, seek and tell, and no name.

    Given a named file, pydicom notes the name and reads a deferred element by opening that name
    again, which would read whatever the name leads to by then; given this, it reads the stream.
    """

    def __init__(self, fp: BinaryIO, start: int = 0) -> None:
        self._fp = fp
        self._start = start  # where the DICOM data begins in ``fp`` (after leading pad bytes)

    def read(self, size: int = -1) -> bytes:
        return self._fp.read(size)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            return self._fp.seek(self._start + max(0, offset)) - self._start
        return self._fp.seek(offset, whence) - self._start

    def tell(self) -> int:
        return self._fp.tell() - self._start


def _elements_at(head: bytes, at: int) -> bool:
    """Whether two well-formed little-endian elements of group 0002 or 0008 start at ``at``, in
    ascending order, each explicit or implicit VR, with a short length."""
    previous = None
    for _ in range(2):
        if at + 8 > len(head):
            return False
        tag = struct.unpack_from("<HH", head, at)
        if tag[0] not in _FIRST_GROUPS or (previous is not None and tag <= previous):
            return False
        vr = head[at + 4 : at + 6]
        if vr in _LONG_VRS:
            if at + 12 > len(head) or head[at + 6 : at + 8] != b"\0\0":
                return False
            length, at = struct.unpack_from("<I", head, at + 8)[0], at + 12
        elif vr in _VRS:
            length, at = struct.unpack_from("<H", head, at + 6)[0], at + 8
        else:  # implicit VR: a 4-byte length after the tag
            length, at = struct.unpack_from("<I", head, at + 4)[0], at + 8
        if length > _MAX_FIRST_LENGTH:
            return False
        at += length
        previous = tag
    return True


def bare_dataset_start(head: bytes) -> int | None:
    """Where a DICOM dataset without the Part 10 preamble and file meta starts in ``head``.

    Older systems wrote datasets so: implicit or explicit VR little endian, opening with
    group 0008 (or a file meta group 0002 without its preamble). Two consecutive well-formed
    elements must be found, after at most eight bytes of space or NUL padding; only then is the
    stream parsed (with ``force``). None for anything else.
    """
    for skip in range(min(_MAX_LEADING_PAD, len(head)) + 1):
        if skip and head[skip - 1] not in (0x00, 0x20):
            return None
        if _elements_at(head, skip):
            return skip
    return None


def _dicom_start(fp: BinaryIO) -> int:
    """Where the DICOM data of ``fp`` begins: 0 for a Part 10 file, else a bare dataset's start."""
    fp.seek(0)
    head = fp.read(_SNIFF_BYTES)
    if len(head) >= 132 and head[128:132] == b"DICM":
        return 0
    return bare_dataset_start(head) or 0


class _InflatedStream:
    """The dataset of a Deflated Explicit VR Little Endian file (PS3.5 A.5), inflated as read.

    pydicom inflates such a dataset whole before parsing it, so 400 kB on disk can become 2 GB
    in memory; this inflates in pieces instead and holds only a small window of what it
    inflated. A forward seek inflates and drops; a seek back past the window starts again from
    the first compressed byte. More than ``limit`` inflated bytes raise ``ImageTooLargeError``.
    """

    def __init__(self, source: BinaryIO, start: int, limit: int) -> None:
        self._source, self._start, self._limit = source, start, limit
        self._pos = 0
        self._restart()

    def _restart(self) -> None:
        self._source.seek(self._start)
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._window = bytearray()
        self._window_start = 0  # inflated offset of self._window[0]

    @property
    def _produced(self) -> int:
        return self._window_start + len(self._window)

    def _inflate_more(self, keep_from: int) -> bool:
        """Inflate the next piece onto the window, keeping little before ``keep_from``; False
        once the deflate stream has ended."""
        inflater = self._inflater
        if inflater.eof:
            return False
        compressed = inflater.unconsumed_tail or self._source.read(_INFLATE_CHUNK)
        if not compressed:
            # What zlib.decompress, and so pydicom, says of a cut stream.
            raise zlib.error("Error -5 while decompressing data: incomplete or truncated stream")
        piece = inflater.decompress(compressed, _INFLATE_CHUNK)
        if self._produced + len(piece) > self._limit:
            raise ImageTooLargeError(
                f"the deflated DICOM dataset inflates to more than {self._limit} bytes, the "
                "file-size limit"
            )
        self._window += piece
        drop = min(len(self._window), keep_from - _INFLATED_WINDOW - self._window_start)
        if drop > 0:
            del self._window[:drop]
            self._window_start += drop
        return True

    def _cover(self, end: int) -> None:
        """Inflate until the window holds [self._pos, end), or the stream ends."""
        if self._pos < self._window_start:
            self._restart()
        while self._produced < end and self._inflate_more(keep_from=self._pos):
            pass

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            self._cover(self._limit + 1)
            size = max(0, self._produced - self._pos)
        self._cover(self._pos + size)
        offset = self._pos - self._window_start
        out = bytes(self._window[offset : offset + size]) if offset >= 0 else b""
        self._pos += len(out)
        return out

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_END:
            # Inflate to the end, holding nothing of it: only its length is wanted.
            while self._inflate_more(keep_from=self._limit + 1 + _INFLATED_WINDOW):
                pass
            offset += self._produced
        elif whence == io.SEEK_CUR:
            offset += self._pos
        if offset < 0:
            raise ValueError("negative seek position")
        self._pos = offset
        return offset

    def tell(self) -> int:
        return self._pos


def _at_pixels(tag: int, vr: str | None, length: int) -> bool:
    return tag in _PIXEL_TAGS


def _read_dataset(
    fp: BinaryIO, *, stop_before_pixels: bool, force: bool, max_inflated: int
) -> tuple[Dataset, BinaryIO]:
    """``dcmread`` with large elements deferred and a deflated dataset inflated within bounds.

    Returns the dataset and the stream it was parsed from (deferred elements are read from it).
    """
    source = cast(BinaryIO, _Unnamed(fp, _dicom_start(fp)))
    source.seek(0)
    # The preamble and file meta as pydicom reads them, so the two agree on "deflated".
    preamble = read_preamble(source, force)
    file_meta = _read_file_meta_info(source)
    start = source.tell()
    deflated = file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
    if not deflated or not source.read(1):
        source.seek(0)
        ds = pydicom.dcmread(
            source, stop_before_pixels=stop_before_pixels, force=force, defer_size=_DEFER_SIZE
        )
        return ds, source
    body = cast(BinaryIO, _InflatedStream(source, start, max_inflated))
    dataset = read_dataset(
        body,
        is_implicit_VR=False,
        is_little_endian=True,
        stop_when=_at_pixels if stop_before_pixels else None,
        defer_size=_DEFER_SIZE,
    )
    ds = FileDataset(body, dataset, preamble, file_meta, False, True)
    ds.set_original_encoding(False, True, dataset._character_set)
    return ds, body


class _Header:
    """A header parse: the dataset without pixels, and where its pixel element starts if any."""

    def __init__(self, ds: Dataset, pixel_offset: int | None, stream: BinaryIO) -> None:
        self.ds = ds
        self.pixel_offset = pixel_offset
        self.stream = stream


def _parse_header(fp: BinaryIO, *, force: bool, max_inflated: int) -> _Header:
    ds, stream = _read_dataset(fp, stop_before_pixels=True, force=force, max_inflated=max_inflated)
    # stop_before_pixels leaves the stream on the pixel element's tag when there is one.
    offset = stream.tell()
    pixel_offset = offset if stream.read(4) in _PIXEL_TAG_BYTES else None
    return _Header(ds, pixel_offset, stream)


def is_dicom(fp: BinaryIO, *, max_inflated: int = _MAX_INFLATED) -> bool:
    """Tell whether a stream holds DICOM: 'DICM' at offset 128, or a bare dataset
    (:func:`bare_dataset_start`).

    Args:
        fp: Seekable binary stream; read from its start.
        max_inflated: Most bytes a deflated dataset may inflate to.

    Returns:
        True for a Part 10 file or a preamble-less dataset pydicom parses into an image-like
        object (one with a SOP Class UID or image dimensions).

    Raises:
        ImageTooLargeError: A deflated dataset inflates past ``max_inflated``.
    """
    fp.seek(0)
    head = fp.read(_SNIFF_BYTES)
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    if bare_dataset_start(head) is None:
        return False
    try:
        ds = _parse_header(fp, force=True, max_inflated=max_inflated).ds
        return any(k in ds for k in ("SOPClassUID", "SOPInstanceUID", "Rows"))
    except (SourceReadError, ImageTooLargeError):
        raise
    except Exception:  # noqa: BLE001 - any parse failure on a guess just means "not DICOM"
        return False


def read_dicom_header(
    fp: BinaryIO, *, salt: str, max_inflated: int = _MAX_INFLATED
) -> dict[str, Any]:
    """Read the identifying and image-describing header fields, never the pixels.

    PatientID leaves only as ``patient_hash`` = HMAC-SHA256(salt, PatientID); PatientName is never
    read. Elements over 1 MB are skipped, not read; a deflated dataset is inflated in pieces, to
    its end, so one that inflates past ``max_inflated`` is refused here already.

    Args:
        fp: Seekable binary stream of a file ``is_dicom`` accepted.
        salt: Site secret mixed into the patient hash.
        max_inflated: Most bytes a deflated dataset may inflate to.

    Returns:
        ``ImageMeta`` keyword arguments (format, rows, columns, UIDs, modality, ...).

    Raises:
        CorruptFileError: The header cannot be parsed.
        ImageTooLargeError: A deflated dataset inflates past ``max_inflated``.
    """
    header = _parse_or_raise(fp, max_inflated)
    try:
        header.stream.seek(0, io.SEEK_END)  # inflates the rest of a deflated dataset, bounded
    except zlib.error as exc:
        raise CorruptFileError(f"DICOM header cannot be parsed: {exc}") from exc
    try:
        # Elements are converted lazily: a damaged VR or length only surfaces on access.
        if header.pixel_offset is None:
            refusal = _not_an_image_object(header.ds)
            if refusal is not None:
                raise refusal
        return _header_fields(header.ds, salt)
    except _PARSE_ERRORS as exc:
        raise CorruptFileError(f"DICOM header cannot be parsed: {_message(exc)}") from exc


# What DICOM objects without an image are, by words of their SOP class name (first match).
_OBJECT_LABELS: tuple[tuple[str, str], ...] = (
    ("Key Object Selection", "a key object selection (KOS)"),
    ("SR Storage", "a structured report (SR)"),
    ("Structured Report", "a structured report (SR)"),
    ("Presentation State", "a presentation state"),
    ("Encapsulated PDF", "an encapsulated PDF"),
    ("Encapsulated CDA", "an encapsulated CDA document"),
    ("Encapsulated", "an encapsulated document"),
    ("RT Ion Plan", "an RT Plan"),
    ("RT Plan", "an RT Plan"),
    ("RT Structure Set", "an RT Structure Set"),
    ("RT Dose", "an RT Dose"),
    ("Waveform", "a waveform"),
    ("Raw Data", "raw data"),
    ("Spatial Registration", "a spatial registration"),
    ("Spatial Fiducials", "spatial fiducials"),
    ("Segmentation", "a segmentation"),
    ("Hanging Protocol", "a hanging protocol"),
)


def _object_label(name: str) -> str:
    for words, label in _OBJECT_LABELS:
        if words in name:
            return label
    stem = name.removesuffix(" Storage")
    article = "an" if stem[:1] in "AEIOU" or stem.startswith("RT ") else "a"
    return f"{article} {stem} object"


def _not_an_image_object(ds: Dataset) -> NoPixelDataError | None:
    """The refusal for a DICOM object that is no image by its nature, told from its header.

    A DICOMDIR, or a SOP class pydicom names that is no image class (a plan, a report, a
    presentation state, a document...). None for anything that may be an image (an image class
    that lost its pixels, an unlisted class): decoding says what is wrong with those.
    """
    if "Rows" in ds or "Columns" in ds:
        return None
    file_meta = getattr(ds, "file_meta", None)
    media_class = _text(file_meta, "MediaStorageSOPClassUID") if file_meta is not None else None
    sop_class = _text(ds, "SOPClassUID") or media_class
    if "DirectoryRecordSequence" in ds or sop_class == _MEDIA_STORAGE_DIRECTORY:
        # The index of a CD or DVD export; the images it lists are files of their own.
        return NoPixelDataError("a DICOMDIR media directory, not an image")
    if not sop_class:
        return None
    uid = UID(sop_class)
    if not uid.is_valid or uid.name == str(uid) or "Image" in uid.name:
        return None
    return NoPixelDataError(f"{_object_label(uid.name)}, not an image ({uid.name}, {uid})")


# What pydicom raises on damaged bytes; each becomes a CorruptFileError with its message.
_PARSE_ERRORS = (
    InvalidDicomError,
    BytesLengthException,
    zlib.error,  # a damaged deflated dataset
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
    OSError,
    NotImplementedError,
    OverflowError,
    UnicodeError,
)


def _message(exc: BaseException) -> str:
    """A library's message for a reason: the values it quotes from the file left out."""
    return without_values(str(exc))


def _parse_or_raise(fp: BinaryIO, max_inflated: int) -> _Header:
    try:
        return _parse_header(fp, force=True, max_inflated=max_inflated)
    except SourceReadError:
        raise
    except (EOFError, struct.error) as exc:
        raise TruncatedFileError(f"DICOM header ends early: {_message(exc)}") from exc
    except _PARSE_ERRORS as exc:
        raise CorruptFileError(f"DICOM header cannot be parsed: {_message(exc)}") from exc


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if isinstance(value, MultiValue):
        value = value[0] if len(value) else None
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    if isinstance(value, MultiValue):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return None
    return int(value)


def _transfer_syntax(ds: Dataset) -> UID:
    """The dataset's transfer syntax; for a bare dataset, the encoding pydicom detected."""
    file_meta = getattr(ds, "file_meta", None)
    tsyntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if tsyntax:
        return UID(str(tsyntax).strip())
    implicit, little = ds.original_encoding
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little in (True, None) else ExplicitVRBigEndian


def _header_fields(ds: Dataset, salt: str) -> dict[str, Any]:
    try:
        patient_id = _text(ds, "PatientID")
        fields: dict[str, Any] = {
            "format": "dicom",
            "rows": _int(ds, "Rows"),
            "columns": _int(ds, "Columns"),
            "study_uid": _text(ds, "StudyInstanceUID"),
            "series_uid": _text(ds, "SeriesInstanceUID"),
            "sop_instance_uid": _text(ds, "SOPInstanceUID"),
            "sop_class_uid": _text(ds, "SOPClassUID"),
            "sop_class_name": _sop_class_name(_text(ds, "SOPClassUID")),
            "patient_hash": patient_hash(salt, patient_id) if patient_id else None,
            "modality": _text(ds, "Modality"),
            "body_part_examined": _text(ds, "BodyPartExamined"),
            "view_position": _text(ds, "ViewPosition"),
            "photometric": _text(ds, "PhotometricInterpretation"),
            "transfer_syntax": str(_transfer_syntax(ds)),
            "bits_stored": _int(ds, "BitsStored"),
            "number_of_frames": _int(ds, "NumberOfFrames"),
        }
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, UnicodeError) as exc:
        raise CorruptFileError(f"DICOM header has an unreadable value: {_message(exc)}") from exc
    return fields


def _sop_class_name(sop_class: str | None) -> str | None:
    """The standard's name of a SOP class UID, or None when pydicom does not know it."""
    if not sop_class:
        return None
    uid = UID(sop_class)
    return uid.name if uid.is_valid and uid.name != str(uid) else None


def _syntax_label(tsyntax: UID) -> str:
    name = tsyntax.name if tsyntax.is_transfer_syntax else "an unknown transfer syntax"
    return f"{name} ({tsyntax})"


def _choose_decoding_plugin(tsyntax: UID) -> str:
    """The plugin to decode with ("" lets pydicom decide, for native data).

    pydicom tries GDCM first for most compressed syntaxes, but GDCM can abort the whole process
    (a C++ exception through the binding) on odd input, which would take a worker down with one
    bad file; so GDCM is used only where nothing else decodes the syntax.

    Raises:
        CorruptFileError: ``tsyntax`` is not even a well-formed UID (damaged file meta).
        UnsupportedTransferSyntaxError: No installed plugin decodes ``tsyntax``.
    """
    if not tsyntax.is_valid:
        raise CorruptFileError("the transfer syntax UID is damaged: it is not a valid UID")
    try:
        decoder = get_decoder(tsyntax)
    except (NotImplementedError, ValueError) as exc:
        raise UnsupportedTransferSyntaxError(
            f"no decoder for transfer syntax {_syntax_label(tsyntax)}"
        ) from exc
    if not decoder.is_available:
        raise UnsupportedTransferSyntaxError(
            f"no installed decoder plugin for transfer syntax {_syntax_label(tsyntax)}"
        )
    if not tsyntax.is_encapsulated:
        return ""
    available = decoder.available_plugins
    for plugin in _DECODER_PREFERENCE:
        if plugin in available:
            return plugin
    return ""


def _expected_native_bytes(ds: Dataset) -> int:
    frames = _int(ds, "NumberOfFrames") or 1
    bits = int(ds.BitsAllocated)
    samples = int(ds.get("SamplesPerPixel", 1))
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "YBR_FULL_422":
        # Two pixels share one Cb and one Cr: 2 samples per pixel on average (PS3.3 C.7.6.3.1.2).
        samples = 2
    total_bits = int(ds.Rows) * int(ds.Columns) * samples * frames * bits
    return (total_bits + 7) // 8


def _check_single_frame(ds: Dataset) -> None:
    frames = _int(ds, "NumberOfFrames")
    if frames is not None and frames > 1:
        raise UnsupportedMultiFrameError.for_frames(frames)


def _check_declared_length(ds: Dataset, stream: BinaryIO) -> None:
    """A native pixel element that declares more bytes than the file holds is a partial copy.

    pydicom reads what is there without complaint, so a 2 GB claim in a 2 kB file would
    otherwise pass whenever the rows and columns happen to fit in what was read. A deferred
    element (not read yet) is measured against the end of ``stream``.
    """
    raw = ds.get_item("PixelData", keep_deferred=True)
    length = getattr(raw, "length", None)
    value = getattr(raw, "value", None)
    value_tell = getattr(raw, "value_tell", None)
    if length is None or length == 0xFFFFFFFF:
        return
    if isinstance(value, bytes | bytearray):
        held = len(value)
    elif value is None and value_tell is not None:
        held = max(0, min(length, stream.seek(0, io.SEEK_END) - value_tell))
    else:
        return
    if held < length:
        raise TruncatedFileError(
            f"pixel data element declares {length} bytes but the file holds {held}: "
            "the file is cut short or its header is damaged"
        )


def _without_pixels(ds: Dataset, header: _Header) -> IngestError:
    """Why a parsed object has no pixel element: it has none by nature, or it lost them."""
    if header.pixel_offset is not None:
        # pydicom drops an encapsulated pixel element whose items run past the end.
        return TruncatedFileError("DICOM file ends inside its pixel data element")
    if "Rows" in ds and "Columns" in ds:
        # The image pixel module is there but its pixels are not: a copy cut off before them.
        return TruncatedFileError(
            "DICOM image has Rows and Columns but the file ends before its pixel data"
        )
    sop_class = UID(_text(ds, "SOPClassUID") or "")
    if not sop_class or not sop_class.is_valid:
        return CorruptFileError(
            "DICOM object has neither a valid SOP Class UID nor pixel data: the file is damaged "
            "or cut short"
        )
    if sop_class.name != str(sop_class) and "Image Storage" in sop_class.name:
        # An image SOP class parsed without its image attributes: they were cut off or the
        # parse stopped at damaged bytes before them.
        return CorruptFileError(
            f"{sop_class.name} object ends before its image attributes and pixel data: the file "
            "is damaged or cut short"
        )
    label = sop_class.name if sop_class.name != str(sop_class) else "an unlisted SOP class"
    return NoPixelDataError(f"DICOM object has no pixel data: {label} ({sop_class})")


def decode_dicom(
    data: bytes,
    *,
    max_inflated: int = _MAX_INFLATED,
    max_side: int | None = None,
    min_side: int | None = None,
) -> np.ndarray:
    """Decode a single-frame DICOM image to display grey float32 (H, W) in [0, 1]; see
    :func:`decode_dicom_on_grid`, which also says where reduced pixels lie."""
    return decode_dicom_on_grid(
        data, max_inflated=max_inflated, max_side=max_side, min_side=min_side
    )[0]


def decode_dicom_on_grid(
    data: bytes,
    *,
    max_inflated: int = _MAX_INFLATED,
    max_side: int | None = None,
    min_side: int | None = None,
) -> tuple[np.ndarray, PixelGrid | None]:
    """Decode a single-frame DICOM image to display grey float32 (H, W) in [0, 1].

    An object of more than one frame is refused: bonewatch reads single-frame radiographs, and
    a cine loop or tomosynthesis stack is not one. Modality and VOI transforms come from the
    top-level dataset. Elements over 1 MB other than the pixels are never read.

    Args:
        data: The whole file.
        max_inflated: Most bytes a deflated dataset may inflate to.
        max_side: A longer image has its stored values averaged down by a whole factor right
            after decoding, before any float array of full size exists; None keeps every pixel.
        min_side: JPEG 2000 and 8-bit JPEG decode at the smallest scale still covering this
            (ingest/reduced.py); None decodes in full.

    Returns:
        The pixels, and their :class:`PixelGrid` when they were decoded reduced (else None).

    Raises:
        NoPixelDataError: The object has no image (SR, presentation state, ...).
        UnsupportedMultiFrameError: NumberOfFrames is above 1.
        UnsupportedTransferSyntaxError: No installed decoder handles the transfer syntax.
        TruncatedFileError: The pixel data ends early.
        CorruptFileError: The pixel data or its describing attributes are damaged.
        UnsupportedPixelFormatError: A photometric interpretation that has no grey rendering.
        ImageTooLargeError: A deflated dataset inflates past ``max_inflated``.
    """
    header = _parse_or_raise(io.BytesIO(data), max_inflated)
    try:
        ds, stream = _read_dataset(
            io.BytesIO(data), stop_before_pixels=False, force=True, max_inflated=max_inflated
        )
    except SourceReadError:
        raise
    except (EOFError, struct.error) as exc:
        raise TruncatedFileError(f"DICOM file ends early: {_message(exc)}") from exc
    except _PARSE_ERRORS as exc:
        raise CorruptFileError(f"DICOM file cannot be parsed: {_message(exc)}") from exc

    if not any(k in ds for k in _PIXEL_KEYWORDS):
        raise _without_pixels(ds, header)
    if "PixelData" not in ds:
        raise UnsupportedPixelFormatError("float pixel data (parametric map) is not a radiograph")

    try:
        _check_single_frame(ds)
        _check_declared_length(ds, stream)
        return _render_grey(ds, max_side, min_side)
    except IngestError:
        raise
    except MemoryError:
        raise
    except (
        *_PARSE_ERRORS,
        IndexError,
        ZeroDivisionError,
        struct.error,
    ) as exc:
        raise CorruptFileError(f"DICOM image attributes are inconsistent: {_message(exc)}") from exc
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:
        # Decoder plugins written in Rust report a panic as pyo3's PanicException, which
        # derives from BaseException; on damaged pixel data it must cost this file only.
        raise CorruptFileError(
            f"the pixel decoder failed: {type(exc).__name__}: {_message(exc)}"
        ) from exc


def _decode_first_frame(ds: Dataset) -> np.ndarray:
    tsyntax = _transfer_syntax(ds)
    if not ds.file_meta.get("TransferSyntaxUID"):
        ds.file_meta.TransferSyntaxUID = tsyntax
    plugin = _choose_decoding_plugin(tsyntax)
    for keyword in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation"):
        if keyword not in ds or ds[keyword].value in (None, "", 0):
            raise CorruptFileError(f"DICOM image lacks {keyword}")
    if not tsyntax.is_compressed:
        expected = _expected_native_bytes(ds)
        if len(ds.PixelData) < expected:
            raise TruncatedFileError(
                f"pixel data has {len(ds.PixelData)} of {expected} bytes: the file is cut short"
            )
    try:
        # index=0: decode_dicom has already refused objects of more than one frame.
        return pixel_array(ds, index=0, decoding_plugin=plugin)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - third-party codecs raise anything on bad streams
        message = _message(exc)
        if "less than expected" in message or isinstance(exc, EOFError):
            raise TruncatedFileError(f"pixel data ends early ({_syntax_label(tsyntax)})") from exc
        raise CorruptFileError(
            f"pixel data cannot be decoded as {_syntax_label(tsyntax)}: {message}"
        ) from exc


def _reduced_frame(ds: Dataset, min_side: int | None) -> tuple[np.ndarray, PixelGrid] | None:
    """The first frame of a grey, unsigned JPEG 2000 or JPEG dataset decoded at the smallest
    scale covering ``min_side`` (ingest/reduced.py); None: decode it in full."""
    syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if not min_side or syntax not in reduced.J2K_SYNTAXES | reduced.JPEG_DCT_SYNTAXES:
        return None
    if int(ds.get("SamplesPerPixel") or 1) != 1 or int(ds.get("PixelRepresentation") or 0):
        return None  # colour or signed values: the full decoders handle those
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        rows, columns = int(ds.Rows), int(ds.Columns)
        bits_stored = int(ds.get("BitsStored") or ds.BitsAllocated)
    except Exception:  # noqa: BLE001 - the full decode reports what is wrong with the file
        return None
    return reduced.decode_frame(frame, syntax, rows, columns, bits_stored, min_side)


def _render_grey(
    ds: Dataset, max_side: int | None = None, min_side: int | None = None
) -> tuple[np.ndarray, PixelGrid | None]:
    # JPEG 2000 and 8-bit JPEG at the smallest scale covering min_side (ingest/reduced.py).
    grid: PixelGrid | None = None
    found = _reduced_frame(ds, min_side)
    if found is None:
        arr = _decode_first_frame(ds)
    else:
        arr, grid = found
    factor = reduction_factor(arr.shape[0], arr.shape[1], max_side)
    grid = reduced.with_blocks(grid, factor)
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        if arr.ndim != 2:
            raise CorruptFileError(f"{photometric} pixel data has shape {arr.shape}, not (H, W)")
        return _render_monochrome(arr, ds, photometric, factor).astype(np.float32), grid
    if photometric == "PALETTE COLOR":
        # Palette indices are labels, not values: average the colours they stand for.
        rgb = reduce_blocks(apply_color_lut(arr, _palette_in_native_order(ds)), factor)
        depth = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return luminance(rgb, float(2**depth - 1)).astype(np.float32), grid
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"):
        # pixel_array converts YBR to RGB by default, and J2K codecs undo ICT/RCT themselves.
        max_value = float(2 ** int(ds.get("BitsStored") or ds.BitsAllocated) - 1)
        return luminance(reduce_blocks(arr, factor), max_value).astype(np.float32), grid
    raise UnsupportedPixelFormatError(f"photometric interpretation {photometric} is not supported")


_PALETTE_DATA = tuple(
    f"{colour}PaletteColorLookupTableData" for colour in ("Red", "Green", "Blue", "Alpha")
)


def _palette_in_native_order(ds: Dataset) -> Dataset:
    """The dataset with 16-bit palette LUT data in little-endian order.

    pydicom's apply_color_lut reads (non-segmented) OW LUT data in the machine's order, so a big
    endian file's palette would come out byte-swapped (white as 1/256 of full scale).
    """
    if _transfer_syntax(ds) != ExplicitVRBigEndian:
        return ds
    entries = int(ds.RedPaletteColorLookupTableDescriptor[0]) or 2**16
    for keyword in _PALETTE_DATA:
        value = ds.get(keyword)
        if isinstance(value, bytes | bytearray) and len(value) == 2 * entries:
            ds[keyword].value = np.frombuffer(value, dtype=">u2").astype("<u2").tobytes()
    return ds


def _stored_range(ds: Dataset) -> tuple[float, float]:
    bits = int(ds.get("BitsStored") or ds.BitsAllocated)
    if int(ds.get("PixelRepresentation", 0)) == 0:
        return 0.0, float(2**bits - 1)
    return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)


def _has_rescale(ds: Dataset) -> bool:
    return ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None


def _modality_range(ds: Dataset) -> tuple[float, float]:
    """The modality output's nominal (first, last) values, as PS3.3 C.11.2.1.2.1 uses them."""
    if ds.get("ModalityLUTSequence"):
        depth = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**depth - 1)
    lo, hi = _stored_range(ds)
    if _has_rescale(ds):
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        return lo * slope + intercept, hi * slope + intercept
    return lo, hi


def _apply_voi_normalised(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """VOI LUT, else window, else the full modality range; scaled so its output range is [0, 1]."""
    voi_items = ds.get("VOILUTSequence")
    if voi_items and None not in (voi_items[0].get("LUTDescriptor"), voi_items[0].get("LUTData")):
        if np.issubdtype(values.dtype, np.floating) and np.array_equal(values, np.round(values)):
            # A LUT indexes by integer; an identity rescale leaves integral floats behind.
            values = values.astype(np.int64)
        out = apply_voi(values, ds, 0)
        depth = int(voi_items[0].LUTDescriptor[2])
        return out.astype(np.float64) / float(2**depth - 1)
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        first, last = _modality_range(ds)
        try:
            out = apply_windowing(values, ds, 0)
        except ValueError as exc:
            logger.warning("ignoring an unusable window (%s); showing the full range", exc)
        else:
            # The window maps onto [first, last]; with a negative slope last < first.
            return (out.astype(np.float64) - first) / (last - first)
    first, last = _modality_range(ds)
    lo, hi = min(first, last), max(first, last)
    return (values.astype(np.float64) - lo) / (hi - lo)


def _lut_table(item: Dataset, ds: Dataset) -> np.ndarray:
    """A LUT item's data as integers, whichever way the file stored them (US values or OW)."""
    value = item["LUTData"].value
    if isinstance(value, bytes | bytearray):
        order = ">" if _transfer_syntax(ds) == ExplicitVRBigEndian else "<"
        return np.frombuffer(value, dtype=f"{order}u2").astype(np.int64)
    values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    return np.asarray(values, dtype=np.int64)


def _apply_modality(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values through the Modality LUT Sequence, else the rescale (PS3.3 C.11.1).

    The sequence is looked up here because pydicom's apply_modality_lut builds a ``uint<N>``
    array from the descriptor's bit depth, which fails for the legal depths other than 8 and 16
    (a 12-bit CR modality LUT is common).
    """
    items = ds.get("ModalityLUTSequence")
    if not items:
        return apply_modality_lut(arr, ds)
    item = items[0]
    entries, first = int(item.LUTDescriptor[0]) or 2**16, int(item.LUTDescriptor[1])
    table = _lut_table(item, ds)
    if len(table) < entries:
        raise CorruptFileError(f"Modality LUT declares {entries} entries but holds {len(table)}")
    # Below the first mapped value: the first entry; past the last: the last entry.
    index = np.clip(arr.astype(np.int64) - first, 0, entries - 1)
    return table[index]


def _render_monochrome(
    arr: np.ndarray, ds: Dataset, photometric: str, factor: int = 1
) -> np.ndarray:
    bits_stored = int(ds.get("BitsStored") or ds.BitsAllocated)
    if arr.dtype.kind == "u" and bits_stored < arr.dtype.itemsize * 8:
        # Bits above BitsStored may hold retired overlays; they are not part of the value.
        arr = np.bitwise_and(arr, (1 << bits_stored) - 1)
    # Averaged as stored integers (after the overlay bits are gone), so LUTs still index them.
    arr = reduce_blocks(arr, factor)
    values = _apply_modality(arr, ds)
    grey = _apply_voi_normalised(values, ds)
    shape = str(ds.get("PresentationLUTShape") or "").strip().upper()
    # MONOCHROME1 and a Presentation LUT Shape of INVERSE each call for the one inversion that
    # makes high values bright; DX pairs them (MONOCHROME1 + INVERSE), so they are not applied
    # twice.
    if photometric == "MONOCHROME1" or shape == "INVERSE":
        grey = 1.0 - grey
    return np.clip(np.nan_to_num(grey, nan=0.0), 0.0, 1.0)


def make_uid(*parts: str) -> str:
    """Make a valid DICOM UID that is the same every time for the same strings.

    Args:
        *parts: One or more strings that identify the object (e.g. study name, image index).

    Returns:
        A UID under pydicom's root, derived from a hash of ``parts``.

    Raises:
        ValueError: No parts were given (pydicom would then return a random UID).
    """
    if not parts:
        raise ValueError("make_uid needs at least one string to stay deterministic")
    return str(generate_uid(entropy_srcs=list(parts)))


def encode_dicom(
    stored: np.ndarray,
    *,
    bits_stored: int,
    photometric: str,
    transfer_syntax: str,
    modality: str,
    window: tuple[float, float],
    body_part: str | None,
    view_position: str | None,
    laterality: str | None,
    patient_id: str,
    patient_name: str,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    study_date: str,
    instance_number: int,
    series_number: int,
) -> bytes:
    """Encode stored grey values as a CR or DX Part 10 file in the given transfer syntax.

    Args:
        stored: uint8 or uint16 (H, W) stored values, already inverted for MONOCHROME1.
        bits_stored: 8..16; BitsAllocated is 8 for 8 bits and 16 above.
        window: (WindowCenter, WindowWidth) to record.
        (others): The DICOM attributes of the same name.

    Returns:
        The file's bytes.

    Raises:
        ValueError: An unsupported modality, transfer syntax or bit depth.
    """
    tsyntax = UID(transfer_syntax)
    if transfer_syntax not in TRANSFER_SYNTAXES_WRITABLE:
        raise ValueError(f"cannot encode transfer syntax {_syntax_label(tsyntax)}")
    sop_class = _SOP_CLASS_FOR_MODALITY.get(modality)
    if sop_class is None:
        raise ValueError(f"write_dicom writes CR or DX images, not {modality}")
    bits_allocated = 8 if bits_stored <= 8 else 16
    if tsyntax == JPEG2000Lossless and min(stored.shape) < _J2K_MIN_SIDE:
        raise ValueError(
            f"JPEG 2000 needs images at least {_J2K_MIN_SIDE} pixels on each side, "
            f"got {stored.shape[0]}x{stored.shape[1]}"
        )

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian  # compress() switches it below

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    # No wall-clock timestamps: the same pixels and UIDs must give the same bytes (phantoms
    # are reproducible from their seed).
    ds.InstanceCreationDate = study_date
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = study_date
    ds.SeriesDate = study_date
    ds.ContentDate = study_date
    ds.StudyTime = "000000"
    ds.ContentTime = "000000"
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.Manufacturer = "bonewatch"
    ds.ReferringPhysicianName = ""
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = ""
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = ""
    ds.BodyPartExamined = body_part or ""
    ds.ViewPosition = view_position or ""
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    if modality == "DX":
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageLaterality = laterality or "U"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
        ds.DetectorType = ""
        # DX ties the Presentation LUT Shape to the photometric interpretation (PS3.3 C.8.11.1).
        ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    elif laterality:
        ds.Laterality = laterality
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter = window[0]
    ds.WindowWidth = window[1]

    array = np.ascontiguousarray(stored, dtype=np.uint8 if bits_allocated == 8 else "<u2")
    if tsyntax in _NATIVE_WRITABLE:
        meta.TransferSyntaxUID = tsyntax
        ds.PixelData = array.tobytes()
        ds["PixelData"].VR = "OB" if bits_allocated == 8 else "OW"
    else:
        ds.compress(
            tsyntax, array, encoding_plugin=_ENCODING_PLUGIN[tsyntax], generate_instance_uid=False
        )

    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()
