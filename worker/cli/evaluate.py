"""Evaluating a bundle: ``evaluate`` (and k-fold cross-validation)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from bonewatch.worker.cli._common import (
    BundleOpt,
    LabelsOpt,
    LayoutOpt,
    PartOpt,
    TableOrJson,
    err,
    fail,
    out,
    progress_bar,
    settings_from,
)


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
    fmt: Annotated[TableOrJson, typer.Option("--format", help="table or json.")] = (
        TableOrJson.table
    ),
) -> None:
    """Evaluate a bundle on a labelled dataset.

    MURA's metrics, with 95 % bootstrap confidence intervals."""
    from bonewatch.models.bundle import BundleError, load_bundle
    from bonewatch.models.datasets import DatasetError, load_dataset
    from bonewatch.models.evaluate import Bootstrap, evaluate_predictions
    from bonewatch.worker import reports

    if overrides and folds is None:
        fail("--set changes the training recipe; it only applies with --folds")
    if localisation and folds is not None:
        fail("--localisation measures the given bundle; run it without --folds")
    if localisation and not (dataset / "fractures.csv").is_file():
        fail(f"--localisation needs {dataset / 'fractures.csv'} (written by bonewatch synth)")
    try:
        samples = load_dataset(dataset, layout=layout, labels=labels, part=part)
    except DatasetError as exc:
        fail(str(exc))
    settings = settings_from(bundle=bundle)
    boot = Bootstrap(resamples=resamples, seed=0 if seed is None else seed) if resamples else None
    try:
        loaded = load_bundle(settings.bundle, digest=settings.bundle_sha256)
    except BundleError as exc:
        fail(str(exc), code=1)
    if folds is not None:
        _cross_validate(
            dataset, samples, loaded, folds, seed, overrides or [], boot, report_dir, fmt
        )
        return
    with progress_bar() as progress:
        task = progress.add_task("evaluating", total=len(samples))
        report, scored = evaluate_predictions(
            samples, loaded, bootstrap=boot, on_batch=lambda n: progress.advance(task, n)
        )
    if localisation:
        from bonewatch.models.gradcam import measure_localisation, read_fracture_boxes

        boxes = read_fracture_boxes(dataset)
        with progress_bar() as progress:
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
    if fmt is TableOrJson.json:
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
    fmt: TableOrJson,
) -> None:
    """``evaluate --folds K``: one bundle trained and evaluated per fold."""
    from bonewatch.models.extras import require_train

    require_train("evaluate --folds")
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
        fail(str(exc))
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
    if fmt is TableOrJson.json:
        sys.stdout.write(json.dumps(cv.report, indent=2) + "\n")
        return
    for renderable in reports.cross_validation(cv.report):
        out.print(renderable)
