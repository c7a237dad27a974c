"""db/monitoring.py: what /metrics reads, on both dialects."""

from __future__ import annotations

from bonewatch.db import NewImage, register_images
from bonewatch.db.monitoring import (
    pending_deliveries,
    ping,
    prediction_timings_after,
    queued_by_queue,
)
from tests.db.review_ledger import add_study


def test_queue_contents_and_timings(db_engine):
    ping(db_engine)
    register_images(
        db_engine,
        [
            NewImage(
                path=f"/in/{i}",
                sha256=f"{i:064x}",
                size_bytes=1,
                format="png",
                queue="bulk" if i % 2 else "live",
            )
            for i in range(5)
        ],  # fmt: skip
    )
    assert queued_by_queue(db_engine) == {"live": 3, "bulk": 2}
    add_study(db_engine, "1.2.3", [0.9, 0.1])
    rows = prediction_timings_after(db_engine, 0)
    assert len(rows) == 2 and rows[0][1]["stage1_ms"] == 5.0
    assert prediction_timings_after(db_engine, rows[0][0]) == rows[1:]
    assert prediction_timings_after(db_engine, rows[1][0]) == []


def test_pending_deliveries_of_an_empty_outbox(db_engine):
    assert pending_deliveries(db_engine) == 0
