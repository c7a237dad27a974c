"""What bonewatch accepts: single-frame projection radiographs of the upper limb.

A DICOM must show that it is a projection radiograph: Modality CR, DX or RG, or (without a
Modality) a CR or DX image SOP class. A Secondary Capture that says CR or DX is a scanned film
and is read. Otherwise the policy only rejects what a header states plainly (a CT slice, a chest
film, a cine loop of many frames). Anything vague (``EXTREMITY``, ``ARM``, an empty or unknown
``BodyPartExamined``) passes, so the body-part model decides. PNG and JPEG files carry no
modality; MURA is PNG, so they pass. A matrix too small for the serving bundle's input is
refused where the bundle is known (``input_size``).
"""

from __future__ import annotations

import re

from bonewatch.ingest.errors import (
    ImageTooSmallError,
    UnsupportedBodyPartError,
    UnsupportedModalityError,
    UnsupportedMultiFrameError,
)
from bonewatch.ingest.mura import MURA_PARTS
from bonewatch.ingest.types import ImageMeta

ACCEPTED_MODALITIES: tuple[str, ...] = ("CR", "DX", "RG")
# The image SOP classes of projection radiographs: CR, and DX for presentation and for processing.
RADIOGRAPH_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
}

# Words and run-together phrases (DICOM CS values often drop the space) naming one MURA part.
_PART_WORDS: dict[str, str] = {
    "ELBOW": "ELBOW",
    "ELBOWS": "ELBOW",
    "OLECRANON": "ELBOW",
    "FINGER": "FINGER",
    "FINGERS": "FINGER",
    "THUMB": "FINGER",
    "THUMBS": "FINGER",
    "DIGIT": "FINGER",
    "DIGITS": "FINGER",
    "PHALANX": "FINGER",
    "PHALANGES": "FINGER",
    "FOREARM": "FOREARM",
    "FOREARMS": "FOREARM",
    "LOWERARM": "FOREARM",
    "RADIUS": "FOREARM",
    "ULNA": "FOREARM",
    "HAND": "HAND",
    "HANDS": "HAND",
    "METACARPAL": "HAND",
    "METACARPALS": "HAND",
    "HUMERUS": "HUMERUS",
    "UPPERARM": "HUMERUS",
    "SHOULDER": "SHOULDER",
    "SHOULDERS": "SHOULDER",
    "WRIST": "WRIST",
    "WRISTS": "WRIST",
    "CARPUS": "WRIST",
    "CARPAL": "WRIST",
    "SCAPHOID": "WRIST",
}

# Regions that are plainly not an upper limb (DICOM PS3.16 body part terms and common free text).
_OTHER_REGION_WORDS: frozenset[str] = frozenset(
    {
        "ABD",
        "ABDOMEN",
        "ANKLE",
        "ANKLES",
        "BRAIN",
        "BREAST",
        "CALCANEUS",
        "CHEST",
        "COCCYX",
        "CSPINE",
        "FACE",
        "FEET",
        "FEMUR",
        "FIBULA",
        "FOOT",
        "HEAD",
        "HEART",
        "HEEL",
        "HIP",
        "HIPS",
        "JAW",
        "KNEE",
        "KNEES",
        "LEG",
        "LEGS",
        "LSPINE",
        "LUNG",
        "LUNGS",
        "MANDIBLE",
        "NECK",
        "ORBIT",
        "PATELLA",
        "PELVIS",
        "RIB",
        "RIBS",
        "SACRUM",
        "SINUS",
        "SINUSES",
        "SKULL",
        "SPINE",
        "SSPINE",
        "STERNUM",
        "TEETH",
        "THIGH",
        "THORAX",
        "TIBIA",
        "TMJ",
        "TOE",
        "TOES",
        "TSPINE",
        "WHOLEBODY",
        "LOWEREXTREMITY",
        "LOWERLIMB",
        "LOWERLEG",
    }
)
# Compound DICOM terms run words together (ABDOMENPELVIS, CHESTABDPELVIS, TLSPINE), so these
# unambiguous stems also count inside a longer word.
_OTHER_REGION_STEMS: tuple[str, ...] = (
    "ABDOMEN",
    "ANKLE",
    "CHEST",
    "FEMUR",
    "KNEE",
    "PELVIS",
    "SKULL",
    "SPINE",
    "THORAX",
    "TIBIA",
)
# Laterality words say nothing about the region.
_LATERALITY_WORDS: frozenset[str] = frozenset(
    {"L", "R", "LT", "RT", "LEFT", "RIGHT", "B", "BILAT", "BILATERAL", "BOTH"}
)
_SEPARATORS = re.compile(r"[\s_\-/,.;:()+&]+")


def _words(value: str) -> list[str]:
    """Upper-cased words of a body part value, laterality dropped."""
    words = [w for w in _SEPARATORS.split(value.strip().upper()) if w]
    return [w for w in words if w not in _LATERALITY_WORDS]


def _candidates(words: list[str]) -> list[str]:
    """Single words, adjacent pairs and the whole value run together ("UPPER ARM" -> UPPERARM)."""
    pairs = [a + b for a, b in zip(words, words[1:], strict=False)]
    return [*words, *pairs, "".join(words)]


def body_part_hint(body_part_examined: str | None) -> str | None:
    """Map a DICOM BodyPartExamined value to one of ``MURA_PARTS``.

    Args:
        body_part_examined: The raw header value, in any case, with spaces or underscores.

    Returns:
        The MURA part it names, or ``None`` when it names none or more than one of them.
    """
    if not body_part_examined:
        return None
    words = _words(body_part_examined)
    if not words:
        return None
    found = {_PART_WORDS[c] for c in _candidates(words) if c in _PART_WORDS}
    if len(found) == 1:
        return found.pop()
    return None


def _names_other_region(body_part_examined: str) -> bool:
    words = _words(body_part_examined)
    if any(c in _OTHER_REGION_WORDS for c in _candidates(words)):
        return True
    return any(stem in word for word in words for stem in _OTHER_REGION_STEMS)


def _names_any_mura_part(body_part_examined: str) -> bool:
    return any(c in _PART_WORDS for c in _candidates(_words(body_part_examined)))


def minimum_side(input_size: int) -> int:
    """The shortest side an image needs for a model input of ``input_size`` px: half of it.

    Smaller, the image would be blown up more than twice to fill the input: a thumbnail, an
    icon or a test pattern, never a radiograph the model could read.
    """
    return max(1, input_size // 2)


def check_matrix(meta: ImageMeta, input_size: int) -> None:
    """Refuse a matrix too small for a model input of ``input_size`` px (:func:`minimum_side`).

    Raises:
        ImageTooSmallError: Rows or columns are below the minimum.
    """
    if meta.rows is None or meta.columns is None:
        return
    need = minimum_side(input_size)
    if min(meta.rows, meta.columns) < need:
        raise ImageTooSmallError(
            f"a {meta.rows}×{meta.columns} matrix is too small for this bundle's {input_size} px "
            f"input (at least {need} px a side)"
        )


def _check_radiograph(meta: ImageMeta) -> None:
    """A DICOM must show it is a projection radiograph: by Modality, or by its SOP class."""
    modality = (meta.modality or "").strip().upper()
    if modality:
        if modality not in ACCEPTED_MODALITIES:
            raise UnsupportedModalityError(
                f"modality {modality} is not a projection radiograph; bonewatch reads CR, DX and RG"
            )
        return
    if meta.format != "dicom" or meta.sop_class_uid in RADIOGRAPH_SOP_CLASSES:
        return
    if meta.sop_class_uid:
        what = meta.sop_class_name or f"an unlisted SOP class ({meta.sop_class_uid})"
        what = f"a {what}" if meta.sop_class_name else what
    else:
        what = "a DICOM image without a SOP Class UID"
    raise UnsupportedModalityError(
        f"{what} without a Modality shows no sign of being a projection radiograph; bonewatch "
        "reads Modality CR, DX and RG, or the CR and DX image SOP classes"
    )


def check_acceptance(meta: ImageMeta, *, input_size: int | None = None) -> None:
    """Reject images the header shows are not upper-limb projection radiographs.

    A DICOM passes with Modality CR, DX or RG (a Secondary Capture so labelled is a scanned
    film), or without a Modality when its SOP class is the CR or a DX image class. PNG and JPEG
    pass. Any body part value that is vague or also names an upper-limb part passes: the
    body-part model has the last word.

    Args:
        meta: The header of the image.
        input_size: The serving bundle's model input side, in pixels, when known: a smaller
            matrix than :func:`minimum_side` of it is refused.

    Raises:
        UnsupportedModalityError: The modality is not CR, DX or RG, or a DICOM without a
            Modality is of no radiograph SOP class.
        UnsupportedMultiFrameError: The object has more than one frame.
        UnsupportedBodyPartError: BodyPartExamined names only regions outside the seven parts.
        ImageTooSmallError: The matrix is too small for ``input_size``.
    """
    _check_radiograph(meta)
    if meta.number_of_frames is not None and meta.number_of_frames > 1:
        raise UnsupportedMultiFrameError.for_frames(meta.number_of_frames)
    body_part = (meta.body_part_examined or "").strip()
    if body_part and not _names_any_mura_part(body_part) and _names_other_region(body_part):
        raise UnsupportedBodyPartError(
            f"body part {body_part.upper()} is outside the upper limb; bonewatch reads "
            + ", ".join(MURA_PARTS)
        )
    if input_size is not None:
        check_matrix(meta, input_size)
