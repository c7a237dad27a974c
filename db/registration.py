"""Registering files in the ledger: idempotent inserts and deduplication by fingerprint.

A path keeps one row per content it showed, with one exception: a file whose newest row never
got a result (``failed``, ``unsupported`` or still ``queued``, no prediction) and whose bytes
have changed since is taken again as that same row. A file that failed while it was still being
written (a pause longer than the settle time) thus ends as one row, ``done`` once complete,
never a failed row beside a done one; a row that holds a result stays, and new bytes at its path
are a new image.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Insert,
    and_,
    bindparam,
    delete,
    exists,
    false,
    or_,
    select,
    update,
)

from bonewatch.db._sql import check_choice, chunks, insert, released, update_each
from bonewatch.db.engine import write_transaction
from bonewatch.db.records import NewImage, Registered, image_values
from bonewatch.db.schema import fingerprints, images, predictions, studies, utcnow
from bonewatch.db.studies import note_arrivals

logger = logging.getLogger(__name__)

# Failures that say nothing about the file itself; seeing the file again retries it.
# A file that kept killing its workers (LeaseExpired, WorkerDied) is not retried this way.
RETRYABLE_ERRORS = ("TransientIOError",)

# The statuses of a newest row that is taken again when its path shows other bytes: no result
# was recorded for it, so the new bytes are the same file, complete now (or changed before use).
RETAKEN_STATUSES = ("failed", "unsupported", "queued")

Key = tuple[str, str | None]  # (path, sha256): one row


def _fingerprint_values(item: NewImage) -> list[tuple[str, str]]:
    values: list[tuple[str, str]] = []
    if item.sha256:
        values.append(("sha256", item.sha256))
    if item.sop_instance_uid:
        sop = item.sop_instance_uid
        if item.frame_number is not None:
            sop = f"{sop}#{item.frame_number}"
        values.append(("sop", sop))
    return values


def register_images(
    engine: Engine, items: Sequence[NewImage], *, retake_finished: bool = True
) -> list[Registered]:
    """Register files in the ledger, idempotently, marking copies as duplicates.

    A file already registered at the same path with the same sha256 keeps its row
    (``created=False``). A new row whose sha256, or SOPInstanceUID (plus frame), already belongs
    to another image gets status ``duplicate`` and ``duplicate_of`` that image. Ownership of a
    fingerprint is decided by a unique key with insert-or-ignore, so concurrent registrants agree.

    Other bytes at a path whose newest row has no result (``failed``, ``unsupported``, or
    ``queued`` still; see the module docstring) retake that row (``retaken=True``): its columns
    become the new file's, its attempts start again, its old fingerprints go and the new ones are
    claimed as a new row's would be (so it may end a ``duplicate``). Its study counts it once.
    Other bytes at a path whose newest row is being processed get no row now
    (``deferred=True``): the caller offers the file again later, when that row has ended.

    Args:
        retake_finished: Take ``failed`` and ``unsupported`` rows again too, not only ``queued``
            ones. False where finished files are moved away (quarantine): new bytes at such a
            path are another file, and the moved one keeps its row.

    Returns:
        One ``Registered`` per item, in the order given.
    """
    for item in items:
        check_choice(item.queue, ("live", "bulk"), "queue")
        check_choice(item.status, ("queued", "failed", "unsupported"), "registration status")
    if not items:
        return []
    now = utcnow()
    # Same key twice in one batch is still one row. Inserting in key order means two concurrent
    # batches take their unique-index locks in the same order and cannot deadlock each other.
    unique: dict[Key, NewImage] = {}
    for item in items:
        unique.setdefault((item.path, item.sha256), item)

    with write_transaction(engine) as conn:
        retaken, deferred, moved_studies = _retake_changed(conn, unique, now, retake_finished)
        ordered = sorted(
            ((k, v) for k, v in unique.items() if k not in retaken and k not in deferred),
            key=lambda kv: (kv[0][0], kv[0][1] or ""),
        )
        created_ids: dict[Key, int] = {}
        for chunk in chunks(ordered):
            rows = [
                {
                    **image_values(item),
                    "attempts": 0,
                    "created_at": now,
                    "updated_at": now,
                    "finished_at": now if item.status != "queued" else None,
                }
                for _key, item in chunk
            ]
            stmt: Insert = insert(conn, images).on_conflict_do_nothing()
            for row in conn.execute(
                stmt.returning(images.c.id, images.c.path, images.c.sha256), rows
            ):
                created_ids[(row.path, row.sha256)] = row.id

        # A retaken row claims its fingerprints as a new one does.
        _mark_duplicates(conn, unique, {**created_ids, **retaken}, now)
        requeued = _requeue_retryable(conn, unique, {**created_ids, **retaken}, now)

        # Read every row back (new and old) for its final status.
        by_key: dict[Key, Any] = {
            (row.path, row.sha256): row
            for row in _rows_at(conn, {key[0] for key in unique}, images.c.duplicate_of)
        }

        # New instances (not copies of known ones) move their study's arrival time.
        arrivals: dict[str, int] = {}
        for key in created_ids:
            study_uid = unique[key].study_uid
            if study_uid and by_key[key].status != "duplicate":
                arrivals[study_uid] = arrivals.get(study_uid, 0) + 1
        # A retaken row is an arrival again (its study may be complete only now), counted once:
        # a row with a study counted in it when it was made, so it moves to its new study (or
        # leaves its old one when it turned out a duplicate).
        left: list[str] = []
        for key, old_study in moved_studies.items():
            study_uid = unique[key].study_uid if by_key[key].status != "duplicate" else None
            if study_uid:
                arrivals[study_uid] = arrivals.get(study_uid, 0) + (study_uid != old_study)
            if old_study and old_study != study_uid:
                left.append(old_study)
        note_arrivals(conn, arrivals, now)
        _uncount(conn, left, now)

    result: list[Registered] = []
    for item in items:
        key = (item.path, item.sha256)
        if key in deferred:
            result.append(Registered(deferred[key], "processing", None, False, deferred=True))
            continue
        row = by_key[key]
        result.append(
            Registered(
                image_id=row.id,
                status=row.status,
                duplicate_of=row.duplicate_of,
                created=key in created_ids,
                requeued=row.id in requeued or (key in retaken and row.status == "queued"),
                retaken=key in retaken,
            )
        )
    n_new = len(created_ids)
    n_dup = sum(1 for r in result if r.created and r.status == "duplicate")
    logger.debug("registered %d items: %d new, %d duplicates", len(items), n_new, n_dup)
    return result


def _rows_at(conn: Connection, paths: set[str], *columns: Any) -> Iterator[Any]:
    """The ``images`` rows at ``paths``: id, path, sha256, status and ``columns``."""
    for chunk in chunks(sorted(paths)):
        yield from conn.execute(
            select(images.c.id, images.c.path, images.c.sha256, images.c.status, *columns).where(
                images.c.path.in_(chunk)
            )
        )


def _retake_changed(
    conn: Connection, unique: dict[Key, NewImage], now: datetime, retake_finished: bool
) -> tuple[dict[Key, int], dict[Key, int], dict[Key, str | None]]:
    """Take again the rows of files whose bytes changed before they got a result.

    Returns:
        The keys retaken, each with its row's id; the keys deferred (their path's newest row is
        ``processing``), each with that row's id; and each retaken key's study before.
    """
    newest: dict[str, Any] = {}
    known: set[Key] = set()
    has_result = exists().where(predictions.c.image_id == images.c.id)
    for row in _rows_at(
        conn, {path for path, _ in unique}, images.c.study_uid, has_result.label("has_result")
    ):
        known.add((row.path, row.sha256))
        if row.path not in newest or row.id > newest[row.path].id:
            newest[row.path] = row
    retaken: dict[Key, int] = {}
    deferred: dict[Key, int] = {}
    studies_before: dict[Key, str | None] = {}
    taken_paths: set[str] = set()
    for key in sorted(unique, key=lambda k: (k[0], k[1] or "")):
        current = newest.get(key[0])
        if key in known or current is None or key[0] in taken_paths:
            continue
        if current.status == "processing":
            deferred[key] = current.id  # its worker reads the old bytes; offered again later
            continue
        statuses = RETAKEN_STATUSES if retake_finished else ("queued",)
        if current.status not in statuses or current.has_result:
            continue  # a result stays with the bytes it is for; these bytes are a new image
        item = unique[key]
        values = {k: v for k, v in image_values(item).items() if k != "path"}
        if values.get("run_id") is None:
            values.pop("run_id", None)  # registered outside a run: the row stays in its own
        taken = conn.execute(
            update(images)
            # still as read: a worker that claimed the queued row meanwhile keeps it
            .where(images.c.id == current.id, images.c.status == current.status)
            .values(
                **values,
                **released(now),
                attempts=0,
                retry_after=None,
                duplicate_of=None,
                finished_at=now if item.status != "queued" else None,
            )
        ).rowcount
        if not taken:
            deferred[key] = current.id
            continue
        # The old bytes are gone from the path: their fingerprints no longer point here.
        conn.execute(delete(fingerprints).where(fingerprints.c.image_id == current.id))
        retaken[key] = current.id
        studies_before[key] = current.study_uid
        taken_paths.add(key[0])
    if retaken:
        logger.info("took again %d file(s) whose bytes changed before a result", len(retaken))
    return retaken, deferred, studies_before


def _uncount(conn: Connection, study_uids: Sequence[str], now: datetime) -> None:
    """One arrival fewer for each study a retaken row left."""
    for uid in sorted(study_uids):
        conn.execute(
            update(studies)
            .where(studies.c.study_uid == uid, studies.c.n_received > 0)
            .values(n_received=studies.c.n_received - 1, last_received_at=now, stable_at=None)
        )


def _owned_elsewhere(item: NewImage) -> Any:
    """SQL: one of ``item``'s fingerprints belongs to an image other than the row at hand."""
    pairs = [
        and_(fingerprints.c.kind == kind, fingerprints.c.value == value)
        for kind, value in _fingerprint_values(item)
    ]
    if not pairs:
        return false()
    return exists().where(or_(*pairs), fingerprints.c.image_id != images.c.id)


def _requeue_retryable(
    conn: Connection,
    unique: dict[tuple[str, str | None], NewImage],
    created_ids: dict[tuple[str, str | None], int],
    now: datetime,
) -> set[int]:
    """Queue again known files whose earlier attempts failed for reasons outside the file (a
    share that was down, workers that died): registering them again is the user's retry."""
    keys = [k for k, item in unique.items() if k not in created_ids and item.status == "queued"]
    ids: set[int] = set()
    for chunk in chunks(sorted(keys, key=lambda k: (k[0], k[1] or ""))):
        for key in chunk:
            path, sha = key
            match = and_(
                images.c.path == path,
                images.c.sha256.is_(None) if sha is None else images.c.sha256 == sha,
                images.c.status == "failed",
                images.c.error_class.in_(RETRYABLE_ERRORS),
                # A copy that took over its fingerprints meanwhile is the one to process.
                ~_owned_elsewhere(unique[key]),
            )
            for row in conn.execute(
                update(images)
                .where(match)
                .values(
                    status="queued",
                    queue=unique[key].queue,
                    # seen again by another run: that run now holds it
                    run_id=images.c.run_id if unique[key].run_id is None else unique[key].run_id,
                    attempts=0,
                    error_class=None,
                    reason=None,
                    retry_after=None,
                    finished_at=None,
                    updated_at=now,
                )
                .returning(images.c.id)
            ):
                ids.add(row.id)
    return ids


def _mark_duplicates(
    conn: Connection,
    unique: dict[tuple[str, str | None], NewImage],
    created_ids: dict[tuple[str, str | None], int],
    now: datetime,
) -> None:
    """Claim fingerprints for new rows; rows whose fingerprint another image owns are duplicates."""
    if not created_ids:
        return
    wanted: dict[tuple[str, str], int] = {}
    # Lowest id first, so within one batch the first-inserted row owns the fingerprint.
    for key, image_id in sorted(created_ids.items(), key=lambda kv: kv[1]):
        for fp in _fingerprint_values(unique[key]):
            wanted.setdefault(fp, image_id)
    if not wanted:
        return
    fp_rows = [
        {"kind": kind, "value": value, "image_id": image_id}
        for (kind, value), image_id in sorted(wanted.items())
    ]
    for chunk in chunks(fp_rows):
        conn.execute(insert(conn, fingerprints).on_conflict_do_nothing(), list(chunk))

    owners: dict[tuple[str, str], tuple[int, int | None]] = {}
    failed_owners: dict[tuple[str, str], int] = {}
    for kind in ("sha256", "sop"):
        values = sorted(v for k, v in wanted if k == kind)
        for chunk in chunks(values):
            rows = conn.execute(
                select(
                    fingerprints.c.value,
                    fingerprints.c.image_id,
                    images.c.duplicate_of,
                    images.c.status,
                )
                .join(images, images.c.id == fingerprints.c.image_id)
                .where(fingerprints.c.kind == kind, fingerprints.c.value.in_(chunk))
            )
            for row in rows:
                owners[(kind, row.value)] = (row.image_id, row.duplicate_of)
                if row.status == "failed":
                    failed_owners[(kind, row.value)] = row.image_id

    # A re-send of an image whose earlier copy failed (truncated transfer, read error) is the
    # one to process, not a duplicate of the failure: the fingerprint moves to the new row.
    # The conditional update makes two concurrent re-sends agree on a single new owner.
    for fp, old_owner in sorted(failed_owners.items()):
        new_owner = wanted[fp]
        if new_owner == old_owner:
            continue
        moved = conn.execute(
            update(fingerprints)
            .where(
                fingerprints.c.kind == fp[0],
                fingerprints.c.value == fp[1],
                fingerprints.c.image_id == old_owner,
            )
            .values(image_id=new_owner)
        )
        if moved.rowcount == 1:
            owners[fp] = (new_owner, None)
        else:  # a concurrent re-send took it first: point at that one, not at the failure
            current = conn.execute(
                select(fingerprints.c.image_id).where(
                    fingerprints.c.kind == fp[0], fingerprints.c.value == fp[1]
                )
            ).scalar_one()
            owners[fp] = (current, None)

    marked: list[tuple[int, str | None, int]] = []  # (row, its sha256, its original)
    for key, image_id in created_ids.items():
        # A byte-identical copy is the stronger evidence, so sha256 is checked before SOP.
        for fp in _fingerprint_values(unique[key]):
            owner, owner_original = owners[fp]
            if owner != image_id:
                # Point at the original, not at another duplicate.
                marked.append((image_id, unique[key].sha256, owner_original or owner))
                break
    originals = _originals(conn, {original for _, _, original in marked})
    update_each(
        conn,
        [
            {
                "b_id": image_id,
                "b_original": original,
                "b_reason": duplicate_reason(sha256, originals[original]),
            }
            for image_id, sha256, original in marked
        ],
        status="duplicate",
        duplicate_of=bindparam("b_original"),
        reason=bindparam("b_reason"),
        finished_at=now,
        updated_at=now,
    )
    # An original that failed meanwhile (a worker recorded it while this ran) hands its
    # duplicates over here, as record_results does for the ones it can see: the rows just marked
    # are not visible to it until this transaction commits. On PostgreSQL the originals are
    # locked (FOR SHARE) above, so a failure being recorded now is waited for and seen.
    failed = sorted(i for i, row in originals.items() if row.status == "failed")
    hand_over_duplicates(conn, failed, now)


def _originals(conn: Connection, ids: set[int]) -> dict[int, Any]:
    """id -> (id, path, sha256, status) of the originals that new duplicates point at, locked
    against a concurrent status change on PostgreSQL (a worker failing one waits, or is waited
    for)."""
    found: dict[int, Any] = {}
    for chunk in chunks(sorted(ids)):
        stmt = select(images.c.id, images.c.path, images.c.sha256, images.c.status).where(
            images.c.id.in_(chunk)
        )
        if conn.dialect.name == "postgresql":
            stmt = stmt.order_by(images.c.id).with_for_update(read=True)
        found.update({row.id: row for row in conn.execute(stmt)})
    return found


def duplicate_reason(sha256: str | None, original: Any) -> str:
    """A duplicate's reason: its original by id and stored path, and whether the bytes match."""
    if sha256 is not None and sha256 == original.sha256:
        return f"same bytes as image {original.id} ({original.path})"
    return f"same SOPInstanceUID as image {original.id} ({original.path}), different bytes"


def _sop_value(row: Any) -> str | None:
    """The ``sop`` fingerprint value of an images row (SOPInstanceUID, plus its frame)."""
    if not row.sop_instance_uid:
        return None
    if row.frame_number is not None:
        return f"{row.sop_instance_uid}#{row.frame_number}"
    return str(row.sop_instance_uid)


def hand_over_duplicates(conn: Connection, failed_ids: Sequence[int], now: datetime) -> list[int]:
    """Queue again the duplicates with other bytes of images that just failed.

    A copy registered beside a damaged one of the same instance (same SOPInstanceUID, other
    bytes) became its duplicate; when the damaged one fails, the copy must be processed, not
    stay a duplicate of a failure for ever. For each failed image, the lowest-id duplicate with
    other bytes takes over its SOP fingerprint and is ``queued``; its other such duplicates
    point at that one (their reasons say again whether the bytes are the same). Byte copies of
    the failed image stay its duplicates: they would fail the same way.

    The take-over is a conditional update of the fingerprint (still the failed image's?), so
    concurrent workers and registrants agree on one owner; where the fingerprint has moved
    already, the duplicates point at its owner instead. Runs inside the caller's transaction.

    Returns:
        The ids queued again.
    """
    if not failed_ids:
        return []
    columns = (
        images.c.id,
        images.c.path,
        images.c.sha256,
        images.c.status,
        images.c.duplicate_of,
        images.c.sop_instance_uid,
        images.c.frame_number,
    )
    queued: list[int] = []
    for chunk in chunks(sorted(set(failed_ids))):
        failed = {
            row.id: row
            for row in conn.execute(
                select(*columns).where(images.c.id.in_(chunk), images.c.status == "failed")
            )
        }
        heirs: dict[int, list[Any]] = {}
        for row in conn.execute(
            select(*columns)
            .where(images.c.duplicate_of.in_(sorted(failed)), images.c.status == "duplicate")
            .order_by(images.c.id)
        ):
            if row.sha256 is None or row.sha256 != failed[row.duplicate_of].sha256:
                heirs.setdefault(row.duplicate_of, []).append(row)
        for original_id, group in sorted(heirs.items()):
            queued.extend(_hand_over(conn, failed[original_id], group, now))
    if queued:
        logger.info("queued again %d duplicate(s) of images that failed", len(queued))
    return queued


def _hand_over(conn: Connection, failed: Any, group: list[Any], now: datetime) -> list[int]:
    heir = group[0]
    sop = _sop_value(heir)
    moved = 0
    if sop is not None:
        moved = conn.execute(
            update(fingerprints)
            .where(
                fingerprints.c.kind == "sop",
                fingerprints.c.value == sop,
                fingerprints.c.image_id == failed.id,
            )
            .values(image_id=heir.id)
        ).rowcount
    if moved:
        conn.execute(
            update(images)
            .where(images.c.id == heir.id, images.c.status == "duplicate")
            .values(
                status="queued",
                duplicate_of=None,
                error_class=None,
                reason=None,
                # Claimable at once; a drain that follows retry_after (``process``) takes it in
                # the same run, though its claims had run dry before the failure was recorded.
                retry_after=now,
                finished_at=None,
                updated_at=now,
            )
        )
        target, rest = heir, group[1:]
    else:
        # The fingerprint is no longer the failed image's: whoever holds it is the original.
        owner = None
        if sop is not None:
            owner = conn.execute(
                select(fingerprints.c.image_id).where(
                    fingerprints.c.kind == "sop", fingerprints.c.value == sop
                )
            ).scalar()
        if owner is None or owner == failed.id:
            return []
        target = _originals(conn, {owner})[owner]
        original = conn.execute(select(images.c.duplicate_of).where(images.c.id == owner)).scalar()
        if original is not None:  # point at the original, not at another duplicate
            target = _originals(conn, {original})[original]
        rest = [row for row in group if row.id != target.id]
    update_each(
        conn,
        [
            {
                "b_id": row.id,
                "b_original": target.id,
                "b_reason": duplicate_reason(row.sha256, target),
            }
            for row in rest
        ],
        duplicate_of=bindparam("b_original"),
        reason=bindparam("b_reason"),
        updated_at=now,
    )
    return [heir.id] if moved else []
