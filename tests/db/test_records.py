"""Tests for db/records.py: each field declared once maps onto the ledger's columns."""

from __future__ import annotations

from dataclasses import dataclass, fields

import pytest

from bonewatch.db import ClaimedImage, NewImage, PredictionRecord
from bonewatch.db.records import (
    FAILURE_IMAGE_FIELDS,
    PREDICTION_IMAGE_FIELDS,
    image_values,
    prediction_values,
)
from bonewatch.db.schema import images, predictions


def test_every_field_is_a_column_of_its_table() -> None:
    assert {f.name for f in fields(NewImage)} <= set(images.c.keys())
    assert {f.name for f in fields(ClaimedImage)} - {"image_id"} <= set(images.c.keys())
    prediction_fields = {f.name for f in fields(PredictionRecord)}
    assert set(PREDICTION_IMAGE_FIELDS) <= prediction_fields
    assert set(PREDICTION_IMAGE_FIELDS) <= set(images.c.keys())
    assert FAILURE_IMAGE_FIELDS == ("status", "error_class", "reason")
    assert set(FAILURE_IMAGE_FIELDS) <= set(images.c.keys())
    assert prediction_fields - set(PREDICTION_IMAGE_FIELDS) <= set(predictions.c.keys())


def _record(**kw: object) -> PredictionRecord:
    values: dict[str, object] = {
        "image_id": 1,
        "bundle_name": "b",
        "bundle_version": "1",
        "status": "done",
        "reason": None,
        "body_part_probs": {"ELBOW": 0.9},
        "body_part": "ELBOW",
        "body_part_confidence": 0.9,
        "body_part_examined": None,
        "body_part_disagrees": False,
        "p_fracture": 0.7,
        "label": "positive",
        "threshold": 0.5,
        "fracture_model": "m",
        "timings": {"t": 1.0},
        "rows": 10,
    }
    return PredictionRecord(**{**values, **kw})  # type: ignore[arg-type]


def test_row_values_follow_the_fields() -> None:
    item = NewImage(path="/a.dcm", sha256="0" * 64, size_bytes=1, format="dicom", rows=3)
    assert image_values(item)["rows"] == 3 and image_values(item)["queue"] == "live"
    assert len(image_values(item)) == len(fields(NewImage))
    row = prediction_values(_record())
    assert not set(PREDICTION_IMAGE_FIELDS) & set(row)
    assert row["p_fracture"] == 0.7 and row["timings"] == {"t": 1.0}


@dataclass
class _Meta:
    path: str
    sha256: str
    format: str
    size_bytes: int
    rows: int | None = None
    study_uid: str | None = None
    photometric: str | None = None  # not a NewImage field: left out


def test_from_attrs_copies_same_named_fields_and_takes_overrides() -> None:
    meta = _Meta(path="/a.dcm", sha256="f" * 64, format="dicom", size_bytes=9, rows=7)
    item = NewImage.from_attrs(meta, queue="bulk", study_uid="S1")
    assert item == NewImage(
        path="/a.dcm",
        sha256="f" * 64,
        size_bytes=9,
        format="dicom",
        queue="bulk",
        study_uid="S1",
        rows=7,
    )
    record = _record()
    assert PredictionRecord.from_attrs(record, image_id=2) == _record(image_id=2)
    with pytest.raises(TypeError, match="no field nonsense"):
        NewImage.from_attrs(meta, nonsense=1)
    with pytest.raises(TypeError):
        PredictionRecord.from_attrs(meta)  # image_id and the rest are missing
