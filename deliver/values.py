"""The plain values the builders take: one study's results for one bundle version."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BundleInfo:
    """The model bundle that made the results."""

    name: str
    version: str
    intended_use: str
    not_for_clinical_use: bool


@dataclass(frozen=True)
class ImageOutcome:
    """One image's result: the source instance, its part and p(fracture) against the threshold."""

    sop_instance_uid: str
    sop_class_uid: str
    part: str
    p_fracture: float
    threshold: float

    @property
    def positive(self) -> bool:
        return self.p_fracture >= self.threshold


@dataclass(frozen=True)
class StudyOutcome:
    """A study's MURA result (the mean of its images' p(fracture)) and its images' results."""

    study_uid: str
    part: str | None
    mean_p_fracture: float
    threshold: float
    label: str  # "positive" or "negative"
    images: tuple[ImageOutcome, ...]
