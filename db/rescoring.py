"""Re-scoring: images that another bundle already scored go back on the queue for a new one.

A prediction is kept per (image, bundle, version), so the old results stay beside the new.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Engine, and_, exists, func, select, update

from bonewatch.db._sql import chunks, released
from bonewatch.db.engine import write_transaction
from bonewatch.db.queries import glob_to_like
from bonewatch.db.schema import images, utcnow
from bonewatch.db.schema import predictions as prediction_table

RESCORABLE = ("done", "unsupported")


def queue_for_rescoring(
    engine: Engine,
    *,
    bundle_name: str,
    bundle_version: str,
    study: str | None = None,
    part: str | None = None,
    since: datetime | None = None,
    path_glob: str | None = None,
    queue: str = "bulk",
) -> list[int]:
    """Queue again every finished image that a model scored but ``bundle_name``
    ``bundle_version`` has not; returns their ids.

    Filters, where given: the study UID, a body part any earlier prediction gave the image,
    registration at or after ``since``, and a shell-style path pattern. Attempts start again
    from zero: the new bundle's run is new work.
    """
    p = prediction_table
    scored_by_model = exists().where(p.c.image_id == images.c.id)
    scored_by_this = exists().where(
        and_(
            p.c.image_id == images.c.id,
            p.c.bundle_name == bundle_name,
            p.c.bundle_version == bundle_version,
        )
    )
    stmt = (
        select(images.c.id)
        .where(images.c.status.in_(RESCORABLE), scored_by_model, ~scored_by_this)
        .order_by(images.c.id)
    )
    if study is not None:
        stmt = stmt.where(images.c.study_uid == study)
    if part is not None:
        stmt = stmt.where(
            exists().where(
                and_(p.c.image_id == images.c.id, func.upper(p.c.body_part) == part.upper())
            )
        )
    if since is not None:
        stmt = stmt.where(images.c.created_at >= since)
    if path_glob is not None:
        stmt = stmt.where(images.c.path.like(glob_to_like(path_glob), escape="\\"))
    with engine.connect() as conn:
        ids = [row[0] for row in conn.execute(stmt)]
    now = utcnow()
    queued: list[int] = []
    for chunk in chunks(ids):
        with write_transaction(engine) as conn:
            result = conn.execute(
                update(images)
                .where(images.c.id.in_(chunk), images.c.status.in_(RESCORABLE))
                .values(
                    status="queued",
                    queue=queue,
                    attempts=0,
                    reason=None,
                    error_class=None,
                    finished_at=None,
                    retry_after=None,
                    **released(now),
                )
                .returning(images.c.id)
            )
            queued.extend(row[0] for row in result)
    return sorted(queued)
