"""The pipeline, wired in one place: register → claim → decode → cascade → record.

:class:`Pipeline` holds what one serving process needs (settings, ledger, bundle, decode threads)
and runs a batch through claim → decode → infer → record in :meth:`Pipeline.run_batch`. The
Celery task calls that; the embedded runner calls its two halves on different threads, so the
next batch decodes while this one is in the models.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import cache, partial
from itertools import islice
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from bonewatch.db import (
    ClaimedImage,
    FailureRecord,
    NewImage,
    PredictionRecord,
    claim_batch,
    claim_images,
    lease_holders,
    mark_stable_studies,
    reclaim_expired,
    record_results,
    register_images,
    release_for_retry,
    release_leases,
)
from bonewatch.db.runs import windowed_runs
from bonewatch.ingest import (
    CorruptFileError,
    DecodedImage,
    FileVanishedError,
    HeaderEntry,
    ImageMeta,
    ImageTooLargeError,
    IngestError,
    check_acceptance,
    downscale,
    printable_path,
    read_headers,
    read_image,
    sha256_file,
    split_member_path,
    without_values,
)
from bonewatch.models.bundle import Bundle, load_bundle
from bonewatch.models.cascade import (
    Prediction,
    Preprocessed,
    input_specs,
    prepare_inputs,
    run_cascade,
)
from bonewatch.models.engines import InferenceThreads
from bonewatch.models.preprocess import PreprocessSpec
from bonewatch.worker.heatmaps import picture_min_side, store_heatmaps
from bonewatch.worker.quarantine import quarantine_finished
from bonewatch.worker.settings import Settings
from bonewatch.worker.window import BulkWindow, parse_window

log = logging.getLogger(__name__)


def serving_threads(settings: Settings) -> InferenceThreads:
    """The framework threads as configured; an unset stream count is the engine's default,
    settled when the bundle loads (``InferenceThreads.for_engine``)."""
    return InferenceThreads(
        settings.intra_op_threads,
        settings.inter_op_threads,
        settings.inference_streams,
        settings.forward_batch,
    )


def inference_streams(settings: Settings, engine: str) -> int:
    """Batches the embedded worker runs through the models at once on ``engine``."""
    return serving_threads(settings).for_engine(engine).streams


def limit_blas_threads(threads: int) -> bool:
    """Cap the threads of NumPy's BLAS in this process (threadpoolctl); True when capped.

    Preprocessing resizes with matrix products in each decode thread while the engine's own
    threads run the models. A BLAS that starts a thread per core for each product competes
    with both (its threads also wait busily for the next product): on two cores a 500 px
    JPEG 2000 image took 51 ms to preprocess in the worker against 3 ms alone, and 13 ms with
    one BLAS thread. The engines do not use NumPy's BLAS, so one thread costs them nothing.
    """
    if threads < 1:
        return False
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads, user_api="blas")
    return True


# mallopt's parameter number for the arena cap (glibc's malloc.h)
M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap the malloc arenas of this process (glibc); True when the cap was applied.

    glibc gives threads that allocate at the same time arenas of their own, up to eight per
    core. The decode threads and the inference streams each allocate whole batches, so each ends
    up with an arena that fragments on its own, and resident memory climbs in steps for
    thousands of images before it levels off. Two arenas keep it level from the start.
    """
    if arenas < 1 or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def serving_bundle(settings: Settings) -> Bundle:
    """The configured bundle on the configured engine, its framework threads set from settings.

    Called once by every process that serves (embedded runs, worker children), before their
    threads start: it also caps their malloc arenas (``BONEWATCH_MALLOC_ARENAS``) and NumPy's
    BLAS threads (``BONEWATCH_BLAS_THREADS``).
    """
    limit_malloc_arenas(settings.malloc_arenas)
    limit_blas_threads(settings.blas_threads)
    bundle = load_bundle(
        settings.bundle,
        engine=settings.engine,
        threads=serving_threads(settings),
        digest=settings.bundle_sha256,
        precision=settings.precision,
        choice_cache=settings.resolved_cache_dir(),
    )
    log.info("serving %s on %s", bundle.name, bundle.served_as)
    if settings.warm_up:
        seconds = bundle.warm_up()
        if seconds:
            log.info("warmed up %d models in %.1f s", len(bundle.predictors()), seconds)
    return bundle


@cache
def transient_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "the database or the broker is unavailable": retried with backoff.

    Everything else a batch can meet is a property of the file or the model and is recorded in
    the ledger, once, never retried.
    """
    from kombu.exceptions import OperationalError as BrokerUnavailable
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeout
    from sqlalchemy.exc import InterfaceError, OperationalError

    return (OperationalError, InterfaceError, BrokerUnavailable, RedisConnectionError, RedisTimeout)


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


def release_dead_local_leases(engine: Engine, settings: Settings) -> int:
    """Queue again the rows leased by processes of this host that no longer exist, at once
    rather than when their leases expire; returns how many."""
    return release_leases(
        engine, dead_local_workers(lease_holders(engine)), max_attempts=settings.max_attempts
    )


def recover_leases(engine: Engine, settings: Settings) -> int:
    """Queue again what crashed workers left ``processing``: leases that expired, and at once
    those held by a process of this host that no longer exists (a killed ``process`` run)."""
    released = release_dead_local_leases(engine, settings)
    return released + reclaim_expired(engine, max_attempts=settings.max_attempts)


def stored_path(path: str, settings: Settings) -> str:
    """A file's path as the ledger keeps it: absolute, or relative to ``BONEWATCH_PATH_ROOT``
    (the inbox when watching) with ``BONEWATCH_STORE_RELATIVE_PATHS``, so that folder names
    above the root (which can name patients) stay out of the ledger."""
    root = settings.path_root_for_storage
    if root is None:
        return path
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        log.warning("a file outside BONEWATCH_PATH_ROOT %s is stored with its full path", root)
        return path


def file_path(stored: str, settings: Settings) -> str:
    """Where the file of a ledger path is on this host (the inverse of :func:`stored_path`)."""
    root = settings.path_root_for_storage
    if root is None or Path(stored).is_absolute():
        return stored
    return str(root / stored)


def study_key(meta: ImageMeta) -> str:
    """The study an image belongs to: DICOM StudyInstanceUID, else its MURA study folder, else
    the file stands alone."""
    return meta.study_uid or meta.mura_study or f"file:{meta.sha256[:16]}"


@dataclass(frozen=True)
class Described:
    """What one file came to: its rows (one, or one per member of an archive), which of them
    are archive members (never moved by quarantine: the archive stays whole), and the archive
    entries that got no row (folders, links, devices; members the globs leave out)."""

    rows: list[NewImage]
    members: frozenset[str] = frozenset()
    skipped_entries: int = 0
    excluded: int = 0


def describe_file(path: Path, settings: Settings, *, salt: str, queue: str) -> Described | None:
    """Read a file's header into a ledger row, or each member's of an archive into one row
    each; a bad or refused file (or member) becomes a finished row.

    Returns None when the file cannot be read right now (an I/O error on a share that went
    away): nothing is recorded, and the caller offers the file again later.
    """
    chosen = settings.path_filter
    try:
        entries = list(
            read_headers(
                path,
                salt=salt,
                max_pixels=settings.max_pixels,
                max_bytes=settings.max_file_bytes,
                wanted=chosen.takes_member if chosen else None,
            )
        )
    except OSError as exc:
        log.warning("skipping %s for now: %s", path, exc)
        return None
    except Exception as exc:  # a reader bug must cost one file, not the run
        log.exception("unexpected error reading the header of %s", path)
        failure = CorruptFileError(f"the header reader failed: {type(exc).__name__}: {exc}")
        return Described([_refused_row(path, failure, queue, settings)])
    rows: list[NewImage] = []
    members: set[str] = set()
    skipped = excluded = 0
    for entry in entries:
        if entry.skipped is not None:
            excluded += entry.skipped == "excluded"
            skipped += entry.skipped != "excluded"
            continue
        if entry.meta is not None:
            row = _image_row(entry.meta, settings, queue=queue)
        else:
            assert entry.error is not None
            member = entry if entry.member else None
            row = _refused_row(path, entry.error, queue, settings, member=member)
        rows.append(row)
        if entry.member:
            members.add(row.path)
    return Described(rows, frozenset(members), skipped, excluded)


def _image_row(meta: ImageMeta, settings: Settings, *, queue: str) -> NewImage:
    """The ledger row of a readable file or member: queued, or refused by the policy."""
    status, error_class, reason = "queued", None, None
    try:
        check_acceptance(meta)
    except IngestError as exc:
        status, error_class, reason = exc.status, exc.error_class, exc.reason
    return NewImage(
        path=stored_path(meta.path, settings),
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


def _refused_row(
    path: Path,
    exc: IngestError,
    queue: str,
    settings: Settings,
    *,
    member: HeaderEntry | None = None,
) -> NewImage:
    """A finished row for a file refused at the door, with its sha256 when it can be read; for
    an archive ``member``, its own path and the sha256 of its bytes when they were read."""
    if member is not None:
        where, sha, size = member.path, member.sha256, member.size_bytes
    else:
        # a name that is not UTF-8 is kept escaped, with the reason
        where, sha, size = printable_path(path), None, None
        # A file refused for its size is not read end to end just to fingerprint it.
        if not isinstance(exc, FileVanishedError | ImageTooLargeError):
            try:
                sha, size = sha256_file(path), path.stat().st_size
            except (OSError, IngestError):
                sha = size = None  # unreadable: the row keeps the path and the reason
    return NewImage(
        path=stored_path(where, settings),
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
    retaken: int = 0  # rows without a result taken again for their file's new bytes
    # Files whose row is being processed while they show other bytes: no row yet; offer again.
    deferred_paths: list[Path] = field(default_factory=list)
    excluded: int = 0  # files and archive members --include/--exclude left out
    archive_entries_skipped: int = 0  # archive entries that are folders, links or devices


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
    run_id: int | None = None,
) -> RegisterSummary:
    """Give every file (and every member of an archive) a ledger row, streaming in chunks so
    memory stays flat for big folders. Files the include/exclude globs leave out get none.

    ``on_chunk`` receives the ids of the rows that were newly queued in each chunk. New rows
    belong to the run ``run_id``, where given.
    """
    summary = RegisterSummary()
    salt = settings.salt()
    chosen = settings.path_filter
    for chunk in _chunks(paths, chunk_size):
        if chosen:
            taken = [p for p in chunk if chosen.takes_file(p)]
            summary.excluded += len(chunk) - len(taken)
            chunk = taken
        # Absolute paths: the row must still find its file from another working directory.
        described = list(
            pool.map(
                lambda p: describe_file(Path(p).absolute(), settings, salt=salt, queue=queue),
                chunk,
            )
        )
        rows = [row for result in described if result is not None for row in result.rows]
        if run_id is not None:
            rows = [replace(row, run_id=run_id) for row in rows]
        members = {path for result in described if result is not None for path in result.members}
        for result in described:
            if result is not None:
                summary.excluded += result.excluded
                summary.archive_entries_skipped += result.skipped_entries
        summary.skipped_paths.extend(
            p for p, result in zip(chunk, described, strict=True) if result is None
        )
        summary.skipped = len(summary.skipped_paths)
        # A file quarantine moved keeps its row: new bytes at its path are another file.
        moves = settings.quarantine and settings.inbox is not None
        registered = register_images(engine, rows, retake_finished=not moves)
        owners = [  # the file each row came from
            p
            for p, result in zip(chunk, described, strict=True)
            if result is not None
            for _ in result.rows
        ]
        summary.deferred_paths.extend(
            dict.fromkeys(p for p, reg in zip(owners, registered, strict=True) if reg.deferred)
        )
        quarantine_finished(
            [
                (file_path(row.path, settings), reg.status)
                for row, reg in zip(rows, registered, strict=True)
                if row.path not in members and not reg.deferred
            ],
            settings,
        )
        summary.seen += len(rows) + sum(result is None for result in described)
        queued = []
        for reg in registered:
            summary.retaken += reg.retaken
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
    paths: dict[int, str] = field(default_factory=dict)  # image id -> file, for quarantine moves
    preprocessed: Preprocessed | None = None  # model inputs of ``images``, made in the pool


# Decoded pixels one batch keeps whole, in bytes (eight 4096 px squares of float32). Past it, an
# image keeps a copy no longer than _COMPACT_SIDE: sixteen 10,000 px files held 6.4 GB before.
DECODE_PIXEL_BUDGET = 512 << 20
_COMPACT_SIDE = 1024


class _PixelBudget:
    """What is left of a batch's pixel budget; the decode threads take from it in turn."""

    def __init__(self, limit: int) -> None:
        self._left = limit
        self._lock = threading.Lock()

    def keep(self, image: DecodedImage) -> DecodedImage:
        """``image`` whole while the budget lasts, else with its pixels reduced."""
        with self._lock:
            if image.pixels.nbytes <= self._left:
                self._left -= image.pixels.nbytes
                return image
        return _compact(image)


def _io_reason(exc: object) -> str:
    """A passing I/O error as the ledger keeps it: its kind, never the path it names."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{type(exc).__name__}: [Errno {exc.errno}] {exc.strerror}"
    return f"{type(exc).__name__}: {without_values(str(exc))}"


@dataclass(frozen=True)
class ImageDecoder:
    """How a serving process decodes a claimed file: its limits, the reduced-decode side and
    the bundle's model inputs. Picklable, so decoding processes run the same code."""

    salt: str
    max_pixels: int
    max_bytes: int
    min_side: int | None
    input_size: int | None
    specs: tuple[PreprocessSpec, ...] = ()

    @classmethod
    def for_settings(cls, settings: Settings, specs: Sequence[PreprocessSpec]) -> ImageDecoder:
        input_size = max((spec.input_size for spec in specs), default=None)
        # JPEG 2000 and JPEG decode at the smallest scale covering twice the largest model
        # input (their grids go with them to preprocessing), or the heatmap picture's side
        # when heatmaps are drawn over the same pixels.
        if settings.heatmaps:
            min_side = picture_min_side(settings, input_size)
        else:
            min_side = input_size if settings.reduced_decode else None
        return cls(
            settings.salt(),
            settings.max_pixels,
            settings.max_file_bytes,
            min_side,
            input_size,
            tuple(specs),
        )

    def decode(
        self, item: ClaimedImage, keep: Callable[[DecodedImage], DecodedImage]
    ) -> tuple[ClaimedImage, object, float, list[Any], float]:
        """(claim, image or the error, decode seconds, model inputs, preprocess seconds)."""
        t0 = time.perf_counter()
        try:
            # The registered sha256 is checked on the bytes read, before anything parses them;
            # the file is opened once, never through a symlink. An archive member's path
            # ("studies.zip!PAT1/IM0001") is read from its archive.
            image = read_image(
                item.path,
                salt=self.salt,
                max_pixels=self.max_pixels,
                max_bytes=self.max_bytes,
                sha256=item.sha256 or None,
                min_side=self.min_side,
            )
            # Only radiographs of a size the bundle's input can use reach the models.
            check_acceptance(image.meta, input_size=self.input_size)
            decoded_s = time.perf_counter() - t0
            inputs = prepare_inputs(image.pixels, self.specs, image.grid)
            image = keep(image)
            return item, image, decoded_s, inputs, time.perf_counter() - t0 - decoded_s
        except (IngestError, OSError) as exc:
            return item, exc, time.perf_counter() - t0, [], 0.0
        except Exception as exc:  # a decoder bug must cost one file, not the whole run
            log.exception("unexpected error decoding %s", item.path)
            message = without_values(str(exc))
            failure = CorruptFileError(
                f"the decoder failed on this file: {type(exc).__name__}: {message}"
            )
            return item, failure, time.perf_counter() - t0, [], 0.0


def _compact(image: DecodedImage) -> DecodedImage:
    return replace(image, pixels=downscale(image.pixels, _COMPACT_SIDE), grid=None)


def decode_in_process(
    decoder: ImageDecoder, share: int, item: ClaimedImage
) -> tuple[ClaimedImage, object, float, list[Any], float]:
    """:meth:`ImageDecoder.decode` in a decoding process: an image keeps its pixels whole up
    to ``share`` bytes (its part of the batch's budget), and is sent back reduced past it."""
    return decoder.decode(item, lambda im: im if im.pixels.nbytes <= share else _compact(im))


def decode_claimed(
    claimed: Sequence[ClaimedImage],
    settings: Settings,
    pool: Executor,
    *,
    specs: Sequence[PreprocessSpec] = (),
    pixel_budget: int = DECODE_PIXEL_BUDGET,
    processes: Executor | None = None,
) -> DecodedBatch:
    """Decode claimed files in ``pool``; bad files become failures, I/O errors transient.

    With ``specs`` (:func:`models.cascade.input_specs` of the bundle), each decoded image is also
    preprocessed for them in the pool, so that work overlaps the previous batch's inference.

    The batch keeps at most ``pixel_budget`` bytes of decoded pixels whole; an image decoded
    past it keeps a copy reduced to ``_COMPACT_SIDE`` px (for heatmaps), after its model inputs
    were made from the whole image, so what the models see does not change.

    With ``processes`` (:func:`decode_processes`), the files are decoded there instead of in
    the threads of ``pool``, and each image has an equal share of the budget.

    Before any model runs, each image must pass the acceptance policy again, now with the
    bundle's largest input side (from ``specs``): a matrix under half of it is refused.
    """
    decoder = ImageDecoder.for_settings(settings, specs)
    if processes is not None:
        share = pixel_budget // max(len(claimed), 1)
        results = processes.map(partial(decode_in_process, decoder, share), claimed)
    else:
        budget = _PixelBudget(pixel_budget)
        results = pool.map(lambda item: decoder.decode(item, budget.keep), claimed)

    batch = DecodedBatch([], [], [], {item.image_id: item.path for item in claimed})
    inputs: list[list[Any]] = []
    preprocess_s = 0.0
    for item, result, seconds, image_inputs, image_preprocess_s in results:
        if isinstance(result, DecodedImage):
            batch.images.append((item, result, seconds))
            inputs.append(image_inputs)
            preprocess_s += image_preprocess_s
        elif isinstance(result, IngestError):
            batch.failures.append(
                FailureRecord(item.image_id, result.status, result.error_class, result.reason)
            )
        else:
            batch.transient.append((item, _io_reason(result)))
    if specs and inputs:
        batch = replace(batch, preprocessed=Preprocessed.from_rows(inputs, specs, preprocess_s))
    return batch


def _start_decoding_process(blas_threads: int, malloc_arenas: int) -> None:
    """A decoding process's limits, as the serving process has them: its BLAS threads (the
    resize's matrix products) and malloc arenas."""
    limit_blas_threads(blas_threads)
    limit_malloc_arenas(malloc_arenas)


@contextmanager
def decode_processes(settings: Settings) -> Iterator[Executor | None]:
    """The processes that decode claimed files (``BONEWATCH_DECODE_PROCESSES``), or None:
    decoding then stays in the threads of the serving process.

    Some decoders (Pillow's JPEG 2000) hold Python's lock for a whole image, 40 ms for a 2,000 px
    CR at a quarter of its resolution; the inference threads then wait on it between forward
    passes. In processes of their own they do not. The processes start fresh (``spawn``): the
    serving process has its engines' threads running, which a fork would copy mid-work.
    """
    if settings.decode_processes < 1:
        yield None
        return
    with decoding_pool(
        settings.decode_processes,
        blas_threads=settings.blas_threads,
        malloc_arenas=settings.malloc_arenas,
    ) as pool:
        yield pool


@contextmanager
def decoding_pool(
    processes: int, *, blas_threads: int = 1, malloc_arenas: int = 2
) -> Iterator[Executor]:
    """``processes`` fresh processes (``spawn``) with a serving process's BLAS and malloc
    limits; shut down on leaving, pending work cancelled."""
    # Imported here: multiprocessing costs every command 8 ms of start-up, and few use it.
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    pool = ProcessPoolExecutor(
        processes,
        mp_context=get_context("spawn"),
        initializer=_start_decoding_process,
        initargs=(blas_threads, malloc_arenas),
    )
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def infer_and_record(
    engine: Engine, bundle: Bundle, batch: DecodedBatch, settings: Settings
) -> int:
    """Run the cascade on a decoded batch and write every outcome to the ledger in one go.

    Returns:
        The number of images that finished (predicted, refused or failed).
    """
    outcomes = _cascade_isolated(bundle, batch.images, settings.batch_size, batch.preprocessed)
    heatmaps = store_heatmaps(bundle, batch.images, outcomes, settings) if settings.heatmaps else {}
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
                timings={
                    "decode_ms": round(1000 * decode_s, 3),
                    **pred.timings,
                    "engine": bundle.served_as,
                },
                heatmap_path=heatmaps.get(claim.image_id),
                rows=image.meta.rows,
                columns=image.meta.columns,
            )
        )
    recorded = record_results(engine, records, failures, worker_id=worker_id())
    if recorded == len(records) + len(failures):
        # Only when every outcome was recorded here: a file whose row another worker took over
        # stays for that worker to record (and move).
        finished = [(r.image_id, r.status) for r in records]
        finished += [(f.image_id, f.status) for f in failures]
        # An archive member is not moved: its archive stays whole, where it is.
        quarantine_finished(
            [
                (batch.paths[i], status)
                for i, status in finished
                if i in batch.paths and split_member_path(batch.paths[i]) is None
            ],
            settings,
        )
    for claim, reason in batch.transient:
        release_for_retry(
            engine,
            [claim.image_id],
            error_class="TransientIOError",
            reason=reason,
            max_attempts=settings.max_attempts,
            worker_id=worker_id(),
            backoff_seconds=settings.retry_backoff_seconds,
            backoff_cap_seconds=settings.retry_backoff_max,
        )
    return recorded


@dataclass(frozen=True)
class BatchOutcome:
    """What one batch came to: how many images were claimed and finished, and the ids of those
    that wait out a retry backoff (a file that could not be read for a passing reason)."""

    claimed: int
    finished: int
    waiting: tuple[int, ...] = ()
    waiting_attempts: int = 0


@dataclass(frozen=True)
class Pipeline:
    """One serving process's wiring: its settings, ledger, bundle, decode threads and the model
    inputs the bundle's stages take."""

    settings: Settings
    engine: Engine
    bundle: Bundle
    pool: Executor
    specs: tuple[PreprocessSpec, ...]
    window: BulkWindow | None = None
    processes: Executor | None = None  # decoding processes (decode_processes), else the pool

    @classmethod
    def open(
        cls,
        settings: Settings,
        engine: Engine,
        pool: Executor,
        bundle: Bundle | None = None,
        *,
        processes: Executor | None = None,
    ) -> Pipeline:
        """Load the serving bundle (unless given) and settle the model inputs once."""
        bundle = bundle if bundle is not None else serving_bundle(settings)
        window = parse_window(settings.bulk_window)
        specs = tuple(input_specs(bundle))
        return cls(settings, engine, bundle, pool, specs, window, processes)

    def bulk_open(self) -> bool:
        """Whether the bulk window is open now (always, with none configured)."""
        return self.window is None or self.window.is_open(datetime.now(UTC))

    def held_runs(self) -> list[int]:
        """Runs outside a bulk window of their own (``process --window``): not claimed now,
        by this process or any other on the ledger."""
        now = datetime.now(UTC)
        return [
            run_id
            for run_id, spec in windowed_runs(self.engine)
            if not BulkWindow.parse(spec).is_open(now)
        ]

    def claim(
        self, image_ids: Sequence[int] | None = None, *, taking_over_from: Sequence[str] = ()
    ) -> list[ClaimedImage]:
        """Lease the next batch (``live`` first), or those of ``image_ids`` still waiting; each
        with the path of its file on this host. ``bulk`` rows only while the bulk window is
        open; none of a paused or cancelled run, or of one outside its own window."""
        s = self.settings
        if image_ids is None:
            claimed = claim_batch(
                self.engine,
                limit=s.batch_size,
                lease_seconds=s.lease_seconds,
                worker_id=worker_id(),
                max_attempts=s.max_attempts,
                bulk_open=self.bulk_open(),
                held_runs=self.held_runs(),
            )
        else:
            claimed = claim_images(
                self.engine,
                image_ids,
                lease_seconds=s.lease_seconds,
                worker_id=worker_id(),
                max_attempts=s.max_attempts,
                taking_over_from=taking_over_from,
                bulk_open=self.bulk_open(),
                held_runs=self.held_runs(),
            )
        return [replace(c, path=file_path(c.path, s)) for c in claimed]

    def claim_and_decode(
        self, image_ids: Sequence[int] | None = None, *, taking_over_from: Sequence[str] = ()
    ) -> DecodedBatch | None:
        """The first half of a batch: claim, then decode and preprocess in the pool. None when
        there was nothing to claim."""
        claimed = self.claim(image_ids, taking_over_from=taking_over_from)
        if not claimed:
            if image_ids is None:  # the queue is empty: a moment to see which studies are complete
                mark_stable_studies(self.engine, self.settings.study_stable_seconds)
            return None
        return decode_claimed(
            claimed, self.settings, self.pool, specs=self.specs, processes=self.processes
        )

    def infer_and_record(self, batch: DecodedBatch) -> int:
        """The second half: the cascade, then every outcome to the ledger in one go."""
        return infer_and_record(self.engine, self.bundle, batch, self.settings)

    def run_batch(
        self, image_ids: Sequence[int] | None = None, *, taking_over_from: Sequence[str] = ()
    ) -> BatchOutcome:
        """Claim → decode → infer → record, for the next batch or for ``image_ids``."""
        batch = self.claim_and_decode(image_ids, taking_over_from=taking_over_from)
        if batch is None:
            return BatchOutcome(0, 0)
        finished = self.infer_and_record(batch)
        claimed = len(batch.paths)
        waiting = tuple(claim.image_id for claim, _ in batch.transient)
        attempts = max((claim.attempts for claim, _ in batch.transient), default=0)
        return BatchOutcome(claimed, finished, waiting, attempts)


def _cascade_isolated(
    bundle: Bundle,
    images: list[tuple[ClaimedImage, DecodedImage, float]],
    batch_size: int,
    preprocessed: Preprocessed | None = None,
) -> list[Prediction | Exception]:
    """Run the cascade on the batch; if it raises, run image by image so only the culprit fails."""
    pixels = [image for _, image, _ in images]
    try:
        return list(run_cascade(pixels, bundle, batch_size=batch_size, preprocessed=preprocessed))
    except Exception:
        log.exception("the cascade failed on a batch of %d; retrying one by one", len(pixels))
    outcomes: list[Prediction | Exception] = []
    for image in pixels:
        try:
            outcomes.extend(run_cascade([image], bundle, batch_size=1))
        except Exception as exc:
            outcomes.append(exc)
    return outcomes


@contextmanager
def serving_pipeline(
    settings: Settings, engine: Engine, pool: Executor, bundle: Bundle | None
) -> Iterator[Pipeline | None]:
    """An embedded run's pipeline on ``bundle``, with its decoding processes while it is open;
    None without a bundle (distributed mode: this process only registers)."""
    if bundle is None:
        yield None
        return
    with decode_processes(settings) as processes:
        yield Pipeline.open(settings, engine, pool, bundle, processes=processes)
