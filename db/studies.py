"""Study completeness: when a study's instances arrived, and when it counted as received.

A study is complete once no new instance of it has arrived for a quiet time (DICOM has no
"end of study" message). Registration moves ``last_received_at``; :func:`mark_stable_studies`,
run by any sweep, sets ``stable_at`` to the moment the quiet time ran out, which is the same
whichever process runs the sweep and however late.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, and_, select, update

from bonewatch.db._sql import CHUNK, insert
from bonewatch.db.engine import write_transaction
from bonewatch.db.schema import studies, utcnow

_ARRIVAL_COLUMNS: tuple[Any, ...] = (
    studies.c.study_uid,
    studies.c.first_received_at,
    studies.c.last_received_at,
    studies.c.n_received,
    studies.c.stable_at,
)


def note_arrivals(conn: Connection, arrivals: dict[str, int], now: datetime) -> None:
    """Record ``arrivals`` (study UID -> new instances) at ``now``; a study that had counted as
    complete is open again. Part of the registering transaction."""
    for uid in sorted(arrivals):  # one lock order for concurrent registrants
        stmt = insert(conn, studies).values(
            study_uid=uid,
            first_received_at=now,
            last_received_at=now,
            n_received=arrivals[uid],
            stable_at=None,
        )
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[studies.c.study_uid],
                set_={
                    "last_received_at": now,
                    "n_received": studies.c.n_received + arrivals[uid],
                    "stable_at": None,
                },
            )
        )


def mark_stable_studies(
    engine: Engine, stable_seconds: float, *, now: datetime | None = None
) -> int:
    """Set ``stable_at`` on the studies quiet for ``stable_seconds``: their last arrival plus that
    time. Returns how many were marked; safe to run from any process at any time."""
    now = now or utcnow()
    quiet = timedelta(seconds=stable_seconds)
    due = (
        select(studies.c.study_uid, studies.c.last_received_at)
        .where(studies.c.stable_at.is_(None), studies.c.last_received_at <= now - quiet)
        .order_by(studies.c.study_uid)
        .limit(CHUNK)
    )
    marked = 0
    while True:
        # Read first, without the write lock: most sweeps find nothing to mark.
        with engine.connect() as conn:
            rows = conn.execute(due).all()
        if not rows:
            return marked
        with write_transaction(engine) as conn:
            for row in rows:
                # Unless an instance arrived since the read (then the study stays open).
                marked += conn.execute(
                    update(studies)
                    .where(
                        and_(
                            studies.c.study_uid == row.study_uid,
                            studies.c.last_received_at == row.last_received_at,
                            studies.c.stable_at.is_(None),
                        )
                    )
                    .values(stable_at=row.last_received_at + quiet)
                ).rowcount
        if len(rows) < CHUNK:
            return marked


def query_arrivals(
    engine: Engine, *, study: str | None = None, stable: bool | None = None
) -> list[dict[str, object]]:
    """One dict per study: study_uid, first_received_at, last_received_at, n_received and
    stable_at (ISO strings; stable_at None while the study may still grow), ordered by study.
    ``stable`` keeps only complete (True) or open (False) studies."""
    stmt = select(*_ARRIVAL_COLUMNS).order_by(studies.c.study_uid)
    if study is not None:
        stmt = stmt.where(studies.c.study_uid == study)
    if stable is True:
        stmt = stmt.where(studies.c.stable_at.is_not(None))
    elif stable is False:
        stmt = stmt.where(studies.c.stable_at.is_(None))
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    return [
        {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row._mapping.items()}
        for row in rows
    ]
