"""Reviewers' verdicts: ``reviews export`` (a labels CSV for ``train --labels``) and
``reviews stats`` (the model against its reviewers)."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from bonewatch.worker.cli._common import TableOrJson, err, fail, out, settings_from

# The columns `bonewatch train --labels` reads (models/datasets.py: the labels layout).
EXPORT_COLUMNS = ("study_uid", "label", "part")

BundleName = Annotated[
    str | None, typer.Option("--bundle", help="Only reviews of this bundle's results (by name).")
]
BundleVersion = Annotated[
    str | None, typer.Option("--version", help="Only reviews of this bundle version's results.")
]


def _reviewed(bundle: str | None, version: str | None):  # type: ignore[no-untyped-def]
    from bonewatch.db.reviews import latest_reviews
    from bonewatch.worker.runner import read_ledger

    return latest_reviews(read_ledger(settings_from()), bundle_name=bundle, bundle_version=version)


def export_labels(rows: list, out_path: Path) -> None:  # type: ignore[type-arg]
    """Write ``study_uid,label,part`` rows, one per reviewed study, atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(EXPORT_COLUMNS)
    for row in rows:
        writer.writerow([row.study_uid, row.label, row.part or ""])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", dir=out_path.parent)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            fh.write(buffer.getvalue())
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export(
    out_path: Annotated[Path, typer.Option("--out", help="The labels CSV to write.")],
    bundle: BundleName = None,
    version: BundleVersion = None,
) -> None:
    """Write the reviewers' labels as a training CSV.

    The CSV is what `bonewatch train --labels` reads.

    One row per reviewed study (its latest review): study_uid, label (positive or negative) and
    part (the reviewer's correction, else the model's)."""
    rows = _reviewed(bundle, version)
    if not rows:
        fail("no reviews in the ledger yet", 1)
    export_labels(rows, out_path)
    err.print(f"{len(rows)} reviewed studies written to {out_path}")


def stats(
    fmt: Annotated[TableOrJson, typer.Option("--format", help="table or json.")] = (
        TableOrJson.table
    ),
    bundle: BundleName = None,
    version: BundleVersion = None,
    resamples: Annotated[int, typer.Option(min=0, max=100_000, help="Bootstrap resamples.")] = 1000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
) -> None:
    """Measure the model against its reviewers, per part and overall.

    Agreement, sensitivity, specificity, Cohen's kappa and AUROC of the study results, with the
    reviewers' labels as the truth, each with a bootstrap interval."""
    from bonewatch.models.evaluate import Bootstrap
    from bonewatch.web.stats import METRICS, OVERALL, review_stats

    report = review_stats(_reviewed(bundle, version), Bootstrap(resamples=resamples, seed=seed))
    report = {"bundle": bundle, "bundle_version": version, **report}
    if fmt is TableOrJson.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    table = Table(title=f"{report['n_compared']} reviewed studies")
    for column in ("part", "studies", "positive", *METRICS):
        table.add_column(column, justify="left" if column == "part" else "right")
    blocks = [(OVERALL, report[OVERALL]), *sorted(report["per_part"].items())]
    for name, block in blocks:
        cells = []
        for metric in METRICS:
            m = block[metric]
            ci = f" [{m['ci'][0]:.2f}, {m['ci'][1]:.2f}]" if m["ci"] else ""
            cells.append("—" if m["value"] is None else f"{m['value']:.3f}{ci}")
        table.add_row(name.lower(), str(block["n_studies"]), str(block["n_positive"]), *cells)
    out.print(table)
