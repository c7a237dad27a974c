"""Labelled datasets for training and evaluation, and patient-level splits.

Three layouts are read (:func:`load_dataset` tells them apart, or ``layout=`` names one):

``mura``
    MURA's own: ``*_image_paths.csv`` / ``*_labeled_studies.csv`` when present, else the folders
    ``XR_<PART>/patient<N>/study<M>_<positive|negative>/image<K>.<ext>`` found by walking. Regions
    outside the seven parts (``XR_CHEST`` in the phantoms) are labelled ``other`` for stage 1.

``folders``
    The seed projects' class folders: every image lies under a folder named ``Fracture`` or
    ``Normal`` (see :data:`POSITIVE_WORDS` / :data:`NEGATIVE_WORDS` for the accepted spellings).
    The body part is the nearest folder named after one of the seven parts (``ELBOW``,
    ``XR_ELBOW``, ``Elbow`` ...; ``other`` or ``XR_<region>`` for stage 1's rejection class),
    above or below the class folder, or ``part=`` for every image without one. Folders above
    those (``train/``, ``val/``) are ignored: bonewatch makes its own splits. The first folder
    below the class and part folders names the patient, and the image's own folder its study;
    an image directly inside a class or part folder is its own patient and study.

``labels``
    Any folder of images (DICOM, PNG, JPEG) with a labels CSV (``labels.csv`` at the top, or
    ``labels=``). Its header names the columns, in any case; see :func:`load_dataset`.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bonewatch.ingest import (
    MURA_PARTS,
    ImageMeta,
    IngestError,
    body_part_hint,
    parse_mura_path,
    read_header,
)
from bonewatch.models.bundle import OTHER

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}
LAYOUTS = ("auto", "mura", "folders", "labels")
LABELS_CSV = "labels.csv"

# Class-folder names and label values, compared lower-case with spaces, "_" and "-" removed.
POSITIVE_WORDS = frozenset({"fracture", "fractured", "fractures", "positive", "abnormal"})
NEGATIVE_WORDS = frozenset(
    {"normal", "negative", "notfractured", "nonfractured", "nofracture", "unfractured"}
)
_LABEL_VALUES = {"1": 1, "0": 0, "true": 1, "false": 0, "yes": 1, "no": 0}

# Labels-CSV columns and the other names (DICOM keywords among them) each one answers to.
_COLUMNS: dict[str, tuple[str, ...]] = {
    "path": ("path", "file", "filename", "image"),
    "sop_instance_uid": ("sop_instance_uid", "sopinstanceuid"),
    "study_uid": ("study_uid", "studyinstanceuid", "study_instance_uid"),
    "label": ("label",),
    "patient": ("patient", "patient_id", "patientid"),
    "part": ("part", "body_part", "bodypartexamined", "body_part_examined"),
}
_MURA_REGION = re.compile(r"XR_([A-Z]+)")
_SQUASH = re.compile(r"[\s_\-]+")


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


# --- MURA ------------------------------------------------------------------------------------


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


def _image_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            yield path


def _walk_layout(root: Path) -> Iterator[Sample]:
    for path in _image_files(root):
        sample = _sample_from_path(path)
        if sample is not None:
            yield sample


# --- Fracture/ Normal/ folders -------------------------------------------------------------------


def _squash(text: str) -> str:
    return _SQUASH.sub("", text.strip().lower())


def _class_of_folder(name: str) -> int | None:
    word = _squash(name)
    if word in POSITIVE_WORDS:
        return 1
    if word in NEGATIVE_WORDS:
        return 0
    return None


def part_of_name(name: str) -> str | None:
    """The stage-1 class a folder name or CSV value names: a MURA part, ``other``, or None.

    ``ELBOW``, ``elbow``, ``XR_ELBOW`` and ``Elbow x-rays`` name ELBOW; ``other`` and MURA-style
    regions outside the seven (``XR_KNEE``) name ``other``.
    """
    if _squash(name) == OTHER:
        return OTHER
    region = _MURA_REGION.fullmatch(name.strip().upper())
    if region is not None:
        return region.group(1) if region.group(1) in MURA_PARTS else OTHER
    return body_part_hint(name)


def _folder_sample(root: Path, path: Path, default_part: str | None) -> Sample | None:
    folders = path.relative_to(root).parts[:-1]
    classes = [(i, c) for i, f in enumerate(folders) if (c := _class_of_folder(f)) is not None]
    if not classes:
        return None
    class_at, label = classes[-1]
    parts = [(i, p) for i, f in enumerate(folders) if i != class_at and (p := part_of_name(f))]
    if parts:
        part_at, part = parts[-1]
    elif default_part is not None:
        part_at, part = -1, default_part
    else:
        raise DatasetError(
            f"{path} lies in no folder named after a body part; put the images in part folders "
            f"({', '.join(MURA_PARTS)} or other), or name the part of the whole dataset"
        )
    below = max(class_at, part_at) + 1
    rel = path.relative_to(root).as_posix()
    if below < len(folders):
        patient = folders[below]
        study = "/".join(folders)
    else:
        patient = study = rel
    return Sample(path=path, part=part, label=label, patient=patient, study=study)


def _read_folder_layout(root: Path, default_part: str | None) -> list[Sample]:
    samples = []
    for path in _image_files(root):
        sample = _folder_sample(root, path, default_part)
        if sample is not None:
            samples.append(sample)
    return samples


# --- images with a labels CSV ----------------------------------------------------------------


def _label_value(text: str) -> int | None:
    word = _squash(text)
    if word in POSITIVE_WORDS:
        return 1
    if word in NEGATIVE_WORDS:
        return 0
    return _LABEL_VALUES.get(word)


def _column_map(header: Sequence[str], csv_path: Path) -> dict[str, str]:
    """Our column name -> the header's own spelling."""
    by_squashed = {_squash(h).replace("_", ""): h for h in header}
    found = {}
    for column, names in _COLUMNS.items():
        for name in names:
            if name.replace("_", "") in by_squashed:
                found[column] = by_squashed[name.replace("_", "")]
                break
    if "label" not in found:
        raise DatasetError(f"{csv_path} has no 'label' column (header: {', '.join(header)})")
    if not {"path", "sop_instance_uid", "study_uid"} & set(found):
        raise DatasetError(
            f"{csv_path} names no images: give a 'path', 'sop_instance_uid' or 'study_uid' "
            f"column (header: {', '.join(header)})"
        )
    return found


def _headers_under(root: Path, skip: Path, salt: str) -> list[ImageMeta]:
    """Headers of every readable image under ``root`` (DICOM files need no suffix)."""
    metas = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.resolve() == skip or path.name.startswith("."):
            continue
        try:
            metas.append(read_header(path, salt=salt))
        except (IngestError, OSError):
            continue  # not an image (CSV files, notes): unlabelled by definition
    return metas


def _read_labels_layout(
    root: Path, csv_path: Path, default_part: str | None, salt: str
) -> list[Sample]:
    with csv_path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = _column_map(reader.fieldnames or [], csv_path)
        rows = [(n, row) for n, row in enumerate(reader, start=2)]

    def cell(row: dict[str, str], column: str) -> str:
        return (row.get(columns[column]) or "").strip() if column in columns else ""

    needs_index = any(not cell(r, "path") for _, r in rows)
    by_sop: dict[str, ImageMeta] = {}
    by_study: dict[str, list[ImageMeta]] = {}
    if needs_index:
        for meta in _headers_under(root, csv_path.resolve(), salt):
            if meta.sop_instance_uid:
                by_sop.setdefault(meta.sop_instance_uid, meta)
            if meta.study_uid:
                by_study.setdefault(meta.study_uid, []).append(meta)

    samples: dict[Path, Sample] = {}
    missing: list[str] = []
    for n, row in rows:
        where = f"{csv_path.name} line {n}"
        label = _label_value(cell(row, "label"))
        if label is None:
            raise DatasetError(f"{where}: label {cell(row, 'label')!r} is not 1/0 or a class name")
        metas: list[ImageMeta]
        if path_text := cell(row, "path"):
            path = Path(path_text) if Path(path_text).is_absolute() else root / path_text
            if not path.is_file():
                raise DatasetError(f"{where}: image {path_text!r} not found under {root}")
            try:
                metas = [read_header(path, salt=salt)]
            except (IngestError, OSError) as exc:
                log.warning("skipping %s (%s): %s", path, where, exc)
                continue
        elif sop := cell(row, "sop_instance_uid"):
            metas = [by_sop[sop]] if sop in by_sop else []
        elif study := cell(row, "study_uid"):
            metas = by_study.get(study, [])
        else:
            raise DatasetError(
                f"{where} names no image (path, sop_instance_uid and study_uid empty)"
            )
        if not metas:
            missing.append(cell(row, "sop_instance_uid") or cell(row, "study_uid"))
            continue
        for meta in metas:
            sample = _labelled_sample(
                root,
                meta,
                row_part=cell(row, "part"),
                label=label,
                patient=cell(row, "patient"),
                default_part=default_part,
                where=where,
            )
            earlier = samples.get(sample.path)
            if earlier is not None and earlier.label != sample.label:
                raise DatasetError(f"{where}: {sample.path} is labelled both ways")
            samples.setdefault(sample.path, sample)
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        raise DatasetError(
            f"{len(missing)} UIDs in {csv_path.name} match no image under {root}: {shown}"
        )
    return list(samples.values())


def _labelled_sample(
    root: Path,
    meta: ImageMeta,
    *,
    row_part: str,
    label: int,
    patient: str,
    default_part: str | None,
    where: str,
) -> Sample:
    path = Path(meta.path)
    if row_part:
        part = part_of_name(row_part)
        if part is None:
            raise DatasetError(
                f"{where}: part {row_part!r} is none of {', '.join(MURA_PARTS)}, other"
            )
    else:
        part = body_part_hint(meta.body_part_examined) or default_part
        if part is None:
            raise DatasetError(
                f"{where}: {path.name} has no BodyPartExamined naming one of the seven parts; "
                "add a 'part' column or name the part of the whole dataset"
            )
    try:
        own = path.relative_to(root).as_posix()
    except ValueError:
        own = str(path)
    study = meta.study_uid or own
    return Sample(
        path=path,
        part=part,
        label=label,
        patient=patient or meta.patient_hash or study,
        study=study,
    )


# --- entry points ----------------------------------------------------------------------------


def detect_layout(root: str | Path, labels: str | Path | None = None) -> str:
    """Which layout ``root`` holds: ``labels``, ``mura`` or ``folders``.

    A labels CSV (given, or ``labels.csv`` at the top) wins; then MURA's CSV files or any
    MURA-layout image path; then class folders.

    Raises:
        DatasetError: ``root`` is not a folder, or holds none of the three layouts.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    if labels is not None or (root / LABELS_CSV).is_file():
        return "labels"
    if any(root.glob("*_image_paths.csv")):
        return "mura"
    found_class_folder = False
    for path in _image_files(root):
        if parse_mura_path(path) is not None:
            return "mura"
        rel = path.relative_to(root).parts[:-1]
        found_class_folder = found_class_folder or any(_class_of_folder(f) is not None for f in rel)
    if found_class_folder:
        return "folders"
    raise DatasetError(
        f"no dataset found under {root}: expected MURA's layout "
        "(XR_<PART>/patient<N>/study<M>_<positive|negative>/image<K>.png, or its CSV files), "
        "Fracture/ and Normal/ folders, or a labels.csv beside the images"
    )


def load_dataset(
    root: str | Path,
    *,
    layout: str = "auto",
    labels: str | Path | None = None,
    part: str | None = None,
    salt: str = "datasets",
) -> list[Sample]:
    """List every labelled image of a dataset folder.

    Args:
        root: The dataset folder.
        layout: ``auto`` (see :func:`detect_layout`), ``mura``, ``folders`` or ``labels``.
        labels: The labels CSV for the ``labels`` layout; ``root/labels.csv`` when None. Its
            header names the columns (any case; DICOM keywords work too):

            - ``label`` (required): 1/0, positive/negative, abnormal/normal, fracture/normal;
            - one of ``path`` (relative to ``root``), ``sop_instance_uid`` (one DICOM image) or
              ``study_uid`` (every image of that study); a row uses the first one it fills in;
            - ``patient`` (optional): else the DICOM PatientID (as a salted hash), else the study;
            - ``part`` (optional): else the DICOM BodyPartExamined, else ``part``.
        part: The body part of images whose layout names none (a single-part dataset).
        salt: Salt for hashing DICOM PatientIDs into patient keys.

    Raises:
        DatasetError: ``root`` holds no labelled images in that layout, or the layout is broken
            (a UID that matches no file, an image labelled both ways, an image with no part).
    """
    root = Path(root)
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    default_part = None
    if part is not None:
        default_part = part_of_name(part)
        if default_part is None:
            raise DatasetError(f"part {part!r} is none of {', '.join(MURA_PARTS)}, other")
    if layout == "auto":
        layout = detect_layout(root, labels)
    elif not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    if layout == "labels":
        csv_path = Path(labels) if labels is not None else root / LABELS_CSV
        if not csv_path.is_file():
            raise DatasetError(f"labels file {csv_path} does not exist")
        samples = _read_labels_layout(root, csv_path, default_part, salt)
        expected = f"labelled images in {csv_path}"
    elif layout == "folders":
        samples = _read_folder_layout(root, default_part)
        expected = "images under Fracture/ or Normal/ folders"
    elif any(root.glob("*_image_paths.csv")):
        samples = _read_csv_layout(root)
        expected = "images in the *_image_paths.csv files"
    else:
        samples = list(_walk_layout(root))
        expected = (
            "MURA-layout images (XR_<PART>/patient<N>/study<M>_<positive|negative>/image<K>.png)"
        )
    if not samples:
        raise DatasetError(f"no {expected} under {root}")
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
    if abs(sum(fractions) - 1.0) > 1e-6 or any(f < 0 for f in fractions):
        raise ValueError(f"fractions must be non-negative and sum to 1, got {list(fractions)}")
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


def kfold_by_patient(
    samples: Sequence[Sample], k: int, seed: int
) -> list[tuple[list[Sample], list[Sample]]]:
    """K (train, test) pairs for k-fold cross-validation; no patient is in two folds.

    Patients are shuffled with ``seed``, then each goes to the fold with the fewest images so
    far, so folds hold about the same number of images however many each patient has. Every
    sample is in exactly one test fold; a fold's train list is every other fold, in input order.

    Raises:
        ValueError: ``k`` is below 2 or above the number of patients.
    """
    images_of: dict[str, int] = {}
    for s in samples:
        images_of[s.patient] = images_of.get(s.patient, 0) + 1
    if k < 2:
        raise ValueError(f"k-fold needs at least 2 folds, got {k}")
    if k > len(images_of):
        raise ValueError(f"{k} folds need at least {k} patients; the dataset has {len(images_of)}")
    patients = sorted(images_of)
    random.Random(seed).shuffle(patients)
    fold_of: dict[str, int] = {}
    sizes = [0] * k
    for p in patients:
        fold = min(range(k), key=lambda f: (sizes[f], f))
        fold_of[p] = fold
        sizes[fold] += images_of[p]
    return [
        (
            [s for s in samples if fold_of[s.patient] != fold],
            [s for s in samples if fold_of[s.patient] == fold],
        )
        for fold in range(k)
    ]
