"""Results back to PACS: the outbox filled from complete studies, and sending what is due.

``deliver`` builds and sends the objects from plain values; this module reads the ledger, makes
the values (and the heatmap pictures, with Grad-CAM), and records each attempt in the outbox.
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from sqlalchemy import Engine

from bonewatch.db import deliveries as outbox
from bonewatch.db import mark_stable_studies
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
) -> int:
    """Outbox rows for every complete study not enqueued yet: its SR and a Secondary Capture per
    positive image, for each destination. Returns the rows added."""
    if not targets:
        return 0
    items: list[outbox.NewDelivery] = []
    for uid in outbox.studies_to_deliver(
        engine, bundle.name, bundle.version, study_uids=study_uids
    ):
        items.extend(_study_items(engine, uid, bundle, targets))
    return outbox.enqueue_deliveries(engine, items)


def _study_items(
    engine: Engine, study_uid: str, bundle: Bundle, targets: Sequence[Destination]
) -> list[outbox.NewDelivery]:
    result = outbox.study_result(engine, study_uid, bundle.name, bundle.version)
    if result is None or not result.images:
        return []
    objects = [("sr", object_uids(study_uid, bundle.name, bundle.version, "sr")[1], None)]
    seen: set[str] = set()
    for image in result.images:
        if image.p_fracture >= image.threshold and image.sop_instance_uid not in seen:
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
) -> dict[str, Dataset]:
    """A study's result objects by SOP Instance UID (``only`` those UIDs, when given)."""
    from bonewatch.worker.pipeline import file_path

    result = outbox.study_result(engine, study_uid, bundle.name, bundle.version)
    if result is None or not result.images:
        return {}
    info = bundle_info(bundle)
    images: dict[str, outbox.ImageResultRow] = {}
    for row in result.images:
        images.setdefault(row.sop_instance_uid, row)
    headers = {uid: read_header(file_path(row.path, settings)) for uid, row in images.items()}
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
    wanted = [
        (uid, images[uid])
        for uid, o in outcomes.items()
        if o.positive
        and (
            only is None
            or object_uids(study_uid, bundle.name, bundle.version, "sc", uid)[1] in only
        )
    ]
    for n, (uid, row) in enumerate(wanted, start=1):
        picture = heatmap_picture(file_path(row.path, settings), outcomes[uid], bundle, settings)
        sc = build_secondary_capture(headers[uid], picture, outcomes[uid], info, instance_number=n)
        out[str(sc.SOPInstanceUID)] = sc
    return out


def heatmap_picture(path: str, image: ImageOutcome, bundle: Bundle, settings: Settings):  # type: ignore[no-untyped-def]
    """The source's pixels with the part's Grad-CAM heatmap over them, captioned."""
    from bonewatch.ingest import read_image
    from bonewatch.models.gradcam import explain_images, overlay_heatmap
    from bonewatch.worker.heatmaps import caption_lines, caption_warning, with_caption

    decoded = read_image(
        path, salt="deliver", max_pixels=settings.max_pixels, max_bytes=settings.max_file_bytes
    )
    part = image.part.upper()
    explanation = explain_images([decoded.pixels], [part], bundle)[0]
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
    """One pass over the due rows of this bundle version: build, send, record each attempt."""
    due = [
        d
        for d in outbox.due_deliveries(engine, study=study)
        if (d.bundle_name, d.bundle_version) == (bundle.name, bundle.version)
    ]
    groups: dict[tuple[str, str], list[outbox.DueDelivery]] = defaultdict(list)
    for row in due:
        groups[(row.study_uid, row.destination)].append(row)
    sent: list[int] = []
    failures: dict[int, str] = {}
    built: dict[str, dict[str, Dataset]] = {}
    build_errors: dict[str, str] = {}
    for (study_uid, target), rows in groups.items():
        if study_uid not in built:
            try:
                built[study_uid] = build_study_objects(engine, study_uid, bundle, settings)
            except Exception as exc:  # a bad source or result costs that study's objects only
                log.exception("cannot build the result objects of study %s", study_uid)
                built[study_uid] = {}
                build_errors[study_uid] = f"cannot build the object: {exc}"
        objects = built[study_uid]
        datasets = [objects[r.sop_instance_uid] for r in rows if r.sop_instance_uid in objects]
        for r in rows:
            if r.sop_instance_uid not in objects:
                failures[r.id] = build_errors.get(
                    study_uid, "the object can no longer be built (result or source gone)"
                )
        try:
            outcome = _send(datasets, Destination.parse(target), settings)
        except DeliveryError as exc:
            outcome = {str(ds.SOPInstanceUID): str(exc) for ds in datasets}
        for r in rows:
            if r.sop_instance_uid in outcome:
                error = outcome[r.sop_instance_uid]
                if error is None:
                    sent.append(r.id)
                else:
                    failures[r.id] = error
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
            rng=rng or random.Random(),
        )
    return SendSummary(len(sent), len(failures) - gave_up, gave_up)


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
    while True:
        s = send_due(engine, bundle, settings, study=study)
        total = SendSummary(total.sent + s.sent, s.retrying, total.failed + s.failed)
        nxt = outbox.next_delivery_at(engine, study=study)
        if nxt is None:
            return total
        from bonewatch.db.schema import utcnow

        wait = max(0.0, (nxt - utcnow()).total_seconds())
        if time.monotonic() + wait > deadline:
            return total
        time.sleep(min(wait, max(0.0, deadline - time.monotonic())) + 0.01)


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
        for sop, ds in build_study_objects(engine, uid, bundle, settings).items():
            kind = "sr" if ds.Modality == "SR" else "sc"
            path = out / uid / f"{kind}-{sop}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            written.append(path)
    return written
