"""Register and process files: ``process`` and ``watch``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from bonewatch.worker.cli._common import (
    BundleOpt,
    err,
    fail,
    out,
    progress_bar,
    settings_from,
    start_live_service,
    warn_if_not_clinical,
)
from bonewatch.worker.settings import Settings

log = logging.getLogger(__name__)

IncludeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--include",
        metavar="GLOB",
        help="Take only files and archive members matching GLOB (repeatable).",
    ),
]
ExcludeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--exclude", metavar="GLOB", help="Leave out files and archive members matching GLOB."
    ),
]


def _globs(values: list[str] | None) -> str | None:
    """Repeated --include/--exclude values as the setting holds them (comma-separated)."""
    return ",".join(values) if values else None


def process(
    paths: Annotated[list[Path], typer.Argument(help="Files and folders to process.")],
    bundle: BundleOpt = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per batch.")] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Distributed mode: follow the workers until done.")
    ] = False,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    window: Annotated[
        str | None,
        typer.Option(
            "--window",
            metavar="HH:MM-HH:MM",
            help="Embedded: work only in this local-time window (BONEWATCH_BULK_WINDOW).",
        ),
    ] = None,
) -> None:
    """Register and process files and folders.

    Every file under PATHS gets a ledger row in a new run (`bonewatch runs`), then all of them
    are processed and a summary is printed. Outside the bulk window the run waits for it.

    With BONEWATCH_BROKER_URL set, files are only registered and enqueued on the `bulk` queue
    for `bonewatch worker` processes. Bad files end as `failed`/`unsupported` rows with a reason;
    the exit code is non-zero only when the system itself fails (database, bundle, broker).
    """
    from bonewatch.db import count_by_status
    from bonewatch.worker.runner import open_ledger, preflight, process_paths

    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        fail(f"no such file or folder: {', '.join(missing)}")
    if window is not None:
        from bonewatch.worker.window import WindowError, parse_window

        try:
            parse_window(window)
        except WindowError as exc:
            fail(f"--window: {exc}")
    settings = settings_from(
        bundle=bundle, batch_size=batch_size, include=_globs(include), exclude=_globs(exclude),
        bulk_window=window,
    )  # fmt: skip
    if window is not None and settings.distributed:
        fail("--window is for embedded runs; distributed workers take bulk work in "
             "`bonewatch worker --bulk-window` (BONEWATCH_BULK_WINDOW)")  # fmt: skip
    root = settings.path_root_for_storage
    if settings.store_relative_paths and root is None:
        fail("BONEWATCH_STORE_RELATIVE_PATHS needs BONEWATCH_PATH_ROOT, the folder to store "
             "paths relative to")  # fmt: skip
    outside = [str(p) for p in paths if root is not None and not p.absolute().is_relative_to(root)]
    if outside:
        fail(f"not under BONEWATCH_PATH_ROOT {root}: {', '.join(outside)}")
    if settings.distributed:
        _enqueue(paths, settings, wait=wait)
        return
    preflight(settings)
    warn_if_not_clinical(settings)
    from bonewatch.ingest import counting_skips
    from bonewatch.worker.cli.runs import RunEta, run_progress
    from bonewatch.worker.runs import start_archive_run_on

    run_id = start_archive_run_on(open_ledger(settings), paths, settings)
    err.print(f"run {run_id}: `bonewatch runs show {run_id}` follows it from elsewhere")
    with run_progress() as progress, counting_skips() as walk:
        seen = progress.add_task("registering", total=None, eta="")
        work = progress.add_task("processing", total=0, eta="")
        eta = RunEta(settings, run_id)

        def finished(n: int) -> None:
            progress.advance(work, n)
            progress.update(work, eta=eta.text())

        registered, drained = process_paths(
            paths,
            settings,
            on_registered=lambda n: progress.advance(seen, n),
            on_queued=lambda n: progress.update(work, total=(progress.tasks[work].total or 0) + n),
            on_finished=finished,
            run_id=run_id,
            on_wait=lambda message: progress.console.print(message, highlight=False),
        )
        # archive members count as files seen: the bar ends full
        progress.update(seen, total=registered.seen, completed=registered.seen)
        progress.update(work, total=max(progress.tasks[work].completed, drained.finished))
    _deliver(settings, drained)
    counts = count_by_status(open_ledger(settings))
    skipped = (
        f", {registered.skipped} unreadable for now (I/O error; run again to take them)"
        if registered.skipped
        else ""
    )
    out.print(
        f"{registered.seen} file(s) seen: {registered.new} new, {registered.duplicates} "
        f"duplicate(s), {registered.refused} refused at the door{skipped}"
        + _left_out(registered, walk)
        + f"; {drained.finished} processed."
    )
    out.print("ledger: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


def _deliver(settings: Settings, drained: Any) -> None:
    """Embedded ``process``: the objects of the studies whose images all finished, sent for up
    to BONEWATCH_SEND_TIMEOUT; what is left stays pending, and the exit status stays 0."""
    from bonewatch.db import deliveries as outbox
    from bonewatch.models.bundle import load_bundle
    from bonewatch.worker import delivery
    from bonewatch.worker.runner import open_ledger

    targets = delivery.destinations(settings)
    if not targets:
        return
    engine = open_ledger(settings)
    try:
        bundle = load_bundle(settings.bundle)
        studies = outbox.finished_studies(engine, bundle.name, bundle.version)
        delivery.enqueue_studies(
            engine, bundle, targets, study_uids=studies, all_images=settings.send_all_images
        )
        summary = delivery.send_until_done(engine, bundle, settings, timeout=settings.send_timeout)
        counts = outbox.count_deliveries(engine)
    except Exception:  # the PACS's or the objects' trouble never fails `process`
        log.exception("sending the results failed; they stay in the outbox for `bonewatch send`")
        return
    finally:
        engine.dispose()
    out.print(
        f"results sent to PACS: {summary.sent} object(s); outbox: "
        + ", ".join(f"{k} {v}" for k, v in counts.items()),
        highlight=False,
    )


def _left_out(registered: Any, walk: Any) -> str:
    """The summary's part for what got no row: excluded files and members, symbolic links
    leading outside the folder, archive entries that are no files."""
    parts = []
    excluded = registered.excluded + walk.excluded
    if excluded:
        parts.append(f"{excluded} excluded by --include/--exclude")
    if walk.links_outside:
        parts.append(f"{walk.links_outside} symbolic link(s) leading outside skipped")
    if registered.archive_entries_skipped:
        parts.append(
            f"{registered.archive_entries_skipped} archive folder/link/device entries skipped"
        )
    return "".join(f", {part}" for part in parts)


def _enqueue(paths: list[Path], settings: Settings, *, wait: bool) -> None:
    """``process`` in distributed mode: register, publish on ``bulk``, optionally follow."""
    from bonewatch.worker.distributed import DistributedError, Publisher, open_shared_ledger
    from bonewatch.worker.runner import process_paths
    from bonewatch.worker.runs import start_archive_run_on

    try:
        publisher = Publisher(settings, "bulk")
        run_id = start_archive_run_on(open_shared_ledger(settings), paths, settings)
        err.print(f"run {run_id}: `bonewatch runs show {run_id}` follows it")
        with progress_bar() as progress:
            seen = progress.add_task("registering", total=None)
            queued = progress.add_task("enqueued on bulk", total=None)
            registered, _ = process_paths(
                paths,
                settings,
                on_registered=lambda n: progress.advance(seen, n),
                on_queued=lambda n: progress.advance(queued, n),
                enqueue=publisher,
                run_id=run_id,
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
        from bonewatch.worker.cli.runs import follow_run

        report = follow_run(settings, run_id)
        out.print(
            f"run {run_id} {report['state']}: "
            + ", ".join(f"{k} {v}" for k, v in report["counts"].items() if v),
            highlight=False,
        )


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
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
) -> None:
    """Follow a folder and process files as they complete.

    Files already in INBOX come first, then new ones, until Ctrl-C or SIGTERM."""
    from bonewatch.ingest.watcher import InboxWatcherError
    from bonewatch.worker.runner import watch_inbox

    if not inbox.is_dir():
        fail(f"inbox {inbox} is not a folder")
    settings = settings_from(
        poll=poll,
        settle_seconds=settle,
        bundle=bundle,
        quarantine=quarantine,
        include=_globs(include),
        exclude=_globs(exclude),
    )
    stop, enqueue = start_live_service(settings)
    try:
        watch_inbox(inbox, settings, stop=stop, on_event=lambda m: err.print(m), enqueue=enqueue)
    except KeyboardInterrupt:
        err.print("stopped")
    except InboxWatcherError as exc:  # exit 1, on one line, so that a supervisor restarts watch
        from rich.text import Text

        err.print(Text.assemble(("error: ", "bold red"), str(exc)), soft_wrap=True)
        raise typer.Exit(1) from exc
