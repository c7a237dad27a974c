"""The coded concepts of the report.

Standard codes come from pydicom's copy of the DICOM standard's code tables (Part 16), looked
up by name, never typed in: the seven MURA parts are SNOMED CT codes of CID 4031 "Common
Anatomic Regions"; present/absent are SNOMED CT (CID 240/241); the device observer, the
procedure and the units are DCM, SNOMED CT and UCUM.

What has no standard code (bonewatch's fracture probability, its decision threshold, the MURA
study mean, the fracture finding as the model calls it, the intended use) gets a code of the
private coding scheme ``99BWATCH``, declared in the report's Coding Scheme Identification
Sequence and listed in docs/deliver.md. "99" designators are the private range of Part 3
§8.2.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

PRIVATE_SCHEME = "99BWATCH"
PRIVATE_SCHEME_NAME = "bonewatch private codes"
PRIVATE_SCHEME_ORGANIZATION = "bonewatch project"


def _private(value: str, meaning: str) -> Code:
    return Code(value, PRIVATE_SCHEME, meaning)


# CID 4031 by MURA part name.
PART_CODES: dict[str, Code] = {
    "ELBOW": codes.SCT.ElbowJoint,
    "FINGER": codes.SCT.Finger,
    "FOREARM": codes.SCT.Forearm,
    "HAND": codes.SCT.Hand,
    "HUMERUS": codes.SCT.Humerus,
    "SHOULDER": codes.SCT.Shoulder,
    "WRIST": codes.SCT.WristJoint,
}
UPPER_LIMB = codes.SCT.UpperLimb

PRESENT = codes.SCT.Present
ABSENT = codes.SCT.Absent
NO_UNITS = Code("1", "UCUM", "no units")
PROCEDURE = codes.SCT.ImagingProcedure

P_FRACTURE = _private("PFRACTURE", "Probability of fracture")
THRESHOLD = _private("THRESHOLD", "Decision threshold")
STUDY_MEAN = _private("STUDYMEAN", "Mean probability of fracture of the study (MURA)")
FRACTURE = _private("FRACTURE", "Fracture")
INTENDED_USE = _private("INTENDEDUSE", "Intended use of the algorithm")

PRIVATE_CODES: tuple[Code, ...] = (P_FRACTURE, THRESHOLD, STUDY_MEAN, FRACTURE, INTENDED_USE)


def part_code(part: str | None) -> Code:
    """The finding site of a MURA part; the upper limb when the part is unknown."""
    return PART_CODES.get((part or "").upper(), UPPER_LIMB)


def coding_scheme_identification() -> Dataset:
    """The Coding Scheme Identification item that declares the private scheme."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = PRIVATE_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = PRIVATE_SCHEME_ORGANIZATION
    return item
