"""The heatmap Secondary Capture of one image: the original's pixels with the Grad-CAM heatmap
over them and the caption burned in, in a new series of the same study."""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from bonewatch.deliver.uids import object_uids
from bonewatch.deliver.values import BundleInfo, ImageOutcome

MANUFACTURER = "bonewatch"
SC_SERIES_NUMBER = 9902


def build_secondary_capture(
    source: Dataset,
    picture: np.ndarray,
    image: ImageOutcome,
    bundle: BundleInfo,
    *,
    instance_number: int = 1,
) -> Dataset:
    """The Secondary Capture of ``picture`` (uint8 RGB, the captioned overlay), derived from
    ``source`` (its header; its patient and study modules are copied).

    Raises:
        ValueError: ``picture`` is not uint8 RGB, or ``source`` is not ``image``'s instance.
    """
    if picture.dtype != np.uint8 or picture.ndim != 3 or picture.shape[2] != 3:
        raise ValueError(
            f"the picture must be uint8 (H, W, 3), not {picture.dtype} {picture.shape}"
        )
    if str(source.SOPInstanceUID) != image.sop_instance_uid:
        raise ValueError("the source header is not the image's")
    uids = object_uids(
        str(source.StudyInstanceUID), bundle.name, bundle.version, "sc", image.sop_instance_uid
    )
    # The source's patient orientation when it gives one; else empty (Type 2: unknown), set
    # after highdicom, which insists on two values.
    orientation = tuple(str(v) for v in source.get("PatientOrientation") or ())
    known = len(orientation) == 2 and all(orientation)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=np.ascontiguousarray(picture),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=uids.series_uid,
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        patient_orientation=orientation if known else ("A", "F"),  # type: ignore[arg-type]
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    if not known:
        sc["PatientOrientation"].value = None
    sc.BurnedInAnnotation = "YES"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.SeriesDescription = f"bonewatch {bundle.name} {bundle.version} heatmaps"
    sc.DerivationDescription = (
        f"Grad-CAM heatmap of {bundle.name} {bundle.version} over the source image; "
        f"p(fracture) {image.p_fracture:.3f}, threshold {image.threshold:.3f}"
    )
    sc.SoftwareVersions = f"{bundle.name} {bundle.version}"
    ref = Dataset()
    ref.ReferencedSOPClassUID = image.sop_class_uid
    ref.ReferencedSOPInstanceUID = image.sop_instance_uid
    sc.SourceImageSequence = [ref]
    if source.get("BodyPartExamined"):
        sc.BodyPartExamined = source.BodyPartExamined
        # The upper limb is paired: General Series' Laterality (Type 2C) is then required; the
        # source's, else its image laterality when that says R or L, else empty (unknown).
        image_side = str(source.get("ImageLaterality") or "")
        side = source.get("Laterality") or (image_side if image_side in ("R", "L") else None)
        sc.add_new(0x00200060, "CS", side)  # Laterality
    elif source.get("Laterality"):
        sc.Laterality = source.Laterality
    return sc
