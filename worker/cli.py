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

from worker.settings import Settings

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


@app.command()
def process(
    paths: Annotated[list[Path], typer.Argument(help="Files and folders to process.")],
    bundle: BundleOpt = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per batch.")] = None,
) -> None:
    """Register every file under PATHS, process them all, print a summary.

    Bad files end as `failed`/`unsupported` rows with a reason; the exit code is non-zero only
    when the system itself fails (database, bundle).
    """
    from db import count_by_status
    from worker.runner import open_ledger, process_paths

    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        _fail(f"no such file or folder: {', '.join(missing)}")
    settings = _settings(bundle=bundle, batch_size=batch_size)
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


@app.command()
def watch(
    inbox: Annotated[Path, typer.Argument(help="Folder to follow.")],
    poll: Annotated[bool | None, typer.Option("--poll", help="Poll (network shares).")] = None,
    settle: Annotated[
        float | None, typer.Option(help="Seconds a file must stay unchanged.")
    ] = None,
    bundle: BundleOpt = None,
) -> None:
    """Follow INBOX until Ctrl-C: files already there first, then new ones as they complete."""
    from worker.runner import watch_inbox

    if not inbox.is_dir():
        _fail(f"inbox {inbox} is not a folder")
    settings = _settings(poll=poll, settle_seconds=settle, bundle=bundle)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        watch_inbox(inbox, settings, stop=stop, on_event=lambda m: err.print(m))
    except KeyboardInterrupt:
        err.print("stopped")


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
    if column == "path" and isinstance(value, str):
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
    from db import query_results, query_studies
    from worker.runner import open_ledger

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
    _render(rows, columns, fmt)


@app.command("status")
def status_cmd(
    fmt: Annotated[OutputFormat, typer.Option("--format", help="table or json.")] = (
        OutputFormat.table
    ),
) -> None:
    """Count images by status."""
    from db import count_by_status
    from worker.runner import open_ledger

    counts = count_by_status(open_ledger(_settings()))
    if fmt is OutputFormat.json:
        sys.stdout.write(json.dumps(counts) + "\n")
        return
    table = Table("status", "images")
    for key, value in counts.items():
        table.add_row(key, str(value))
    out.print(table)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the ledger schema to the latest revision."""
    from db import current_revision, upgrade

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
    from worker.synth import synthesize

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
    dataset: Annotated[Path, typer.Argument(help="MURA-layout dataset folder.")],
    bundle_out: Annotated[Path, typer.Option("--out", help="Bundle folder to write.")],
    name: Annotated[str, typer.Option(help="Bundle name.")] = "bundle",
    version: Annotated[str | None, typer.Option(help="Bundle version.")] = None,
    backbone: Annotated[str, typer.Option(help="small_cnn, densenet121, ...")] = "small_cnn",
    input_size: Annotated[int, typer.Option(help="Model input side in pixels.")] = 128,
    epochs: Annotated[int, typer.Option(help="Stage-1 epochs.")] = 15,
    fracture_epochs: Annotated[
        int, typer.Option(help="Epochs of the fracture model shared by all parts.")
    ] = 40,
    part_epochs: Annotated[
        int, typer.Option(help="Fine-tuning epochs of each part's fracture model.")
    ] = 10,
    seed: Annotated[int, typer.Option(help="Seed for splits and weights.")] = 0,
    confidence_floor: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Stage-1 probability below which = unsupported.")
    ] = 0.7,
    intended_use: Annotated[
        str, typer.Option(help="Intended-use statement for the model card.")
    ] = "Research use: fracture triage on upper-limb radiographs. Not a diagnostic device.",
) -> None:
    """Train a two-stage bundle (body part, then a fracture model per part)."""
    from models.datasets import DatasetError, load_dataset
    from models.train import TrainConfig, train_bundle

    try:
        samples = load_dataset(dataset)
    except DatasetError as exc:
        _fail(str(exc))
    config = TrainConfig(
        backbone=backbone,
        input_size=input_size,
        epochs=epochs,
        fracture_epochs=fracture_epochs,
        part_epochs=part_epochs,
        seed=seed,
        confidence_floor=confidence_floor,
    )
    result = train_bundle(
        samples,
        bundle_out,
        config=config,
        name=name,
        version=version,
        intended_use=intended_use,
        dataset=str(dataset),
        command="bonewatch " + shlex.join(sys.argv[1:]),
        report=lambda m: err.print(m),
    )
    metrics = result.manifest.get("metrics", {})
    out.print(
        f"bundle written to {result.bundle_dir}: held-out body-part accuracy "
        f"{_cell(metrics.get('body_part_accuracy'))}, study AUROC "
        f"{_cell(metrics.get('fracture_auroc_study'))}"
    )


@app.command()
def evaluate(
    dataset: Annotated[Path, typer.Argument(help="MURA-layout dataset folder.")],
    bundle: BundleOpt = None,
    fmt: Annotated[OutputFormat, typer.Option("--format", help="table or json.")] = (
        OutputFormat.table
    ),
) -> None:
    """Evaluate a bundle on a labelled dataset (MURA metrics: study AUROC, kappa)."""
    from models.bundle import load_bundle
    from models.datasets import DatasetError, load_dataset
    from models.evaluate import evaluate_bundle

    try:
        samples = load_dataset(dataset)
    except DatasetError as exc:
        _fail(str(exc))
    loaded = load_bundle(_settings(bundle=bundle).bundle)
    with _progress() as progress:
        task = progress.add_task("evaluating", total=len(samples))
        report = evaluate_bundle(samples, loaded, on_batch=lambda n: progress.advance(task, n))
    if fmt is OutputFormat.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    out.print(
        f"{loaded.name} {loaded.version} on {report['n_images']} images: body-part accuracy "
        f"{_cell(report['body_part_accuracy'])}, image AUROC "
        f"{_cell(report['fracture_auroc_image'])}, study AUROC "
        f"{_cell(report['fracture_auroc_study'])}, study kappa {_cell(report['kappa_study'])}"
    )
    table = Table("part", "studies", "AUROC (study)", "kappa (study)", "sensitivity", "specificity")
    for part, block in report["per_part"].items():
        table.add_row(
            part,
            str(block["n_studies"]),
            _cell(block["auroc_study"]),
            _cell(block["kappa_study"]),
            _cell(block["sensitivity_study"]),
            _cell(block["specificity_study"]),
        )
    out.print(table)


@bundle_app.command("show")
def bundle_show(
    bundle_dir: Annotated[Path, typer.Argument(metavar="B", help="Bundle folder.")],
    fmt: Annotated[OutputFormat, typer.Option("--format", help="table or json.")] = (
        OutputFormat.table
    ),
) -> None:
    """Print a bundle's manifest as a model card."""
    from models.bundle import BundleError, read_manifest

    try:
        manifest = read_manifest(bundle_dir)
    except BundleError as exc:
        _fail(str(exc))
    data = manifest.model_dump()
    if fmt is OutputFormat.json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    out.print(f"[bold]{manifest.name}[/] {manifest.version}")
    out.print(f"intended use: {manifest.intended_use}")
    trained = manifest.trained_on
    out.print(
        f"trained on: {trained.get('dataset')} ({trained.get('n_images')} images, "
        f"{trained.get('n_patients')} patients, fingerprint {str(trained.get('fingerprint'))[:12]})"
    )
    body = manifest.body_part
    out.print(
        f"stage 1: {body.backbone} at {body.spec.input_size}px, labels {', '.join(body.labels)}, "
        f"confidence floor {body.confidence_floor}"
    )
    table = Table("part", "backbone", "threshold", "AUROC (study, held-out)")
    per_part = manifest.metrics.get("per_part", {})
    for part, entry in manifest.fracture.items():
        table.add_row(
            part,
            entry.backbone,
            f"{entry.threshold:.3f}",
            _cell(per_part.get(part, {}).get("auroc_study")),
        )
    out.print(table)
    m = manifest.metrics
    if m:
        out.print(
            f"held-out: body-part accuracy {_cell(m.get('body_part_accuracy'))}, study AUROC "
            f"{_cell(m.get('fracture_auroc_study'))}, study kappa {_cell(m.get('kappa_study'))}"
        )


def run() -> None:
    app()
