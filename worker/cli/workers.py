"""Distributed mode's workers: ``worker`` and ``reconcile``."""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer

from bonewatch.worker.cli._common import (
    BundleOpt,
    TableOrJson,
    fail,
    out,
    settings_from,
    warn_if_not_clinical,
)


def worker(
    queues: Annotated[
        str, typer.Option("--queues", "-Q", help="Queues to consume; live always first.")
    ] = "live,bulk",
    concurrency: Annotated[
        int,
        typer.Option(
            "--concurrency",
            "-c",
            min=0,
            help="Worker processes on this host, sharing its cores; 0 = one per core (at most 4) "
            "on ONNX Runtime, 1 on Keras.",
        ),
    ] = 0,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
    hostname: Annotated[
        str | None, typer.Option(help="Celery node name (default bonewatch@<host>).")
    ] = None,
    bundle: BundleOpt = None,
    bulk_window: Annotated[
        str | None,
        typer.Option(
            "--bulk-window",
            metavar="HH:MM-HH:MM",
            help="Take bulk work only then, in local time (BONEWATCH_BULK_WINDOW).",
        ),
    ] = None,
) -> None:
    """Run Celery workers (distributed mode).

    Needs BONEWATCH_BROKER_URL.

    Each process loads the bundle once and takes batches of image ids; the parent also runs
    `reconcile` every BONEWATCH_RECONCILE_INTERVAL seconds.
    """
    from bonewatch.worker.distributed import DistributedError, parse_queues, run_worker

    settings = settings_from(bundle=bundle, bulk_window=bulk_window)
    if not settings.distributed:
        fail("bonewatch worker needs BONEWATCH_BROKER_URL (e.g. redis://127.0.0.1:6379/0)")
    warn_if_not_clinical(settings)
    try:
        run_worker(
            settings,
            queues=parse_queues(queues),
            concurrency=concurrency,
            loglevel=loglevel.upper(),
            hostname=hostname or f"bonewatch-{os.getpid()}@%h",
        )
    except DistributedError as exc:
        fail(str(exc))


def reconcile(
    fmt: Annotated[TableOrJson, typer.Option("--format", help="table or json.")] = (
        TableOrJson.table
    ),
) -> None:
    """Reclaim expired leases and re-publish lost messages."""
    from bonewatch.worker.distributed import DistributedError, open_shared_ledger
    from bonewatch.worker.distributed import reconcile as run_reconcile

    settings = settings_from()
    if not settings.distributed:
        fail("bonewatch reconcile needs BONEWATCH_BROKER_URL (there is no queue to repair)")
    try:
        summary = run_reconcile(open_shared_ledger(settings), settings)
    except DistributedError as exc:
        fail(str(exc))
    if fmt is TableOrJson.json:
        sys.stdout.write(json.dumps(summary.as_dict()) + "\n")
        return
    out.print(
        f"released {summary.released} lease(s) of dead local workers, reclaimed "
        f"{summary.reclaimed} expired lease(s), re-published {summary.republished} image(s); "
        "queue depths: " + ", ".join(f"{q} {n}" for q, n in summary.queues.items())
    )
