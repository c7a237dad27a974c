"""Labelled datasets for training and evaluation, and patient-level splits.

A MURA-layout dataset is read through its ``*_image_paths.csv`` / ``*_labeled_studies.csv`` files
when they are present, else by walking ``XR_<PART>/patient<N>/study<M>_<label>/`` folders. Regions
outside the seven parts (``XR_CHEST`` in the phantoms) are labelled ``other`` for stage 1.
"""

from __future__ import annotations

import csv
import hashlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ingest import MURA_PARTS, parse_mura_path
from models.bundle import OTHER

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}


class DatasetError(Exception):
    """A dataset folder that bonewatch cannot read (wrong layout, missing files)."""


@dataclass(frozen=True)
class Sample:
    """One labelled image: where it is, its stage-1 class, its study label and its patient."""

    path: Path
    part: str  # one of MURA_PARTS, or "other"
    label: int  # study label: 1 abnormal, 0 normal
    patient: str
    study: str


def _sample_from_path(path: Path, label: int | None = None) -> Sample | None:
    info = parse_mura_path(path)
    if info is None:
        return None
    region = str(info["mura_part"])
    return Sample(
        path=path,
        part=region if region in MURA_PARTS else OTHER,
        label=int(info["mura_label"]) if label is None else label,  # type: ignore[call-overload]
        patient=str(info["mura_patient"]),
        study=str(info["mura_study"]),
    )


def _resolve_csv_path(root: Path, line: str) -> Path:
    """MURA's CSV paths start with the dataset folder's own name (``MURA-v1.1/train/...``)."""
    rel = Path(line.strip())
    for candidate in (root.parent / rel, root / rel, root / Path(*rel.parts[1:])):
        if candidate.exists():
            return candidate
    raise DatasetError(f"image {line.strip()!r} listed in the CSV was not found under {root}")


def _read_csv_layout(root: Path) -> list[Sample]:
    study_labels: dict[str, int] = {}
    for csv_path in sorted(root.glob("*_labeled_studies.csv")):
        with csv_path.open(newline="") as fh:
            for row in csv.reader(fh):
                if len(row) >= 2:
                    study_labels[row[0].strip().rstrip("/")] = int(row[1])
    samples = []
    for csv_path in sorted(root.glob("*_image_paths.csv")):
        with csv_path.open(newline="") as fh:
            for row in csv.reader(fh):
                if not row or not row[0].strip():
                    continue
                path = _resolve_csv_path(root, row[0])
                study_key = str(Path(row[0].strip()).parent)
                sample = _sample_from_path(path, study_labels.get(study_key))
                if sample is None:
                    raise DatasetError(f"{row[0]!r} in {csv_path.name} is not a MURA-layout path")
                samples.append(sample)
    return samples


def _walk_layout(root: Path) -> Iterator[Sample]:
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            sample = _sample_from_path(path)
            if sample is not None:
                yield sample


def load_dataset(root: str | Path) -> list[Sample]:
    """List every labelled image of a MURA-layout dataset.

    Raises:
        DatasetError: ``root`` holds no MURA-layout images.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    if any(root.glob("*_image_paths.csv")):
        samples = _read_csv_layout(root)
    else:
        samples = list(_walk_layout(root))
    if not samples:
        raise DatasetError(
            f"no MURA-layout images under {root} "
            "(expected XR_<PART>/patient<N>/study<M>_<positive|negative>/image<K>.png)"
        )
    return samples


def fingerprint(samples: Sequence[Sample]) -> str:
    """A sha256 over every image's study, name, labels and content: same data, same print."""
    digest = hashlib.sha256()
    for s in sorted(samples, key=lambda s: (s.study, s.path.name)):
        content = hashlib.sha256(s.path.read_bytes()).hexdigest()
        digest.update(f"{s.study}/{s.path.name}|{s.part}|{s.label}|{content}\n".encode())
    return digest.hexdigest()


def split_by_patient(
    samples: Sequence[Sample], fractions: Sequence[float], seed: int
) -> list[list[Sample]]:
    """Split samples into len(fractions) groups so that no patient is in two groups.

    Patients are shuffled with ``seed`` and dealt out by cumulative fraction of patients.
    """
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {list(fractions)}")
    patients = sorted({s.patient for s in samples})
    random.Random(seed).shuffle(patients)
    bounds, acc = [], 0.0
    for f in fractions:
        acc += f
        bounds.append(round(acc * len(patients)))
    group_of: dict[str, int] = {}
    start = 0
    for g, end in enumerate(bounds):
        for p in patients[start:end]:
            group_of[p] = g
        start = end
    groups: list[list[Sample]] = [[] for _ in fractions]
    for s in samples:
        groups[group_of[s.patient]].append(s)
    return groups
