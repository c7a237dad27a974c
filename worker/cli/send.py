"""``send``: the result objects of complete studies back to PACS (docs/deliver.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bonewatch.worker.cli._common import BundleOpt, fail, out, settings_from


def send(
    study: Annotated[str | None, typer.Option("--study", help="Only this study's objects.")] = None,
    to: Annotated[
        str | None,
        typer.Option("--to", help="AET@HOST:PORT (or a STOW-RS URL) instead of the configured."),
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Write the objects as files, send nothing.")
    ] = None,
    all_images: Annotated[
        bool | None,
        typer.Option(
            "--all-images",
            help="A Secondary Capture of every image, not only the positives "
            "(BONEWATCH_SEND_ALL_IMAGES).",
        ),
    ] = None,
    bundle: BundleOpt = None,
) -> None:
    """Send results to PACS as DICOM (SR and Secondary Captures).

    The SRs and heatmap Secondary Captures of complete studies.

    Without options: enqueue the complete studies' objects for the configured destinations
    (BONEWATCH_DICOM_DESTINATIONS, BONEWATCH_DICOMWEB_URL), retry the failed ones, and send
    everything due once."""
    from bonewatch.db import deliveries as outbox
    from bonewatch.deliver import Destination
    from bonewatch.models.bundle import load_bundle
    from bonewatch.worker import delivery
    from bonewatch.worker.runner import open_ledger

    settings = settings_from(bundle=bundle, send_all_images=all_images)
    try:
        targets = (Destination.parse(to),) if to else delivery.destinations(settings)
    except ValueError as exc:
        fail(str(exc))
    from bonewatch.db import mark_stable_studies

    loaded = load_bundle(settings.bundle, digest=settings.bundle_sha256)
    engine = open_ledger(settings)
    try:
        if out_dir is not None:
            written = delivery.write_objects(engine, loaded, settings, out_dir, study=study)
            out.print(f"{len(written)} object(s) written under {out_dir}", highlight=False)
            return
        if not targets:
            fail("no destination: set BONEWATCH_DICOM_DESTINATIONS or BONEWATCH_DICOMWEB_URL, "
                 "or pass --to")  # fmt: skip
        mark_stable_studies(engine, settings.study_stable_seconds)
        added = delivery.enqueue_studies(
            engine,
            loaded,
            targets,
            study_uids=[study] if study else None,
            all_images=settings.send_all_images,
        )
        retried = outbox.retry_failed(engine, study=study)
        summary = delivery.send_due(engine, loaded, settings, study=study)
        counts = outbox.count_deliveries(engine)
    finally:
        engine.dispose()
    out.print(
        f"{added} new, {retried} failed retried; sent {summary.sent}, "
        f"{summary.retrying} to retry, {summary.failed} failed. Outbox: "
        + ", ".join(f"{k} {v}" for k, v in counts.items()),
        highlight=False,
    )
