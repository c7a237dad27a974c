"""Results back to PACS: the outbox filled from complete studies, and sending what is due.

``deliver`` builds and sends the objects from plain values; this module reads the ledger, makes
the values (and the heatmap pictures, with Grad-CAM), and records each attempt in the outbox.
"""

from __future__ import annotations

import logging
import os
import random
import re
import stat
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import Engine

from bonewatch.db import deliveries as outbox
from bonewatch.db import mark_stable_studies
from bonewatch.db.schema import utcnow
from bonewatch.deliver import (
    BundleInfo,
    DeliveryError,
    Destination,
    ImageOutcome,
    StudyOutcome,
    build_report,
    build_secondary_capture,
    object_uids,
    parse_destinations,
    send_dicomweb,
    send_dimse,
)
from bonewatch.deliver.sources import read_header
from bonewatch.models.bundle import Bundle
from bonewatch.worker.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SendSummary:
    """What one sending pass did."""

    sent: int = 0
    retrying: int = 0
    failed: int = 0


def bundle_info(bundle: Bundle) -> BundleInfo:
    from bonewatch.worker.notices import is_not_for_clinical_use

    use = bundle.manifest.intended_use or ""
    return BundleInfo(bundle.name, bundle.version, use, is_not_for_clinical_use(use))


def destinations(settings: Settings) -> tuple[Destination, ...]:
    """The configured destinations: C-STORE peers, then the STOW-RS URL."""
    found = parse_destinations(settings.dicom_destinations)
    if settings.dicomweb_url:
        found = (*found, Destination.parse(settings.dicomweb_url))
    return found


def enqueue_studies(
    engine: Engine,
    bundle: Bundle,
    targets: Sequence[Destination],
    *,
    study_uids: Sequence[str] | None = None,
    all_images: bool = False,
) -> int:
    """Outbox rows for every complete study not enqueued yet: its SR and a Secondary Capture per
    positive image (per image with ``all_images``, for the studies already enqueued too), for
    each destination. Returns the rows added."""
    if not targets:
        return 0
    items: list[outbox.NewDelivery] = []
    for uid in outbox.studies_to_deliver(
        engine,
        bundle.name,
        bundle.version,
        study_uids=study_uids,
        enqueued=all_images,
        destinations=[str(t) for t in targets],
    ):
        items.extend(_study_items(engine, uid, bundle, targets, all_images=all_images))
    return outbox.enqueue_deliveries(engine, items)


def _study_items(
    engine: Engine,
    study_uid: str,
    bundle: Bundle,
    targets: Sequence[Destination],
    *,
    all_images: bool = False,
) -> list[outbox.NewDelivery]:
    result = outbox.study_result(engine, study_uid, bundle.name, bundle.version)
    if result is None or not result.images:
        return []
    objects: list[tuple[str, str, str | None]] = [
        ("sr", object_uids(study_uid, bundle.name, bundle.version, "sr")[1], None)
    ]
    seen: set[str] = set()
    for image in result.images:
        wanted = all_images or image.p_fracture >= image.threshold
        if wanted and image.sop_instance_uid not in seen:
            seen.add(image.sop_instance_uid)
            uid = object_uids(study_uid, bundle.name, bundle.version, "sc", image.sop_instance_uid)
            objects.append(("sc", uid[1], image.sop_instance_uid))
    return [
        outbox.NewDelivery(study_uid, bundle.name, bundle.version, kind, sop, str(target), source)
        for target in targets
        for kind, sop, source in objects
    ]


def build_study_objects(
    engine: Engine,
    study_uid: str,
    bundle: Bundle,
    settings: Settings,
    *,
    only: set[str] | None = None,
    all_images: bool = False,
) -> dict[str, Dataset]:
    """A study's result objects by SOP Instance UID: its SR and the Secondary Captures of its
    positive images (of every image with ``all_images``); ``only`` those UIDs, when given,
    whatever the image's label."""
    result = outbox.study_result(engine, study_uid, bundle.name, bundle.version)
    if result is None or not result.images:
        return {}
    info = bundle_info(bundle)
    images: dict[str, outbox.ImageResultRow] = {}
    for row in result.images:
        images.setdefault(row.sop_instance_uid, row)
    headers = {
        uid: read_header(source_file(row.path, settings, uid)) for uid, row in images.items()
    }
    outcomes = {
        uid: ImageOutcome(
            uid, row.sop_class_uid, row.body_part or "", row.p_fracture, row.threshold
        )
        for uid, row in images.items()
    }
    study = StudyOutcome(
        study_uid,
        result.body_part,
        result.mean_p_fracture,
        result.threshold,
        result.label,
        tuple(outcomes.values()),
    )
    out: dict[str, Dataset] = {}
    sr_uid = object_uids(study_uid, bundle.name, bundle.version, "sr")[1]
    if only is None or sr_uid in only:
        out[sr_uid] = build_report(study, info, list(headers.values()))
    for n, (uid, outcome) in enumerate(outcomes.items(), start=1):
        sc_uid = object_uids(study_uid, bundle.name, bundle.version, "sc", uid)[1]
        if not (sc_uid in only if only is not None else all_images or outcome.positive):
            continue
        # The image's place in the study, so a rebuilt object keeps its Instance Number.
        path = source_file(images[uid].path, settings, uid)
        picture = heatmap_picture(path, outcome, bundle, settings)
        sc = build_secondary_capture(headers[uid], picture, outcome, info, instance_number=n)
        out[str(sc.SOPInstanceUID)] = sc
    return out


def source_file(stored: str, settings: Settings, sop_instance_uid: str) -> str:
    """Where a source image is now: its recorded path, or, once ``watch --quarantine`` moved it
    (the ledger keeps the original path), the same relative path under the inbox's ``done/``,
    or the numbered name (``image1.1.dcm``) the move gave it where that name was taken; of
    those, the file whose SOP Instance UID is the image's. The builders check that the header
    read is the image's own."""
    from bonewatch.worker.pipeline import file_path

    path = file_path(stored, settings)
    if not settings.quarantine or settings.inbox is None or os.path.exists(path):
        return path
    for root in {settings.inbox.absolute(), settings.inbox.resolve()}:
        try:
            moved = root / "done" / Path(path).relative_to(root)
        except ValueError:
            continue
        for candidate in _moved_names(moved):
            if _sop_instance_uid(candidate) == sop_instance_uid:
                return str(candidate)
    return path


# Numbered names looked at for one moved file: the quarantine's own limit is 10,000 tries.
_MAX_MOVED_NAMES = 1000


def _moved_names(moved: Path) -> list[Path]:
    """``moved`` and the numbered names beside it (``stem.N.suffix``), in the move's order."""
    names = [moved]
    pattern = re.compile(re.escape(moved.stem) + r"\.([1-9][0-9]*)" + re.escape(moved.suffix))
    try:
        entries = list(os.scandir(moved.parent))
    except OSError:
        return names
    numbered = []
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match:
            numbered.append((int(match.group(1)), moved.parent / entry.name))
    return names + [p for _, p in sorted(numbered)[:_MAX_MOVED_NAMES]]


def _sop_instance_uid(path: Path) -> str | None:
    """A regular file's SOP Instance UID, or None (not there, a link, not DICOM)."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        # Only the one element, and no large value read into memory on the way to it.
        header = pydicom.dcmread(
            path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"], defer_size=4096
        )
        return str(header.SOPInstanceUID)
    except Exception:  # anything in done/ may be hostile: it just is not the file looked for
        return None


def heatmap_picture(
    path: str, image: ImageOutcome, bundle: Bundle, settings: Settings
) -> np.ndarray:
    """The source's pixels with the part's Grad-CAM heatmap over them, captioned."""
    from bonewatch.ingest import read_image
    from bonewatch.models.gradcam import explain_images, overlay_heatmap
    from bonewatch.worker.heatmaps import (
        caption_lines,
        caption_warning,
        picture_min_side,
        with_caption,
    )

    decoded = read_image(
        path,
        salt="deliver",
        max_pixels=settings.max_pixels,
        max_bytes=settings.max_file_bytes,
        min_side=picture_min_side(settings),
    )
    part = image.part.upper()
    explanation = explain_images([decoded.pixels], [part], bundle, grids=[decoded.grid])[0]
    lines = caption_lines(bundle, part, image.p_fracture, image.threshold)
    warning = caption_warning(bundle)
    if warning:
        lines.append("not for diagnostic use")
    return with_caption(
        overlay_heatmap(decoded.pixels, explanation.heatmap), lines, warning=warning
    )


def send_due(
    engine: Engine,
    bundle: Bundle,
    settings: Settings,
    *,
    study: str | None = None,
    rng: random.Random | None = None,
) -> SendSummary:
    """One pass over the due rows of this bundle version: build, send, record each attempt.

    Each (study, destination) group is recorded as soon as the destination answered, so a
    sender killed mid-pass sends again only what was not acknowledged yet."""
    due = outbox.due_deliveries(engine, study=study, bundle=(bundle.name, bundle.version))
    groups: dict[tuple[str, str], list[outbox.DueDelivery]] = defaultdict(list)
    wanted: dict[str, set[str]] = defaultdict(set)
    for row in due:
        groups[(row.study_uid, row.destination)].append(row)
        wanted[row.study_uid].add(row.sop_instance_uid)
    rng = rng or random.Random()
    total = SendSummary()
    built: dict[str, dict[str, Dataset]] = {}
    build_errors: dict[str, str] = {}
    for (study_uid, target), rows in groups.items():
        if study_uid not in built:
            try:
                built[study_uid] = build_study_objects(
                    engine, study_uid, bundle, settings, only=wanted[study_uid]
                )
            except Exception as exc:  # a bad source or result costs that study's objects only
                log.exception("cannot build the result objects of study %s", study_uid)
                built[study_uid] = {}
                build_errors[study_uid] = f"cannot build the object: {exc}"
        objects = built[study_uid]
        failures: dict[int, str] = {}
        for r in rows:
            if r.sop_instance_uid not in objects:
                failures[r.id] = build_errors.get(
                    study_uid, "the object can no longer be built (result or source gone)"
                )
        datasets = [objects[r.sop_instance_uid] for r in rows if r.sop_instance_uid in objects]
        try:
            outcome = _send(datasets, Destination.parse(target), settings)
        except DeliveryError as exc:
            outcome = {str(ds.SOPInstanceUID): str(exc) for ds in datasets}
        sent = [
            r.id
            for r in rows
            if r.sop_instance_uid in outcome and outcome[r.sop_instance_uid] is None
        ]
        for r in rows:
            error = outcome.get(r.sop_instance_uid)
            if error is not None:
                failures[r.id] = error
        total = _record(engine, sent, failures, settings, rng, total)
    return total


def _record(
    engine: Engine,
    sent: list[int],
    failures: dict[int, str],
    settings: Settings,
    rng: random.Random,
    total: SendSummary,
) -> SendSummary:
    """One group's attempt in the outbox; ``total`` with it added."""
    if sent:
        outbox.mark_sent(engine, sent)
    gave_up = 0
    if failures:
        for row_id, error in failures.items():
            log.warning("delivery %d failed: %s", row_id, error)
        gave_up = outbox.mark_attempt_failed(
            engine,
            failures,
            max_attempts=settings.send_retries,
            base=settings.retry_backoff_seconds,
            cap=settings.retry_backoff_max,
            rng=rng,
        )
    return SendSummary(
        total.sent + len(sent),
        total.retrying + len(failures) - gave_up,
        total.failed + gave_up,
    )


def _send(
    datasets: list[Dataset], target: Destination, settings: Settings
) -> dict[str, str | None]:
    if not datasets:
        return {}
    if target.url:
        return send_dicomweb(datasets, target, timeout=settings.dicom_network_timeout)
    return send_dimse(
        datasets,
        target,
        calling_ae=settings.dicom_ae_title,
        timeout=settings.dicom_network_timeout,
    )


def send_until_done(
    engine: Engine,
    bundle: Bundle,
    settings: Settings,
    *,
    timeout: float,
    study: str | None = None,
) -> SendSummary:
    """Send passes until nothing is pending or ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    total = SendSummary()
    version = (bundle.name, bundle.version)
    while True:
        s = send_due(engine, bundle, settings, study=study)
        total = SendSummary(total.sent + s.sent, s.retrying, total.failed + s.failed)
        nxt = outbox.next_delivery_at(engine, study=study, bundle=version)
        if nxt is None:
            return total
        wait = max(0.0, (nxt - utcnow()).total_seconds())
        if time.monotonic() + wait > deadline:
            return total
        time.sleep(min(wait, max(0.0, deadline - time.monotonic())) + 0.01)


def send_pass(
    engine: Engine, bundle: Bundle, settings: Settings, targets: Sequence[Destination]
) -> SendSummary:
    """What a sweep of ``watch``, ``listen`` or the ``send`` task does: mark the quiet studies
    complete, put their objects in the outbox, send what is due once."""
    mark_stable_studies(engine, settings.study_stable_seconds)
    enqueue_studies(engine, bundle, targets, all_images=settings.send_all_images)
    return send_due(engine, bundle, settings)


class Sender(threading.Thread):
    """Embedded ``watch`` and ``listen``: sends the complete studies' objects every
    ``interval`` seconds, beside inference, until ``stop`` is set. A slow or absent PACS delays
    only this thread; its faults are logged and tried again at the next sweep."""

    def __init__(self, settings: Settings, stop: threading.Event, interval: float = 2.0) -> None:
        super().__init__(name="bonewatch-send", daemon=True)
        self.settings = settings
        self.stop = stop
        self.interval = interval
        self.targets = destinations(settings)
        self.sent = 0

    def run(self) -> None:
        from bonewatch.db import make_engine
        from bonewatch.models.bundle import load_bundle

        engine = make_engine(self.settings.resolved_database_url)
        try:
            bundle = load_bundle(self.settings.bundle, digest=self.settings.bundle_sha256)
            while not self.stop.wait(self.interval):
                try:
                    self.sent += send_pass(engine, bundle, self.settings, self.targets).sent
                except Exception as exc:  # the ledger or the objects: tried again next sweep
                    log.warning("sending results failed (tried again shortly): %s", exc)
        except Exception:
            log.exception("the result sender stopped; `bonewatch send` sends what is left")
        finally:
            engine.dispose()


def start_sender(settings: Settings, stop: threading.Event) -> Sender | None:
    """The sender thread of an embedded run, started; None when no destination is set."""
    sender = Sender(settings, stop)
    if not sender.targets:
        return None
    sender.start()
    return sender


def write_objects(
    engine: Engine, bundle: Bundle, settings: Settings, out: Path, *, study: str | None = None
) -> list[Path]:
    """``send --out``: the complete studies' objects written as files, nothing sent."""
    mark_stable_studies(engine, settings.study_stable_seconds)
    uids = [study] if study else outbox.studies_to_deliver(engine, bundle.name, bundle.version)
    if study is None:
        uids = sorted(set(uids) | {r["study_uid"] for r in outbox.query_deliveries(engine)})
    written: list[Path] = []
    for uid in uids:
        objects = build_study_objects(
            engine, uid, bundle, settings, all_images=settings.send_all_images
        )
        for sop, ds in objects.items():
            kind = "sr" if ds.Modality == "SR" else "sc"
            path = out / uid / f"{kind}-{sop}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            written.append(path)
    return written


SEND_LOCK = "bonewatch.send"


def exclusive_send_pass(engine: Engine, bundle: Bundle, settings: Settings) -> SendSummary:
    """Distributed mode's ``send`` task: :func:`send_pass` by one process at a time across the
    cluster (the ledger's advisory lock); a pass asked for while another runs does nothing."""
    from bonewatch.db import exclusive

    with exclusive(engine, SEND_LOCK) as mine:
        if not mine:
            return SendSummary()
        return send_pass(engine, bundle, settings, destinations(settings))
