"""Datasets in the three layouts, patient-level splits and k-fold folds that never leak."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bonewatch.ingest import make_uid, write_dicom, write_png
from bonewatch.models.datasets import (
    DatasetError,
    Sample,
    detect_layout,
    fingerprint,
    kfold_by_patient,
    load_dataset,
    part_of_name,
    split_by_patient,
)

GREY = np.full((12, 10), 0.5)


def _samples(n_patients: int) -> list[Sample]:
    out = []
    for p in range(n_patients):
        for study in range(1 + p % 3):
            for image in range(2):
                out.append(
                    Sample(
                        Path(f"p{p}/s{study}/i{image}.png"),
                        "WRIST",
                        p % 2,
                        f"patient{p:05d}",
                        f"XR_WRIST/patient{p:05d}/study{study}",
                    )
                )
    return out


def _png(root: Path, rel: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(path, GREY)
    return path


def _dicom(root: Path, rel: str, *, study: str, patient: str = "", body_part: str | None = None):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    write_dicom(
        path,
        GREY,
        study_uid=make_uid("study", study),
        series_uid=make_uid("series", study),
        sop_uid=make_uid("sop", rel),
        patient_id=patient,
        body_part=body_part,
    )
    return path


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# --- splits ----------------------------------------------------------------------------------


def test_no_patient_is_in_two_splits():
    groups = split_by_patient(_samples(200), (0.7, 0.15, 0.15), seed=3)
    patients = [{s.patient for s in g} for g in groups]
    assert not (patients[0] & patients[1]) and not (patients[0] & patients[2])
    assert not (patients[1] & patients[2])
    assert sum(len(g) for g in groups) == len(_samples(200))
    assert 120 <= len(patients[0]) <= 160


def test_split_is_deterministic_for_a_seed():
    a = split_by_patient(_samples(50), (0.5, 0.5), seed=1)
    b = split_by_patient(_samples(50), (0.5, 0.5), seed=1)
    assert a == b


def test_fractions_must_sum_to_one():
    with pytest.raises(ValueError):
        split_by_patient(_samples(5), (0.5, 0.2), seed=0)


# Random datasets: patients with 1-6 images each, interleaved in any order.
_datasets = st.lists(st.integers(min_value=1, max_value=6), min_size=2, max_size=40).flatmap(
    lambda counts: st.permutations(
        [
            Sample(Path(f"p{p}/i{i}.png"), "HAND", (p + i) % 2, f"patient{p}", f"p{p}/s{i % 2}")
            for p, n in enumerate(counts)
            for i in range(n)
        ]
    )
)


@settings(max_examples=60, deadline=None)
@given(samples=_datasets, seed=st.integers(0, 2**16), cut=st.floats(0.05, 0.9))
def test_split_never_puts_a_patient_in_two_groups(samples, seed, cut):
    rest = (1.0 - cut) / 2
    groups = split_by_patient(samples, (cut, rest, 1.0 - cut - rest), seed)
    owners: dict[str, int] = {}
    for g, group in enumerate(groups):
        for s in group:
            assert owners.setdefault(s.patient, g) == g, (
                f"{s.patient} in groups {owners[s.patient]}, {g}"
            )
    assert sorted(map(str, (s.path for g in groups for s in g))) == sorted(
        str(s.path) for s in samples
    )


@settings(max_examples=60, deadline=None)
@given(samples=_datasets, seed=st.integers(0, 2**16), k=st.integers(2, 10))
def test_kfold_folds_never_leak_a_patient(samples, seed, k):
    n_patients = len({s.patient for s in samples})
    if k > n_patients:
        with pytest.raises(ValueError):
            kfold_by_patient(samples, k, seed)
        return
    folds = kfold_by_patient(samples, k, seed)
    assert len(folds) == k
    tested: list[Sample] = []
    for train, test in folds:
        assert test, "every fold tests someone"
        assert not {s.patient for s in train} & {s.patient for s in test}
        assert sorted(map(str, (s.path for s in train + test))) == sorted(
            str(s.path) for s in samples
        )
        tested += test
    # every image is tested exactly once, so each patient lives in one fold only
    assert sorted(str(s.path) for s in tested) == sorted(str(s.path) for s in samples)


def test_kfold_balances_images_and_follows_the_seed():
    samples = _samples(60)
    folds = kfold_by_patient(samples, 5, seed=7)
    sizes = [len(test) for _, test in folds]
    assert max(sizes) - min(sizes) <= 6  # at most one patient's images (3 studies x 2) apart
    assert kfold_by_patient(samples, 5, seed=7) == folds
    assert kfold_by_patient(samples, 5, seed=8) != folds


def test_kfold_refuses_too_few_folds_or_patients():
    with pytest.raises(ValueError, match="at least 2"):
        kfold_by_patient(_samples(4), 1, seed=0)
    with pytest.raises(ValueError, match="patients"):
        kfold_by_patient(_samples(4), 5, seed=0)


def test_fingerprint_follows_content(tmp_path):
    path = tmp_path / "image1.png"
    path.write_bytes(b"one")
    sample = Sample(path, "WRIST", 1, "patient00001", "XR_WRIST/patient00001/study1_positive")
    before = fingerprint([sample])
    assert fingerprint([sample]) == before
    path.write_bytes(b"two")
    assert fingerprint([sample]) != before


# --- MURA ------------------------------------------------------------------------------------


def test_mura_layout_by_walking_and_by_csv(tmp_path):
    root = tmp_path / "MURA-v1.1"
    rels = [
        "train/XR_ELBOW/patient00001/study1_positive/image1.png",
        "train/XR_ELBOW/patient00001/study1_positive/image2.png",
        "train/XR_HAND/patient00002/study1_negative/image1.png",
        "train/XR_CHEST/patient00003/study1_negative/image1.png",
    ]
    for rel in rels:
        _png(root, rel)
    walked = load_dataset(root)
    assert detect_layout(root) == "mura"
    assert sorted((s.part, s.label, s.patient) for s in walked) == [
        ("ELBOW", 1, "patient00001"),
        ("ELBOW", 1, "patient00001"),
        ("HAND", 0, "patient00002"),
        ("other", 0, "patient00003"),
    ]
    # the CSVs, when present, are the truth: here they list two images and relabel the study
    (root / "train_image_paths.csv").write_text("".join(f"MURA-v1.1/{r}\n" for r in rels[:2]))
    (root / "train_labeled_studies.csv").write_text(
        "MURA-v1.1/train/XR_ELBOW/patient00001/study1_positive/,0\n"
    )
    listed = load_dataset(root)
    assert [(s.path.name, s.label) for s in listed] == [("image1.png", 0), ("image2.png", 0)]


# --- Fracture/ Normal/ folders -------------------------------------------------------------------


def test_class_folders_with_part_folders_above_or_below(tmp_path):
    _png(tmp_path, "train/XR_ELBOW/Fracture/a.png")
    _png(tmp_path, "train/Normal/Hand/b.png")
    _png(tmp_path, "val/not fractured/wrist/pat7/c1.png")
    _png(tmp_path, "val/not fractured/wrist/pat7/c2.png")
    _png(tmp_path, "val/Fractured/wrist/pat7/d.png")
    _png(tmp_path, "notes/ignored.png")  # in no class folder: not part of the dataset
    assert detect_layout(tmp_path) == "folders"
    samples = {s.path.name: s for s in load_dataset(tmp_path)}
    assert set(samples) == {"a.png", "b.png", "c1.png", "c2.png", "d.png"}
    assert (samples["a.png"].part, samples["a.png"].label) == ("ELBOW", 1)
    assert (samples["b.png"].part, samples["b.png"].label) == ("HAND", 0)
    # a folder below the class and part folders is the patient, whatever its class
    assert samples["c1.png"].patient == samples["d.png"].patient == "pat7"
    assert samples["c1.png"].study == samples["c2.png"].study != samples["d.png"].study
    # an image straight in its class folder is its own patient
    assert samples["a.png"].patient != samples["b.png"].patient


def test_class_folders_without_parts_need_the_part_named(tmp_path):
    _png(tmp_path, "Fracture/1.png")
    _png(tmp_path, "Normal/2.png")
    with pytest.raises(DatasetError, match="body part"):
        load_dataset(tmp_path)
    samples = load_dataset(tmp_path, part="humerus")
    assert {(s.path.name, s.part, s.label) for s in samples} == {
        ("1.png", "HUMERUS", 1),
        ("2.png", "HUMERUS", 0),
    }


def test_part_names_in_folders_and_cells():
    assert part_of_name("XR_SHOULDER") == "SHOULDER"
    assert part_of_name("Elbow x-rays") == "ELBOW"
    assert part_of_name("XR_KNEE") == "other"
    assert part_of_name("Other") == "other"
    assert part_of_name("patient12") is None


def test_an_empty_or_unknown_folder_is_a_clear_error(tmp_path):
    _png(tmp_path, "pictures/x.png")
    with pytest.raises(DatasetError, match="Fracture"):
        load_dataset(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "missing")
    with pytest.raises(DatasetError, match="layout"):
        load_dataset(tmp_path, layout="coco")


# --- images with a labels CSV ----------------------------------------------------------------


def test_labels_csv_by_path_sop_and_study_uid(tmp_path):
    _dicom(tmp_path, "a/1.dcm", study="s1", patient="P1", body_part="WRIST")
    _dicom(tmp_path, "a/2.dcm", study="s1", patient="P1", body_part="WRIST")
    _dicom(tmp_path, "b/3", study="s2", patient="P1", body_part="HAND")  # no suffix: sniffed
    _dicom(tmp_path, "c/4.dcm", study="s3", patient="P2", body_part="EXTREMITY")
    _png(tmp_path, "d/5.png")
    _dicom(tmp_path, "e/unlabelled.dcm", study="s9", patient="P9", body_part="WRIST")
    _write_csv(
        tmp_path / "labels.csv",
        ["StudyInstanceUID", "SOPInstanceUID", "path", "label", "Part", "patient"],
        [
            [make_uid("study", "s1"), "", "", "abnormal", "", ""],
            ["", make_uid("sop", "b/3"), "", "0", "", ""],
            ["", "", "c/4.dcm", "normal", "forearm", ""],
            ["", "", "d/5.png", "1", "XR_ELBOW", "P3"],
        ],
    )
    assert detect_layout(tmp_path) == "labels"
    samples = {s.path.name: s for s in load_dataset(tmp_path)}
    assert set(samples) == {"1.dcm", "2.dcm", "3", "4.dcm", "5.png"}
    assert {samples[n].label for n in ("1.dcm", "2.dcm")} == {1}
    assert (samples["3"].part, samples["3"].label) == ("HAND", 0)  # from BodyPartExamined
    assert samples["4.dcm"].part == "FOREARM"  # the column wins over a vague header
    assert samples["5.png"].patient == "P3"
    # one PatientID, one patient key (a salted hash), across studies
    assert samples["1.dcm"].patient == samples["3"].patient != samples["4.dcm"].patient
    assert samples["1.dcm"].study == samples["2.dcm"].study == make_uid("study", "s1")
    groups = split_by_patient(list(samples.values()), (0.5, 0.5), seed=0)
    assert not {s.patient for s in groups[0]} & {s.patient for s in groups[1]}


def test_labels_csv_elsewhere_and_its_errors(tmp_path):
    data = tmp_path / "data"
    _dicom(data, "1.dcm", study="s1", body_part="CHEST")
    _dicom(data, "2.dcm", study="s2")
    labels = _write_csv(tmp_path / "mine.csv", ["sop_instance_uid", "label", "part"], [])
    with pytest.raises(DatasetError, match="no labelled images"):
        load_dataset(data, labels=labels)

    _write_csv(labels, ["sop_instance_uid", "label"], [[make_uid("sop", "1.dcm"), "1"]])
    with pytest.raises(DatasetError, match="seven parts"):  # CHEST names no part
        load_dataset(data, labels=labels)
    assert load_dataset(data, labels=labels, part="other")[0].part == "other"

    _write_csv(labels, ["sop_instance_uid", "label"], [[make_uid("sop", "nope"), "1"]])
    with pytest.raises(DatasetError, match="match no image"):
        load_dataset(data, labels=labels, part="WRIST")

    _write_csv(labels, ["sop_instance_uid", "label"], [[make_uid("sop", "2.dcm"), "maybe"]])
    with pytest.raises(DatasetError, match="maybe"):
        load_dataset(data, labels=labels, part="WRIST")

    _write_csv(
        labels,
        ["study_uid", "sop_instance_uid", "label"],
        [[make_uid("study", "s2"), "", "1"], ["", make_uid("sop", "2.dcm"), "0"]],
    )
    with pytest.raises(DatasetError, match="both ways"):
        load_dataset(data, labels=labels, part="WRIST")

    _write_csv(labels, ["path", "diagnosis"], [["1.dcm", "1"]])
    with pytest.raises(DatasetError, match="'label' column"):
        load_dataset(data, labels=labels)

    _write_csv(labels, ["path", "label"], [["missing.dcm", "1"]])
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(data, labels=labels, part="WRIST")
