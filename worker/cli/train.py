"""Training a bundle: ``train``."""

from __future__ import annotations

import dataclasses
import inspect
import shlex
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from bonewatch.models.recipe import TrainConfig
from bonewatch.worker.cli._common import (
    LabelsOpt,
    LayoutOpt,
    PartOpt,
    cell,
    err,
    fail,
    out,
    progress_bar,
)


def _recipe_option(f: dataclasses.Field[Any], annotation: Any) -> inspect.Parameter:
    """One ``train`` option for one :class:`TrainConfig` field, from the help in its metadata."""
    limits = {k: f.metadata[k] for k in ("min", "max") if k in f.metadata}
    default, kind = f.default, annotation
    if f.name == "fractions":  # a tuple is given as "0.7,0.15,0.15"
        default, kind = ",".join(str(x) for x in f.default), str  # type: ignore[union-attr]
    elif f.name == "weights":  # "none" is spelled out on the command line
        default, kind = "none", str
    option = typer.Option(help=f.metadata["help"], **limits)
    return inspect.Parameter(
        f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, option]
    )


def recipe_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give ``command`` one option per recipe field (those with help), in declaration order, in
    place of its ``**recipe`` parameter, so the recipe is declared once, in TrainConfig."""
    hints = typing.get_type_hints(TrainConfig)
    declared = typing.get_type_hints(command, include_extras=True)
    own = [
        p.replace(annotation=declared[p.name])
        for p in inspect.signature(command).parameters.values()
        if p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    fields = [f for f in dataclasses.fields(TrainConfig) if "help" in f.metadata]
    added = [_recipe_option(f, hints[f.name]) for f in fields]
    first_keyword = next(
        (i for i, p in enumerate(own) if p.default is not inspect.Parameter.empty), len(own)
    )
    params = [*own[:first_keyword], *added, *own[first_keyword:]]
    # Positional parameters become keyword-only after the recipe's; typer passes keywords.
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params]
    command.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


def recipe_from_options(options: dict[str, Any]) -> TrainConfig:
    """The recipe from ``train``'s options (validated by TrainConfig itself)."""
    values = dict(options)
    if "fractions" in values:
        values["fractions"] = tuple(float(x) for x in str(values["fractions"]).split(","))
    return TrainConfig(**values)


@recipe_options
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
    resume: Annotated[
        bool, typer.Option(help="Continue the interrupted run into --out where it stopped.")
    ] = False,
    intended_use: Annotated[
        str, typer.Option(help="Intended-use statement for the model card.")
    ] = "Research use: fracture triage on upper-limb radiographs. Not a diagnostic device.",
    **recipe: Any,
) -> None:
    """Train a two-stage bundle.

    Stage 1 picks the body part, then each part has its own fracture model."""
    from bonewatch.models.extras import require_train

    require_train("train")
    from bonewatch.models.architectures import WeightsError
    from bonewatch.models.datasets import DatasetError, detect_layout, load_dataset
    from bonewatch.models.train import TrainProgress, train_bundle

    try:
        found = detect_layout(dataset, labels) if layout == "auto" else layout
        samples = load_dataset(dataset, layout=found, labels=labels, part=part)
        config = recipe_from_options(recipe)
    except (DatasetError, ValueError) as exc:
        fail(str(exc))
    err.print(f"{len(samples)} images in the {found} layout under {dataset}")
    with progress_bar() as progress:
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
            fail(str(exc))
        except KeyboardInterrupt:
            fail("interrupted; run the same command with --resume to continue", code=130)
    metrics = result.manifest.get("metrics", {})
    out.print(
        f"bundle written to {result.bundle_dir}: held-out body-part accuracy "
        f"{cell(metrics.get('body_part_accuracy'))}, study AUROC "
        f"{cell(metrics.get('fracture_auroc_study'))}"
    )
