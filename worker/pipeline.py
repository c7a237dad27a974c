"""The pipeline, wired in one place: register → claim → decode → cascade → record.

Embedded mode calls these functions in-process; distributed mode calls the same ones from Celery
tasks, so there is one implementation of every step.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from sqlalchemy import Engine

from db import (
    ClaimedImage,
    FailureRecord,
    NewImage,
    PredictionRecord,
    record_results,
    register_images,
    release_for_retry,
)
from ingest import (
    CorruptFileError,
    DecodedImage,
    FileChangedError,
    FileVanishedError,
    ImageMeta,
    IngestError,
    check_acceptance,
    read_header,
    read_image,
    sha256_file,
)
from models.bundle import Bundle
from models.cascade import Prediction, run_cascade
from worker.settings import Settings

log = logging.getLogger(__name__)


def worker_id() -> str:
    """A name for this process in lease columns: host and pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def dead_local_workers(holders: Iterable[str]) -> list[str]:
    """The lease holders that ran on this host and whose process no longer exists.

    A pid that was reused by another process looks alive; its rows then wait for their lease to
    expire, which is slower but never wrong.
    """
    host = socket.gethostname()
    dead = []
    for holder in holders:
        name, _, pid = holder.rpartition(":")
        if name != host or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            dead.append(holder)
        except PermissionError:
            continue  # the process exists; it belongs to another user
    return dead


def study_key(meta: ImageMeta) -> str:
    """The study an image belongs to: DICOM StudyInstanceUID, else its MURA study folder, else
    the file stands alone."""
    return meta.study_uid or meta.mura_study or f"file:{meta.sha256[:16]}"


def describe_file(path: Path, settings: Settings, *, salt: str, queue: str) -> NewImage | None:
    """Read a file's header into a ledger row; a bad or refused file becomes a finished row.

    Returns None when the file cannot be read right now (an I/O error on a share that went
    away): nothing is recorded, and the caller offers the file again later.
    """
    try:
        meta = read_header(
            path, salt=salt, max_pixels=settings.max_pixels, max_bytes=settings.max_file_bytes
        )
    except OSError as exc:
        log.warning("skipping %s for now: %s", path, exc)
        return None
    except IngestError as exc:
        return _refused_row(path, exc, queue)
    except Exception as exc:  # a reader bug must cost one file, not the run
        log.exception("unexpected error reading the header of %s", path)
        failure = CorruptFileError(f"the header reader failed: {type(exc).__name__}: {exc}")
        return _refused_row(path, failure, queue)
    status, error_class, reason = "queued", None, None
    try:
        check_acceptance(meta)
    except IngestError as exc:
        status, error_class, reason = exc.status, exc.error_class, exc.reason
    return NewImage(
        path=meta.path,
        sha256=meta.sha256,
        size_bytes=meta.size_bytes,
        format=meta.format,
        queue=queue,
        study_uid=study_key(meta),
        series_uid=meta.series_uid,
        sop_instance_uid=meta.sop_instance_uid,
        sop_class_uid=meta.sop_class_uid,
        patient_hash=meta.patient_hash,
        modality=meta.modality,
        body_part_examined=meta.body_part_examined,
        view_position=meta.view_position,
        rows=meta.rows,
        columns=meta.columns,
        mura_part=meta.mura_part,
        mura_label=meta.mura_label,
        status=status,
        error_class=error_class,
        reason=reason,
    )


def _refused_row(path: Path, exc: IngestError, queue: str) -> NewImage:
    """A finished row for a file refused at the door, with its sha256 when it can be read."""
    sha = size = None
    if not isinstance(exc, FileVanishedError):
        try:
            sha, size = sha256_file(path), path.stat().st_size
        except (OSError, IngestError):
            sha = size = None  # unreadable: the row keeps the path and the reason
    return NewImage(
        path=str(path),
        sha256=sha,
        size_bytes=size,
        format=None,
        queue=queue,
        status=exc.status,
        error_class=exc.error_class,
        reason=exc.reason,
    )


@dataclass
class RegisterSummary:
    seen: int = 0
    new: int = 0
    duplicates: int = 0
    refused: int = 0
    skipped: int = 0  # unreadable for now (I/O error); not recorded, taken again next time
    skipped_paths: list[Path] = field(default_factory=list)


def _chunks(items: Iterable[Path], size: int) -> Iterator[list[Path]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def register_paths(
    engine: Engine,
    paths: Iterable[Path],
    settings: Settings,
    *,
    queue: str,
    pool: Executor,
    chunk_size: int = 256,
    on_chunk: Callable[[list[int]], None] | None = None,
) -> RegisterSummary:
    """Give every file a ledger row, streaming in chunks so memory stays flat for big archives.

    ``on_chunk`` receives the ids of the rows that were newly queued in each chunk.
    """
    summary = RegisterSummary()
    salt = settings.salt()
    for chunk in _chunks(paths, chunk_size):
        # Absolute paths: the row must still find its file from another working directory.
        described = list(
            pool.map(
                lambda p: describe_file(Path(p).absolute(), settings, salt=salt, queue=queue),
                chunk,
            )
        )
        rows = [row for row in described if row is not None]
        summary.skipped_paths.extend(p for p, row in zip(chunk, described, strict=True) if not row)
        summary.skipped = len(summary.skipped_paths)
        registered = register_images(engine, rows)
        summary.seen += len(chunk)
        queued = []
        for reg in registered:
            if reg.requeued:
                queued.append(reg.image_id)
                continue
            if not reg.created:
                continue
            summary.new += 1
            if reg.status == "duplicate":
                summary.duplicates += 1
            elif reg.status == "queued":
                queued.append(reg.image_id)
            else:
                summary.refused += 1
        if on_chunk is not None:
            on_chunk(queued)
    return summary


@dataclass(frozen=True)
class DecodedBatch:
    """A claimed batch after decoding: images ready for the cascade, and the files that failed."""

    images: list[tuple[ClaimedImage, DecodedImage, float]]  # (claim, image, decode seconds)
    failures: list[FailureRecord]
    transient: list[tuple[ClaimedImage, str]]


def decode_claimed(
    claimed: Sequence[ClaimedImage], settings: Settings, pool: Executor
) -> DecodedBatch:
    """Decode claimed files in ``pool``; bad files become failures, I/O errors transient."""
    salt = settings.salt()

    def decode(item: ClaimedImage) -> tuple[ClaimedImage, object, float]:
        t0 = time.perf_counter()
        try:
            image = read_image(
                item.path,
                salt=salt,
                max_pixels=settings.max_pixels,
                max_bytes=settings.max_file_bytes,
            )
            check_acceptance(image.meta)
            if item.sha256 and image.meta.sha256 != item.sha256:
                raise FileChangedError(
                    "the file changed after it was registered; its new content is registered "
                    "as a separate image when it is seen again"
                )
            return item, image, time.perf_counter() - t0
        except (IngestError, OSError) as exc:
            return item, exc, time.perf_counter() - t0
        except Exception as exc:  # a decoder bug must cost one file, not the whole run
            log.exception("unexpected error decoding %s", item.path)
            failure = CorruptFileError(
                f"the decoder failed on this file: {type(exc).__name__}: {exc}"
            )
            return item, failure, time.perf_counter() - t0

    batch = DecodedBatch([], [], [])
    for item, result, seconds in pool.map(decode, claimed):
        if isinstance(result, DecodedImage):
            batch.images.append((item, result, seconds))
        elif isinstance(result, IngestError):
            batch.failures.append(
                FailureRecord(item.image_id, result.status, result.error_class, result.reason)
            )
        else:
            batch.transient.append((item, f"{type(result).__name__}: {result}"))
    return batch


def infer_and_record(
    engine: Engine, bundle: Bundle, batch: DecodedBatch, settings: Settings
) -> int:
    """Run the cascade on a decoded batch and write every outcome to the ledger in one go.

    Returns:
        The number of images that finished (predicted, refused or failed).
    """
    outcomes = _cascade_isolated(bundle, batch.images, settings.batch_size)
    failures = list(batch.failures)
    records = []
    for (claim, image, decode_s), pred in zip(batch.images, outcomes, strict=True):
        if isinstance(pred, Exception):
            failures.append(
                FailureRecord(
                    claim.image_id,
                    "failed",
                    "ModelError",
                    f"the model failed on this image: {type(pred).__name__}: {pred}",
                )
            )
            continue
        records.append(
            PredictionRecord(
                image_id=claim.image_id,
                bundle_name=bundle.name,
                bundle_version=bundle.version,
                status=pred.status,
                reason=pred.reason,
                body_part_probs=pred.body_part_probs,
                body_part=pred.body_part,
                body_part_confidence=pred.body_part_confidence,
                body_part_examined=pred.body_part_examined,
                body_part_disagrees=pred.body_part_disagrees,
                p_fracture=pred.p_fracture,
                label=pred.label,
                threshold=pred.threshold,
                fracture_model=pred.fracture_model,
                timings={"decode_ms": round(1000 * decode_s, 3), **pred.timings},
                rows=image.meta.rows,
                columns=image.meta.columns,
            )
        )
    record_results(engine, records, failures)
    for claim, reason in batch.transient:
        release_for_retry(
            engine,
            [claim.image_id],
            error_class="TransientIOError",
            reason=reason,
            max_attempts=settings.max_attempts,
            worker_id=worker_id(),
            backoff_seconds=settings.retry_backoff_seconds,
        )
    return len(records) + len(failures)


def _cascade_isolated(
    bundle: Bundle, images: list[tuple[ClaimedImage, DecodedImage, float]], batch_size: int
) -> list[Prediction | Exception]:
    """Run the cascade on the batch; if it raises, run image by image so only the culprit fails."""
    pixels = [image for _, image, _ in images]
    try:
        return list(run_cascade(pixels, bundle, batch_size=batch_size))
    except Exception:
        log.exception("the cascade failed on a batch of %d; retrying one by one", len(pixels))
    outcomes: list[Prediction | Exception] = []
    for image in pixels:
        try:
            outcomes.extend(run_cascade([image], bundle, batch_size=1))
        except Exception as exc:
            outcomes.append(exc)
    return outcomes
