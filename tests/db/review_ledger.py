"""Studies written into a ledger through its own functions, for the review tests."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from sqlalchemy import Engine

from bonewatch.db import NewImage, PredictionRecord, record_results, register_images
from bonewatch.db.records import FailureRecord

BUNDLE = ("review-bundle", "1.0")
_serial = itertools.count(1)


def add_study(
    engine: Engine,
    uid: str,
    scores: Sequence[float | None],
    *,
    part: str = "WRIST",
    threshold: float = 0.5,
    bundle: tuple[str, str] = BUNDLE,
    paths: Sequence[str] | None = None,
    failed: int = 0,
) -> list[int]:
    """Register one image per score (plus ``failed`` unreadable ones) and record the scores
    (None: stage 1 refused the image); returns the image ids."""
    n = len(scores) + failed
    paths = list(paths) if paths is not None else [f"/archive/{uid}/{i}.dcm" for i in range(n)]
    registered = register_images(
        engine,
        [
            NewImage(
                path=path,
                sha256=f"{next(_serial):064x}",
                size_bytes=10,
                format="dicom",
                study_uid=uid,
            )  # fmt: skip
            for path in paths
        ],
    )
    ids = [r.image_id for r in registered]
    records = [
        PredictionRecord(
            image_id=image_id,
            bundle_name=bundle[0],
            bundle_version=bundle[1],
            status="done" if p is not None else "unsupported",
            reason=None if p is not None else "stage 1 says: other",
            body_part_probs={part: 0.9, "other": 0.1},
            body_part=part if p is not None else None,
            body_part_confidence=0.9,
            body_part_examined=None,
            body_part_disagrees=False,
            p_fracture=p,
            label=None if p is None else ("positive" if p >= threshold else "negative"),
            threshold=threshold if p is not None else None,
            fracture_model=f"{part.lower()}-v1",
            timings={"preprocess_ms": 1.0, "stage1_ms": 5.0, "stage2_ms": 4.0},
        )
        for image_id, p in zip(ids, scores, strict=False)
    ]
    failures = [
        FailureRecord(image_id=i, status="failed", error_class="CorruptFileError", reason="bad")
        for i in ids[len(scores) :]
    ]
    record_results(engine, records, failures)
    return ids
