from pathlib import Path

import pytest

from models.datasets import Sample, split_by_patient


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


def test_fingerprint_follows_content(tmp_path):
    from models.datasets import fingerprint

    path = tmp_path / "image1.png"
    path.write_bytes(b"one")
    sample = Sample(path, "WRIST", 1, "patient00001", "XR_WRIST/patient00001/study1_positive")
    before = fingerprint([sample])
    assert fingerprint([sample]) == before
    path.write_bytes(b"two")
    assert fingerprint([sample]) != before
