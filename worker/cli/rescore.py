"""Scoring finished images with another bundle: ``rescore``."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

import typer

from bonewatch.worker.cli._common import (
    BundleOpt,
    out,
    progress_bar,
    settings_from,
    warn_if_not_clinical,
)


def rescore(
    bundle: BundleOpt = None,
    study: Annotated[str | None, typer.Option(help="Only this study.")] = None,
    part: Annotated[
        str | None, typer.Option(help="Only images an earlier bundle gave this part.")
    ] = None,
    since: Annotated[
        dt.datetime | None,
        typer.Option(help="Only images registered at or after this time (UTC unless given)."),
    ] = None,
    path: Annotated[str | None, typer.Option(help="Only paths matching this glob.")] = None,
) -> None:
    """Score finished images again with another bundle or version.

    Images the bundle (BONEWATCH_BUNDLE or --bundle) has already scored are left alone; earlier
    bundles' results stay, and `bonewatch results --bundle NAME` shows either. With
    BONEWATCH_BROKER_URL set, the images are queued on `bulk` for workers that serve the same
    bundle.
    """
    from bonewatch.worker.rescore import rescore as run_rescore
    from bonewatch.worker.runner import preflight

    settings = settings_from(bundle=bundle)
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=dt.UTC)
    enqueue = None
    if settings.distributed:
        from bonewatch.worker.distributed import Publisher

        enqueue = Publisher(settings, "bulk")
    else:
        preflight(settings)
    warn_if_not_clinical(settings)
    with progress_bar() as progress:
        work = progress.add_task("rescoring", total=None)
        summary = run_rescore(
            settings,
            study=study,
            part=part,
            since=since,
            path_glob=path,
            on_queued=lambda n: progress.update(work, total=n),
            on_finished=lambda n: progress.advance(work, n),
            enqueue=enqueue,
        )
    done = "enqueued on bulk" if enqueue else f"{summary.finished} scored"
    out.print(
        f"{summary.queued} image(s) queued for {summary.bundle} {summary.version}; {done}.",
        highlight=False,
    )
