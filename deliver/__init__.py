"""Results back to the hospital as DICOM: the Structured Report, the Secondary Captures, sending.

``deliver`` builds DICOM objects from plain values (:mod:`values`) and the source images'
headers, and sends them; it never reads the ledger itself. By concern: ``codes`` (the coded
concepts, standard and private), ``uids`` (deterministic UIDs), ``sr`` (the TID 1500 report),
``sc`` (the heatmap Secondary Capture), ``send`` (C-STORE and STOW-RS).
"""

from bonewatch.deliver.errors import DeliveryError
from bonewatch.deliver.sc import build_secondary_capture
from bonewatch.deliver.send import Destination, parse_destinations, send_dicomweb, send_dimse
from bonewatch.deliver.sr import build_report
from bonewatch.deliver.uids import object_uids
from bonewatch.deliver.values import BundleInfo, ImageOutcome, StudyOutcome

__all__ = [
    "BundleInfo",
    "DeliveryError",
    "Destination",
    "ImageOutcome",
    "StudyOutcome",
    "build_report",
    "build_secondary_capture",
    "object_uids",
    "parse_destinations",
    "send_dicomweb",
    "send_dimse",
]
