"""The ``bonewatch`` command line: thin shells over library functions."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import logging
import os
import shlex
import signal
import sys
import threading
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter off

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from bonewatch.worker.settings import Settings

app = typer.Typer(
    help="bonewatch: find bone fractures on upper-limb radiographs (DICOM and PNG).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Ledger database maintenance.", no_args_is_help=True)
bundle_app = typer.Typer(help="Model bundles.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(bundle_app, name="bundle")

# Piped or captured output has no terminal width; rich would squeeze tables into 80 columns.
_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200
out = Console(width=_WIDTH)
err = Console(stderr=True)


class OutputFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


class Level(StrEnum):
    image = "image"
    study = "study"


class SynthFormat(StrEnum):
    png = "png"
    dicom = "dicom"
    both = "both"


def _settings(**overrides: Any) -> Settings:
    base = Settings()
    given = {k: v for k, v in overrides.items() if v is not None}
    return base.model_copy(update=given) if given else base


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False)],
    )


def _progress() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    )


BundleOpt = Annotated[
    Path | None, typer.Option("--bundle", "-b", help="Model bundle folder (BONEWATCH_BUNDLE).")
]

LayoutOpt = Annotated[str, typer.Option(help="Dataset layout: auto, mura, folders or labels.")]
LabelsOpt = Annotated[
    Path | None, typer.Option(help="Labels CSV (labels layout); DATASET/labels.csv if unset.")
]
PartOpt = Annotated[str | None, typer.Option(help="Body part of images whose layout names none.")]


@app.command()
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
        _fail(f"no such file or folder: {', '.join(missing)}")
    settings = _settings(bundle=bundle, batch_size=batch_size)
    if settings.distributed:
        _enqueue(paths, settings, wait=wait)
        return
    with _progress() as progress:
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
        with _progress() as progress:
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
        _fail(str(exc))
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
    with _progress() as progress:
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


@app.command()
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
        _fail(f"inbox {inbox} is not a folder")
    settings = _settings(poll=poll, settle_seconds=settle, bundle=bundle, quarantine=quarantine)
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


@app.command()
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
) -> None:
    """Run Celery worker processes (distributed mode; needs BONEWATCH_BROKER_URL).

    Each process loads the bundle once and takes batches of image ids; the parent also runs
    `reconcile` every BONEWATCH_RECONCILE_INTERVAL seconds.
    """
    from bonewatch.worker.distributed import DistributedError, parse_queues, run_worker

    settings = _settings(bundle=bundle)
    if not settings.distributed:
        _fail("bonewatch worker needs BONEWATCH_BROKER_URL (e.g. redis://127.0.0.1:6379/0)")
    try:
        run_worker(
            settings,
            queues=parse_queues(queues),
            concurrency=concurrency,
            loglevel=loglevel.upper(),
            hostname=hostname or f"bonewatch-{os.getpid()}@%h",
        )
    except DistributedError as exc:
        _fail(str(exc))


@app.command()
def reconcile(
    fmt: Annotated[OutputFormat, typer.Option("--format", help="table or json.")] = (
        OutputFormat.table
    ),
) -> None:
    """Reclaim expired leases and re-publish queued images whose message was lost."""
    from bonewatch.worker.distributed import DistributedError, open_shared_ledger
    from bonewatch.worker.distributed import reconcile as run_reconcile

    settings = _settings()
    if not settings.distributed:
        _fail("bonewatch reconcile needs BONEWATCH_BROKER_URL (there is no queue to repair)")
    try:
        summary = run_reconcile(open_shared_ledger(settings), settings)
    except DistributedError as exc:
        _fail(str(exc))
    if fmt is OutputFormat.json:
        sys.stdout.write(json.dumps(summary.as_dict()) + "\n")
        return
    out.print(
        f"released {summary.released} lease(s) of dead local workers, reclaimed "
        f"{summary.reclaimed} expired lease(s), re-published {summary.republished} image(s); "
        "queue depths: " + ", ".join(f"{q} {n}" for q, n in summary.queues.items())
    )


def _render(rows: list[dict[str, Any]], columns: list[str], fmt: OutputFormat) -> None:
    if fmt is OutputFormat.json:
        sys.stdout.write(json.dumps(rows, indent=2, default=str) + "\n")
    elif fmt is OutputFormat.csv:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        sys.stdout.write(buf.getvalue())
    else:
        table = Table(show_lines=False)
        for column in columns:
            table.add_column(column, no_wrap=column != "reason", overflow="fold")
        for row in rows:
            table.add_row(*(_cell(_shown(c, row.get(c))) for c in columns))
        out.print(table)


def _shown(column: str, value: Any) -> Any:
    """Paths under the working directory are shown relative to it, to keep tables readable."""
    if column in ("path", "heatmap_path") and isinstance(value, str):
        try:
            return str(Path(value).relative_to(Path.cwd()))
        except ValueError:
            return value
    return value


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


IMAGE_COLUMNS = [
    "path",
    "status",
    "body_part",
    "body_part_confidence",
    "p_fracture",
    "label",
    "reason",
]
STUDY_COLUMNS = ["study_uid", "body_part", "n_images", "mean_p_fracture", "threshold", "label"]


@app.command()
def results(
    study: Annotated[str | None, typer.Option(help="Study UID (or MURA study folder).")] = None,
    part: Annotated[str | None, typer.Option(help="Body part, e.g. WRIST.")] = None,
    label: Annotated[str | None, typer.Option(help="positive or negative.")] = None,
    status: Annotated[str | None, typer.Option(help="queued, done, failed, ...")] = None,
    since: Annotated[
        dt.datetime | None, typer.Option(help="Only images registered at or after this time.")
    ] = None,
    min_p: Annotated[float | None, typer.Option(help="Lowest p(fracture).")] = None,
    max_p: Annotated[float | None, typer.Option(help="Highest p(fracture).")] = None,
    level: Annotated[Level, typer.Option(help="One row per image or per study.")] = Level.image,
    fmt: Annotated[OutputFormat, typer.Option("--format", help="Output format.")] = (
        OutputFormat.table
    ),
) -> None:
    """Query stored results."""
    from bonewatch.db import query_results, query_studies
    from bonewatch.worker.runner import open_ledger

    engine = open_ledger(_settings())
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=dt.UTC)
    if level is Level.study:
        image_only = {"--status": status, "--since": since, "--min-p": min_p, "--max-p": max_p}
        given = [name for name, value in image_only.items() if value is not None]
        if given:
            _fail(f"{', '.join(given)} filter(s) images; use them without --level study")
        rows = query_studies(engine, study=study, part=part, label=label)
        _render(rows, STUDY_COLUMNS, fmt)
        return
    rows = query_results(
        engine,
        study=study,
        part=part.upper() if part else None,
        label=label,
        status=status,
        since=since,
        min_p=min_p,
        max_p=max_p,
    )
    columns = list(rows[0]) if rows and fmt is not OutputFormat.table else IMAGE_COLUMNS
    if fmt is OutputFormat.table and any(row.get("heatmap_path") for row in rows):
        columns = [*columns, "heatmap_path"]
    _render(rows, columns, fmt)


@app.command("status")
def status_cmd(
    fmt: Annotated[OutputFormat, typer.Option("--format", help="table or json.")] = (
        OutputFormat.table
    ),
) -> None:
    """Count images by status, check nothing is lost or counted twice, show queue depths."""
    from bonewatch.worker.runner import ledger_status

    try:
        report = ledger_status(_settings())
    except Exception as exc:
        from bonewatch.worker.distributed import DistributedError

        if isinstance(exc, DistributedError):
            _fail(str(exc))
        raise
    if fmt is OutputFormat.json:
        sys.stdout.write(json.dumps(report) + "\n")
        return
    table = Table("status", "images")
    for key, value in report["counts"].items():
        table.add_row(key, str(value))
    table.add_row("[bold]total", str(report["total"]))
    out.print(table)
    health = report["health"]
    out.print(
        f"lost: {report['lost']} ({health['expired_leases']} expired lease(s)"
        + (
            f", {health['unpublished']} queued without a message"
            if health.get("unpublished") is not None
            else ""
        )
        + f"); images predicted twice by one bundle version: {health['double_predictions']}"
    )
    if report["queues"] is not None:
        out.print("queue depths: " + ", ".join(f"{q} {n}" for q, n in report["queues"].items()))


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the ledger schema to the latest revision."""
    from bonewatch.db import current_revision, upgrade

    url = _settings().resolved_database_url
    if url.startswith("sqlite"):
        _settings().data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(url)
    out.print(f"ledger at revision {current_revision(url)}")


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="Folder to write into.")],
    studies: Annotated[int, typer.Option(min=1, help="Number of studies.")] = 20,
    fmt: Annotated[SynthFormat, typer.Option("--format", help="png, dicom or both.")] = (
        SynthFormat.png
    ),
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same files.")] = 0,
    split: Annotated[str, typer.Option(help="MURA split folder name.")] = "train",
) -> None:
    """Write synthetic phantom studies in MURA layout (PNG and/or DICOM)."""
    from bonewatch.worker.synth import synthesize

    with _progress() as progress:
        task = progress.add_task("drawing studies", total=studies)
        summary = synthesize(
            out_dir,
            studies=studies,
            fmt=fmt.value,
            seed=seed,
            split=split,
            on_study=lambda n: progress.advance(task, n),
        )
    out.print(
        f"wrote {summary.studies} studies, {summary.images} images, {summary.fractures} "
        f"fractures to {out_dir}"
    )


@app.command()
def train(
    dataset: Annotated[
        Path,
        typer.Argument(
            help="Dataset folder: MURA layout, Fracture/ Normal/ folders, or images with a "
            "labels.csv."
        ),
    ],
    bundle_out: Annotated[Path, typer.Option("--out", help="Bundle folder to write.")],
    name: Annotated[str, typer.Option(help="Bundle name.")] = "bundle",
    version: Annotated[str | None, typer.Option(help="Bundle version.")] = None,
    layout: LayoutOpt = "auto",
    labels: LabelsOpt = None,
    part: PartOpt = None,
    backbone: Annotated[
        str,
        typer.Option(
            help="small_cnn, densenet121, densenet169, resnet50, efficientnetb0 or "
            "mobilenetv3small."
        ),
    ] = "small_cnn",
    weights: Annotated[
        str,
        typer.Option(
            help="Initial backbone weights: none, imagenet (downloaded), or a local file saved "
            "from the same keras.applications model with include_top=False."
        ),
    ] = "none",
    input_size: Annotated[int, typer.Option(help="Model input side in pixels.")] = 128,
    epochs: Annotated[int, typer.Option(help="Stage-1 epochs.")] = 15,
    fracture_epochs: Annotated[
        int, typer.Option(help="Epochs of the fracture model shared by all parts.")
    ] = 40,
    part_epochs: Annotated[
        int, typer.Option(help="Fine-tuning epochs of each part's fracture model.")
    ] = 10,
    freeze_epochs: Annotated[
        int, typer.Option(min=0, help="Pretrained weights: first epochs with the backbone frozen.")
    ] = 3,
    fine_tune_layers: Annotated[
        int, typer.Option(help="Pretrained weights: top backbone layers fine-tuned next (-1: all).")
    ] = 40,
    fine_tune_lr: Annotated[
        float | None,
        typer.Option(
            help="Rate of fine-tuning and of each part's model (default: learning rate / 5)."
        ),
    ] = None,
    learning_rate: Annotated[float, typer.Option(help="Rate of training from scratch.")] = 2e-3,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per step.")] = 32,
    patience: Annotated[
        int, typer.Option(min=1, help="Epochs without a better validation score before stopping.")
    ] = 8,
    augment: Annotated[
        str, typer.Option(help="none, flip, or full (flips, rotation, zoom, brightness).")
    ] = "flip",
    class_weights: Annotated[
        bool, typer.Option(help="Weigh classes inversely to their frequency.")
    ] = True,
    fractions: Annotated[
        str, typer.Option(help="Train,validation,test shares of the patients.")
    ] = "0.7,0.15,0.15",
    cache_gb: Annotated[
        float, typer.Option(min=0.0, help="Largest disk cache of preprocessed images (0: none).")
    ] = 8.0,
    resume: Annotated[
        bool, typer.Option(help="Continue the interrupted run into --out where it stopped.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed for splits, weights and shuffling.")] = 0,
    confidence_floor: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Stage-1 probability below which = unsupported.")
    ] = 0.7,
    intended_use: Annotated[
        str, typer.Option(help="Intended-use statement for the model card.")
    ] = "Research use: fracture triage on upper-limb radiographs. Not a diagnostic device.",
) -> None:
    """Train a two-stage bundle (body part, then a fracture model per part)."""
    from bonewatch.models.architectures import WeightsError
    from bonewatch.models.datasets import DatasetError, detect_layout, load_dataset
    from bonewatch.models.train import TrainConfig, TrainProgress, train_bundle

    try:
        found = detect_layout(dataset, labels) if layout == "auto" else layout
        samples = load_dataset(dataset, layout=found, labels=labels, part=part)
        config = TrainConfig(
            backbone=backbone,
            weights=weights,
            input_size=input_size,
            epochs=epochs,
            fracture_epochs=fracture_epochs,
            part_epochs=part_epochs,
            freeze_epochs=freeze_epochs,
            fine_tune_layers=fine_tune_layers,
            fine_tune_lr=fine_tune_lr,
            learning_rate=learning_rate,
            batch_size=batch_size,
            patience=patience,
            augment=augment,
            class_weights=class_weights,
            fractions=tuple(float(f) for f in fractions.split(",")),  # type: ignore[arg-type]
            cache_gb=cache_gb,
            seed=seed,
            confidence_floor=confidence_floor,
        )
    except (DatasetError, ValueError) as exc:
        _fail(str(exc))
    err.print(f"{len(samples)} images in the {found} layout under {dataset}")
    with _progress() as progress:
        bars: dict[str, Any] = {}

        def show(p: TrainProgress) -> None:
            if p.stage not in bars:
                bars[p.stage] = progress.add_task(p.stage, total=p.steps)
            label = f"{p.stage} {p.epoch}/{p.epochs}" if p.epoch else p.stage
            progress.update(bars[p.stage], description=label, total=p.steps, completed=p.step)

        try:
            result = train_bundle(
                samples,
                bundle_out,
                config=config,
                name=name,
                version=version,
                intended_use=intended_use,
                dataset=str(dataset),
                command="bonewatch " + shlex.join(sys.argv[1:]),
                report=lambda m: progress.console.print(m, markup=False, highlight=False),
                resume=resume,
                progress=show,
                layout=found,
            )
        except (WeightsError, ValueError) as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            _fail("interrupted; run the same command with --resume to continue", code=130)
    metrics = result.manifest.get("metrics", {})
    out.print(
        f"bundle written to {result.bundle_dir}: held-out body-part accuracy "
        f"{_cell(metrics.get('body_part_accuracy'))}, study AUROC "
        f"{_cell(metrics.get('fracture_auroc_study'))}"
    )


@app.command()
def evaluate(
    dataset: Annotated[
        Path,
        typer.Argument(
            help="Labelled dataset: MURA layout, Fracture/ Normal/ folders, or images with a "
            "labels.csv."
        ),
    ],
    bundle: BundleOpt = None,
    layout: LayoutOpt = "auto",
    labels: LabelsOpt = None,
    part: PartOpt = None,
    folds: Annotated[
        int | None,
        typer.Option(
            "--folds",
            min=2,
            help="k-fold cross-validation by patient: train one bundle per fold with the "
            "bundle's recorded recipe, evaluate it on the held-out fold.",
        ),
    ] = None,
    report_dir: Annotated[
        Path | None, typer.Option("--report", help="Write an HTML report with plots here.")
    ] = None,
    localisation: Annotated[
        bool,
        typer.Option(
            "--localisation",
            help="Also measure how often the Grad-CAM peak lies in a fracture box "
            "(phantoms: the dataset's fractures.csv).",
        ),
    ] = False,
    resamples: Annotated[
        int, typer.Option("--bootstrap", min=0, help="Bootstrap resamples for the 95 % CIs.")
    ] = 1000,
    seed: Annotated[
        int | None,
        typer.Option(
            help="Seed of the bootstrap (default 0) and of the folds (default the recipe's seed)."
        ),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="With --folds: replace one recipe setting, KEY=VALUE (repeatable)."
        ),
    ] = None,
    fmt: Annotated[OutputFormat, typer.Option("--format", help="table or json.")] = (
        OutputFormat.table
    ),
) -> None:
    """Evaluate a bundle on a labelled dataset: MURA metrics with 95 % bootstrap CIs."""
    from bonewatch.models.bundle import BundleError, load_bundle
    from bonewatch.models.datasets import DatasetError, load_dataset
    from bonewatch.models.evaluate import Bootstrap, evaluate_predictions
    from bonewatch.worker import reports

    if overrides and folds is None:
        _fail("--set changes the training recipe; it only applies with --folds")
    if localisation and folds is not None:
        _fail("--localisation measures the given bundle; run it without --folds")
    if localisation and not (dataset / "fractures.csv").is_file():
        _fail(f"--localisation needs {dataset / 'fractures.csv'} (written by bonewatch synth)")
    try:
        samples = load_dataset(dataset, layout=layout, labels=labels, part=part)
    except DatasetError as exc:
        _fail(str(exc))
    settings = _settings(bundle=bundle)
    boot = Bootstrap(resamples=resamples, seed=0 if seed is None else seed) if resamples else None
    try:
        loaded = load_bundle(settings.bundle)
    except BundleError as exc:
        _fail(str(exc), code=1)
    if folds is not None:
        _cross_validate(
            dataset, samples, loaded, folds, seed, overrides or [], boot, report_dir, fmt
        )
        return
    with _progress() as progress:
        task = progress.add_task("evaluating", total=len(samples))
        report, scored = evaluate_predictions(
            samples, loaded, bootstrap=boot, on_batch=lambda n: progress.advance(task, n)
        )
    if localisation:
        from bonewatch.models.gradcam import measure_localisation, read_fracture_boxes

        boxes = read_fracture_boxes(dataset)
        with _progress() as progress:
            n_boxed = sum(s.path.resolve() in boxes for s in samples)
            task = progress.add_task("Grad-CAM", total=n_boxed)
            report["localisation"] = measure_localisation(
                samples, boxes, loaded, on_batch=lambda n: progress.advance(task, n)
            ).to_dict()
    if report_dir is not None:
        from bonewatch.models.report import write_report

        index = write_report(
            report_dir,
            report,
            scored,
            title=f"{loaded.name} {loaded.version} on {dataset}",
            manifest=loaded.manifest,
            bundle=loaded,
        )
        err.print(f"report written to {index}")
    if fmt is OutputFormat.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    for renderable in reports.evaluation(report):
        out.print(renderable)
    if "localisation" in report:
        out.print(reports.localisation(report["localisation"]))


def _cross_validate(
    dataset: Path,
    samples: list[Any],
    loaded: Any,
    k: int,
    seed: int | None,
    overrides: list[str],
    boot: Any,
    report_dir: Path | None,
    fmt: OutputFormat,
) -> None:
    """``evaluate --folds K``: one bundle trained and evaluated per fold."""
    from bonewatch.models.crossval import cross_validate, parse_overrides
    from bonewatch.worker import reports

    try:
        changes = parse_overrides(overrides)
        cv = cross_validate(
            samples,
            loaded.manifest,
            k,
            seed=seed,
            overrides=changes,
            bootstrap=boot,
            dataset=str(dataset),
            command="bonewatch " + shlex.join(sys.argv[1:]),
            report=lambda m: err.print(m),
        )
    except ValueError as exc:
        _fail(str(exc))
    if report_dir is not None:
        from bonewatch.models.report import write_report

        index = write_report(
            report_dir,
            cv.report["pooled"],
            [s for fold in cv.folds for s in fold.scored],
            title=f"{k}-fold cross-validation of the {loaded.name} {loaded.version} recipe "
            f"on {dataset}",
            manifest=loaded.manifest,
            histories={f"fold {f.fold}": f.history for f in cv.folds},
            cross_validation=cv.report,
        )
        err.print(f"report written to {index}")
    if fmt is OutputFormat.json:
        sys.stdout.write(json.dumps(cv.report, indent=2) + "\n")
        return
    for renderable in reports.cross_validation(cv.report):
        out.print(renderable)


@app.command()
def explain(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="DICOM, PNG or JPEG radiograph.")],
    out_png: Annotated[
        Path | None,
        typer.Option("--out", help="PNG to write (default ./<FILE stem>-gradcam.png)."),
    ] = None,
    bundle: BundleOpt = None,
    part: Annotated[
        str | None,
        typer.Option(help="Explain this part's fracture model instead of stage 1's choice."),
    ] = None,
    fmt: Annotated[OutputFormat, typer.Option("--format", help="table or json.")] = (
        OutputFormat.table
    ),
) -> None:
    """Write FILE with the Grad-CAM heatmap of its part's fracture model over it."""
    from bonewatch.ingest import IngestError
    from bonewatch.models.bundle import BundleError, load_bundle
    from bonewatch.worker.heatmaps import ExplainRefused, explain_file

    if not file.is_file():
        _fail(f"no such file: {file}")
    settings = _settings(bundle=bundle)
    target = out_png or Path.cwd() / f"{file.stem}-gradcam.png"
    try:
        loaded = load_bundle(settings.bundle)
        result = explain_file(file, loaded, settings, out=target.absolute(), part=part)
    except BundleError as exc:
        _fail(str(exc), code=1)
    except IngestError as exc:
        _fail(f"{file}: {exc.reason}", code=1)
    except (ExplainRefused, ValueError) as exc:
        _fail(str(exc), code=1)
    if fmt is OutputFormat.json:
        sys.stdout.write(json.dumps(result.to_json()) + "\n")
        return
    label = "positive" if result.p_fracture >= result.threshold else "negative"
    out.print(
        f"{result.part} fracture model: p(fracture) {result.p_fracture:.3f} (threshold "
        f"{result.threshold:.3f}: {label}); heatmap peak at x={result.peak_xy[0]}, "
        f"y={result.peak_xy[1]} (layer {result.layer}); written to {result.heatmap}"
    )


@bundle_app.command("show")
def bundle_show(
    bundle_dir: Annotated[Path, typer.Argument(metavar="B", help="Bundle folder.")],
    fmt: Annotated[OutputFormat, typer.Option("--format", help="table or json.")] = (
        OutputFormat.table
    ),
) -> None:
    """Print a bundle's manifest as a model card."""
    from bonewatch.models.bundle import BundleError, read_manifest
    from bonewatch.worker import reports

    try:
        manifest = read_manifest(bundle_dir)
    except BundleError as exc:
        _fail(str(exc))
    data = manifest.model_dump()
    if fmt is OutputFormat.json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    for renderable in reports.model_card(manifest):
        out.print(renderable)


@bundle_app.command("export-onnx")
def bundle_export_onnx(
    bundle_dir: Annotated[Path, typer.Argument(metavar="B", help="Bundle folder.")],
    opset: Annotated[int, typer.Option(min=13, help="ONNX opset.")] = 17,
) -> None:
    """Add ONNX models to a bundle (for BONEWATCH_ENGINE=onnx) and record them in its manifest.

    Each export is checked against its Keras model on phantoms and refused if any output
    differs by more than 1e-4.
    """
    from bonewatch.models.bundle import BundleError
    from bonewatch.models.onnx_export import export_onnx

    try:
        _, exported = export_onnx(bundle_dir, opset=opset, report=lambda m: err.print(m))
    except BundleError as exc:
        _fail(str(exc), code=1)
    for item in exported:
        out.print(f"{item.role}: {item.file} (max |keras - onnx| {item.max_abs_diff:.1e})")
    out.print(f"{len(exported)} ONNX model(s) recorded in {bundle_dir / 'manifest.json'}")


class EngineChoice(StrEnum):
    auto = "auto"
    keras = "keras"
    onnx = "onnx"


@app.command()
def bench(
    images: Annotated[int, typer.Option(min=1, help="Phantom images to process.")] = 200,
    backbone: Annotated[str, typer.Option(help="small_cnn, densenet121, ...")] = "densenet121",
    input_size: Annotated[int, typer.Option(min=8, help="Model input side in pixels.")] = 224,
    engine: Annotated[
        EngineChoice | None, typer.Option(help="Engine of the worker runs (BONEWATCH_ENGINE).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Images per batch.")] = None,
    inference_streams: Annotated[
        int | None,
        typer.Option(
            min=0, help="Batches in inference at once (BONEWATCH_INFERENCE_STREAMS; 0 = auto)."
        ),
    ] = None,
    forward_batch: Annotated[
        int | None,
        typer.Option(
            min=0, help="Most images per forward pass (BONEWATCH_FORWARD_BATCH; 0 = the engine's)."
        ),
    ] = None,
    seed_style_images: Annotated[
        int, typer.Option(min=1, help="Images served one at a time with model.predict.")
    ] = 32,
    register_files: Annotated[
        int, typer.Option(min=1, help="Small files registered to measure registration.")
    ] = 2000,
    distributed_workers: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Worker processes for the distributed figure (default: as many as `bonewatch "
            "worker` starts); 0 skips it.",
        ),
    ] = None,
    broker_url: Annotated[str, typer.Option(help="Redis for the distributed figure.")] = (
        "redis://127.0.0.1:6379/14"
    ),
    distributed_database_url: Annotated[
        str, typer.Option(help="PostgreSQL database for the distributed figure.")
    ] = "postgresql+psycopg://postgres@127.0.0.1:5432/bonewatch_bench",
    scale_workers: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated worker-process counts (1,2): the distributed figure for each, "
            "counts taking turns, --repeats times."
        ),
    ] = None,
    repeats: Annotated[
        int,
        typer.Option(min=1, help="Runs of each figure (engines in turn); medians are reported."),
    ] = 3,
    compare_engines: Annotated[
        bool,
        typer.Option(
            "--compare-engines/--one-engine",
            help="Run the embedded figure on every engine the bundle has, or on --engine only.",
        ),
    ] = True,
    rss_track: Annotated[
        bool,
        typer.Option(
            "--rss-track", help="Instead: one long run, resident memory against images done."
        ),
    ] = False,
    work_dir: Annotated[
        Path | None, typer.Option(help="Keep the bundle, images and ledgers here.")
    ] = None,
    fmt: Annotated[OutputFormat, typer.Option("--format", help="table or json.")] = (
        OutputFormat.table
    ),
) -> None:
    """Measure throughput: the engine's limit, seed-style serving, embedded and distributed.

    Builds a randomly initialised two-stage bundle with BACKBONE, writes phantom PNGs and runs
    them through each path on this machine.
    """
    from bonewatch.worker.bench import BenchConfig, BenchError, run_bench, run_rss_track

    config = BenchConfig.from_settings(
        _settings(
            engine=engine.value if engine else None,
            batch_size=batch_size,
            inference_streams=inference_streams,
            forward_batch=forward_batch,
        ),
        images=images,
        backbone=backbone,
        input_size=input_size,
        seed_style_images=seed_style_images,
        register_files=register_files,
        distributed_workers=distributed_workers,
        broker_url=broker_url,
        distributed_database_url=distributed_database_url,
        repeats=repeats,
        compare_engines=compare_engines,
        scale_workers=_worker_counts(scale_workers) if scale_workers else None,
    )
    try:
        if rss_track:
            report = run_rss_track(config, work_dir=work_dir, report=lambda m: err.print(m))
        else:
            report = run_bench(config, work_dir=work_dir, report=lambda m: err.print(m))
    except (BenchError, ValueError) as exc:
        _fail(str(exc), code=1)
    if fmt is OutputFormat.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    table = Table("figure", "value")
    for key, value in report.items():
        if key != "samples":
            table.add_row(
                key, json.dumps(value) if isinstance(value, dict | list) else _cell(value)
            )
    out.print(table)


def _worker_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise typer.BadParameter(
            f"{text!r} is not a list of worker counts such as 1,2", param_hint="--scale-workers"
        )
    return tuple(dict.fromkeys(counts))


def run() -> None:
    app()
