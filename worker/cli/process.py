"""Register and process files: ``process`` and ``watch``."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from bonewatch.worker.cli._common import BundleOpt, err, fail, out, progress_bar, settings_from
from bonewatch.worker.settings import Settings


def process(
    paths: Annotated[list[Path], typer.Argument(help="Files and folders to process.")],
    bundle: BundleOpt = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per batch.")] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Distributed mode: follow the workers until done.")
    ] = False,
) -> None:
    """Register every file under PATHS, process them all, print a summary.

    With BONEWATCH_BROKER_URL set, files are only registered and enqueued on the `bulk` queue
    for `bonewatch worker` processes. Bad files end as `failed`/`unsupported` rows with a reason;
    the exit code is non-zero only when the system itself fails (database, bundle, broker).
    """
    from bonewatch.db import count_by_status
    from bonewatch.worker.runner import open_ledger, process_paths

    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        fail(f"no such file or folder: {', '.join(missing)}")
    settings = settings_from(bundle=bundle, batch_size=batch_size)
    if settings.distributed:
        _enqueue(paths, settings, wait=wait)
        return
    with progress_bar() as progress:
        seen = progress.add_task("registering", total=None)
        work = progress.add_task("processing", total=0)
        registered, drained = process_paths(
            paths,
            settings,
            on_registered=lambda n: progress.advance(seen, n),
            on_queued=lambda n: progress.update(work, total=(progress.tasks[work].total or 0) + n),
            on_finished=lambda n: progress.advance(work, n),
        )
        progress.update(seen, total=registered.seen)
        progress.update(work, total=max(progress.tasks[work].completed, drained.finished))
    counts = count_by_status(open_ledger(settings))
    skipped = (
        f", {registered.skipped} unreadable for now (I/O error; run again to take them)"
        if registered.skipped
        else ""
    )
    out.print(
        f"{registered.seen} file(s) seen: {registered.new} new, {registered.duplicates} "
        f"duplicate(s), {registered.refused} refused at the door{skipped}; "
        f"{drained.finished} processed."
    )
    out.print("ledger: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


def _enqueue(paths: list[Path], settings: Settings, *, wait: bool) -> None:
    """``process`` in distributed mode: register, publish on ``bulk``, optionally follow."""
    from bonewatch.worker.distributed import DistributedError, Publisher
    from bonewatch.worker.runner import process_paths

    try:
        publisher = Publisher(settings, "bulk")
        with progress_bar() as progress:
            seen = progress.add_task("registering", total=None)
            queued = progress.add_task("enqueued on bulk", total=None)
            registered, _ = process_paths(
                paths,
                settings,
                on_registered=lambda n: progress.advance(seen, n),
                on_queued=lambda n: progress.advance(queued, n),
                enqueue=publisher,
            )
            progress.update(seen, total=registered.seen)
            progress.update(queued, total=publisher.images)
    except DistributedError as exc:
        fail(str(exc))
    out.print(
        f"{registered.seen} file(s) seen: {registered.new} new, {registered.duplicates} "
        f"duplicate(s), {registered.refused} refused at the door; {publisher.images} image(s) "
        f"enqueued on bulk in {publisher.messages} message(s)."
    )
    if wait:
        _follow_ledger(settings)


def _follow_ledger(settings: Settings, poll_seconds: float = 1.0) -> None:
    """Show the ledger's progress until nothing is queued or processing any more."""
    import time

    from bonewatch.db import count_by_status
    from bonewatch.worker.distributed import open_shared_ledger

    engine = open_shared_ledger(settings)
    with progress_bar() as progress:
        task = progress.add_task("workers finishing", total=None)
        while True:
            counts = count_by_status(engine)
            pending = counts["queued"] + counts["processing"]
            total = sum(counts.values())
            progress.update(task, total=total, completed=total - pending)
            if not pending:
                break
            time.sleep(poll_seconds)
    out.print("ledger: " + ", ".join(f"{k} {v}" for k, v in count_by_status(engine).items()))


def watch(
    inbox: Annotated[Path, typer.Argument(help="Folder to follow.")],
    poll: Annotated[bool | None, typer.Option("--poll", help="Poll (network shares).")] = None,
    settle: Annotated[
        float | None, typer.Option(help="Seconds a file must stay unchanged.")
    ] = None,
    bundle: BundleOpt = None,
    quarantine: Annotated[
        bool | None,
        typer.Option(
            "--quarantine/--no-quarantine",
            help="Move finished files to INBOX/done/ or INBOX/failed/ (BONEWATCH_QUARANTINE).",
        ),
    ] = None,
) -> None:
    """Follow INBOX until Ctrl-C: files already there first, then new ones as they complete."""
    from bonewatch.worker.runner import watch_inbox

    if not inbox.is_dir():
        fail(f"inbox {inbox} is not a folder")
    settings = settings_from(poll=poll, settle_seconds=settle, bundle=bundle, quarantine=quarantine)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    enqueue = None
    if settings.distributed:
        from bonewatch.worker.distributed import Publisher

        enqueue = Publisher(settings, "live")
    try:
        watch_inbox(inbox, settings, stop=stop, on_event=lambda m: err.print(m), enqueue=enqueue)
    except KeyboardInterrupt:
        err.print("stopped")
