"""Phantom studies: ``synth``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bonewatch.worker.cli._common import SynthFormat, out, progress_bar


def synth(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="Folder to write into.")],
    studies: Annotated[int, typer.Option(min=1, help="Number of studies.")] = 20,
    fmt: Annotated[SynthFormat, typer.Option("--format", help="png, dicom or both.")] = (
        SynthFormat.png
    ),
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same files.")] = 0,
    split: Annotated[str, typer.Option(help="MURA split folder name.")] = "train",
) -> None:
    """Write synthetic phantom studies (MURA layout).

    PNG and/or DICOM."""
    from bonewatch.worker.synth import synthesize

    with progress_bar() as progress:
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
