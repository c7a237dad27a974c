"""The study's DICOM Structured Report: a TID 1500 Measurement Report, built with highdicom.

It holds a device observer (bonewatch, and the bundle's name and version), the procedure
reported, one measurement group per image (finding site, p(fracture), the threshold and the
qualitative evaluation "fracture present / absent" at the part's threshold, referencing the
image), one group for the study (the MURA mean, the threshold, the label), and the bundle's
intended use as a text item among the study group's qualitative evaluations (TID 1501 allows
TEXT there).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from bonewatch.deliver import codes as bw
from bonewatch.deliver.uids import device_uid, object_uids
from bonewatch.deliver.values import BundleInfo, StudyOutcome

MANUFACTURER = "bonewatch"
SR_SERIES_NUMBER = 9901


def _presence(positive: bool) -> hd.sr.QualitativeEvaluation:
    return hd.sr.QualitativeEvaluation(bw.FRACTURE, bw.PRESENT if positive else bw.ABSENT)


def _number(
    name: Code, value: float, algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.Measurement:
    return hd.sr.Measurement(
        name=name, value=round(float(value), 6), unit=bw.NO_UNITS, algorithm_id=algorithm
    )


def build_report(study: StudyOutcome, bundle: BundleInfo, sources: Sequence[Dataset]) -> Dataset:
    """The Comprehensive SR of ``study``'s results.

    Args:
        sources: the headers of the study's images (pixel data not needed), one per image of
            ``study.images`` at least; their patient and study modules are copied.

    Raises:
        ValueError: a result's image is not among ``sources``, or the study has no images.
    """
    if not study.images:
        raise ValueError(f"study {study.study_uid} has no image results")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    missing = [i.sop_instance_uid for i in study.images if i.sop_instance_uid not in by_uid]
    if missing:
        raise ValueError(f"no source header for {', '.join(missing)}")
    evidence = [by_uid[i.sop_instance_uid] for i in study.images]
    algorithm = hd.sr.AlgorithmIdentification(name=bundle.name, version=bundle.version)
    uids = object_uids(study.study_uid, bundle.name, bundle.version, "sr")
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(bundle.name, bundle.version),
            name="bonewatch",
            manufacturer_name=MANUFACTURER,
            model_name=f"{bundle.name} {bundle.version}",
        ),
    )
    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations] = []
    for n, image in enumerate(study.images, start=1):
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    identifier=f"image {n}", uid=f"{uids.sop_instance_uid}.{n}"
                ),
                algorithm_id=algorithm,
                finding_sites=[hd.sr.FindingSite(bw.part_code(image.part))],
                measurements=[
                    _number(bw.P_FRACTURE, image.p_fracture, algorithm),
                    _number(bw.THRESHOLD, image.threshold, algorithm),
                ],
                qualitative_evaluations=[_presence(image.positive)],
                source_images=[
                    hd.sr.SourceImageForMeasurementGroup(
                        referenced_sop_class_uid=image.sop_class_uid,
                        referenced_sop_instance_uid=image.sop_instance_uid,
                    )
                ],
            )
        )
    study_group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            identifier="study", uid=f"{uids.sop_instance_uid}.0"
        ),
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(bw.part_code(study.part))],
        measurements=[
            _number(bw.STUDY_MEAN, study.mean_p_fracture, algorithm),
            _number(bw.THRESHOLD, study.threshold, algorithm),
        ],
        qualitative_evaluations=[_presence(study.label == "positive")],
    )
    study_group[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=bw.INTENDED_USE,
            value=bundle.intended_use[:1024] or "not stated",
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    groups.append(study_group)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=bw.PROCEDURE,
        imaging_measurements=groups,
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=uids.series_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=f"bonewatch {bundle.name} {bundle.version} report",
    )
    sr.CodingSchemeIdentificationSequence = [bw.coding_scheme_identification()]
    sr.SoftwareVersions = f"{bundle.name} {bundle.version}"
    return sr
