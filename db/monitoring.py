"""What ``/metrics`` and ``/healthz`` read from the ledger: queue contents, prediction timings
in id order (so a scraper reads each once), and the outbox's pending deliveries."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, func, select, text

from bonewatch.db.schema import QUEUES, images, predictions


def ping(engine: Engine) -> None:
    """Raise the driver's error unless the ledger answers a trivial query."""
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def queued_by_queue(engine: Engine) -> dict[str, int]:
    """Images waiting (``queued``) per queue; every queue is a key."""
    counts = dict.fromkeys(QUEUES, 0)
    with engine.connect() as conn:
        for queue, n in conn.execute(
            select(images.c.queue, func.count())
            .where(images.c.status == "queued")
            .group_by(images.c.queue)
        ):
            counts[queue] = int(n)
    return counts


def prediction_timings_after(
    engine: Engine, after_id: int, *, limit: int = 5000
) -> list[tuple[int, dict[str, Any]]]:
    """``(prediction id, timings)`` of predictions past ``after_id``, in id order."""
    stmt = (
        select(predictions.c.id, predictions.c.timings)
        .where(predictions.c.id > after_id)
        .order_by(predictions.c.id)
        .limit(limit)
    )
    with engine.connect() as conn:
        return [(int(row.id), dict(row.timings or {})) for row in conn.execute(stmt)]


def pending_deliveries(engine: Engine) -> int | None:
    """Result objects waiting in the outbox (``deliveries``), or None in a build without it."""
    try:
        from bonewatch.db.deliveries import count_deliveries
    except ImportError:
        return None
    return count_deliveries(engine)["pending"]
