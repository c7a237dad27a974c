"""Terminal renderings for the CLI: evaluation reports, cross-validation and the model card."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from bonewatch.models.bundle import Manifest

HEADLINE = {
    "body_part_accuracy": "body-part accuracy",
    "fracture_auroc_image": "AUROC, image",
    "fracture_auroc_study": "AUROC, study",
    "kappa_study": "Cohen's kappa, study",
    "sensitivity_study": "sensitivity, study",
    "specificity_study": "specificity, study",
}
PART_COLUMNS = {
    "auroc_study": "AUROC study",
    "auroc_image": "AUROC image",
    "kappa_study": "kappa study",
    "sensitivity_study": "sensitivity",
    "specificity_study": "specificity",
}


def value(x: Any) -> str:
    return "–" if x is None else f"{x:.3f}"


def interval(ci: Any) -> str:
    return "" if not ci else f"{ci[0]:.3f}–{ci[1]:.3f}"


def with_ci(x: Any, ci: Any) -> str:
    return value(x) if not ci else f"{value(x)} ({interval(ci)})"


def headline_table(report: Mapping[str, Any]) -> Table:
    """Each headline metric with its 95 % bootstrap interval."""
    ci = report.get("ci95") or {}
    table = Table("metric", "value", "95 % CI")
    for key, label in HEADLINE.items():
        table.add_row(label, value(report.get(key)), interval(ci.get(key)))
    return table


def per_part_table(
    report: Mapping[str, Any], thresholds: Mapping[str, float] | None = None
) -> Table:
    """Per-part metrics, each with its interval in brackets."""
    thresholds = thresholds if thresholds is not None else report.get("thresholds", {})
    table = Table("part", "studies", "images", "threshold", *PART_COLUMNS.values())
    for part, block in report.get("per_part", {}).items():
        ci = block.get("ci95") or {}
        table.add_row(
            part,
            str(block.get("n_studies", "")),
            str(block.get("n_images", "")),
            value(thresholds.get(part)),
            *[with_ci(block.get(k), ci.get(k)) for k in PART_COLUMNS],
        )
    return table


def evaluation(report: Mapping[str, Any]) -> list[RenderableType]:
    """An evaluation report: counts, headline metrics, per-part table, confidence method."""
    parts: list[RenderableType] = [
        Text(
            f"{report.get('bundle')} {report.get('bundle_version')} on {report['n_images']} "
            f"images ({report.get('n_studies', 0)} studies scored; {report['n_rejected']} refused "
            f"by stage 1, {report['n_unreadable']} unreadable)"
        ),
        headline_table(report),
        per_part_table(report),
    ]
    boot = report.get("bootstrap")
    if boot:
        parts.append(
            Text(
                f"95 % CIs: percentile bootstrap, {boot['resamples']} resamples of the studies, "
                f"seed {boot['seed']}. Sensitivity/specificity/kappa at each part's manifest "
                "threshold.",
                style="dim",
            )
        )
    return parts


def cross_validation(cv: Mapping[str, Any]) -> list[RenderableType]:
    """Per-fold headline metrics, their mean and the interval over folds."""
    table = Table(
        "fold",
        "train images",
        "test images",
        *HEADLINE.values(),
        title=f"{cv['k']}-fold cross-validation by patient ({cv['bundle']} recipe)",
        title_justify="left",
    )
    for fold in cv["folds"]:
        table.add_row(
            str(fold["fold"]),
            str(fold["n_train_images"]),
            str(fold["n_images"]),
            *[value(fold.get(k)) for k in HEADLINE],
        )
    table.add_section()
    table.add_row("mean", "", "", *[value(cv["mean"].get(k)) for k in HEADLINE])
    table.add_row("95 % CI", "", "", *[interval(cv["ci95"].get(k)) for k in HEADLINE])
    return [
        table,
        Text(f"Interval over folds: {cv['ci_method']}.", style="dim"),
        Text("All folds' held-out predictions pooled:"),
        headline_table(cv["pooled"]),
        per_part_table(cv["pooled"], thresholds={}),
    ]


def localisation(loc: Mapping[str, Any]) -> Text:
    fraction = loc["fraction_peak_in_box"]
    shown = "–" if fraction is None else f"{100 * fraction:.1f} %"
    parts = ", ".join(
        f"{p.lower()} {v['n_hits']}/{v['n_images']}" for p, v in loc["per_part"].items()
    )
    return Text(
        f"Grad-CAM localisation: peak inside the fracture box (+{100 * loc['box_enlargement']:.0f} "
        f"%) on {loc['n_hits']} of {loc['n_images']} fractured images = {shown} "
        f"({loc['n_refused']} refused by stage 1). Per part: {parts}"
    )


def model_card(manifest: Manifest) -> list[RenderableType]:
    """A bundle's manifest as a model card."""
    extra = manifest.model_extra or {}
    trained = manifest.trained_on
    lines = Table.grid(padding=(0, 2))
    lines.add_column(style="bold")
    lines.add_column(overflow="fold")
    lines.add_row("bundle", f"{manifest.name} {manifest.version}")
    if extra.get("created"):
        lines.add_row("created", str(extra["created"]))
    lines.add_row("intended use", manifest.intended_use)
    if trained:
        split = trained.get("split") or {}
        lines.add_row(
            "training data",
            f"{trained.get('dataset') or '–'}: {trained.get('n_images')} images, "
            f"{trained.get('n_studies')} studies, {trained.get('n_patients')} patients",
        )
        lines.add_row("fingerprint", f"sha256 {trained.get('fingerprint')}")
        if split:
            lines.add_row(
                "split",
                f"{trained.get('split_rule', '')}: "
                + ", ".join(f"{k} {v}" for k, v in split.items())
                + " images",
            )
    if extra.get("command"):
        lines.add_row("command", str(extra["command"]))
    recipe = extra.get("training")
    if isinstance(recipe, Mapping):
        lines.add_row("recipe", ", ".join(f"{k} {v}" for k, v in recipe.items()))
    versions = extra.get("library_versions")
    if isinstance(versions, Mapping):
        lines.add_row("libraries", ", ".join(f"{k} {v}" for k, v in versions.items()))
    body = manifest.body_part
    spec = body.spec
    lines.add_row(
        "stage 1",
        f"{body.backbone} at {spec.input_size} px ({spec.channels} channel(s), "
        f"{spec.normalization}), labels {', '.join(body.labels)}, confidence floor "
        f"{body.confidence_floor}",
    )
    rules = sorted({entry.threshold_rule for entry in manifest.fracture.values()})
    lines.add_row("threshold rule", "; ".join(rules))
    out: list[RenderableType] = [lines]

    metrics = manifest.metrics
    per_part = metrics.get("per_part", {})
    table = Table("part", "backbone", "threshold", "studies", *PART_COLUMNS.values())
    for part, entry in manifest.fracture.items():
        block = per_part.get(part, {})
        ci = block.get("ci95") or {}
        table.add_row(
            part,
            entry.backbone,
            f"{entry.threshold:.3f}",
            str(block.get("n_studies", "–")),
            *[with_ci(block.get(k), ci.get(k)) for k in PART_COLUMNS],
        )
    if metrics:
        where = metrics.get("split", "held-out")
        out.append(Text(f"Metrics on {where}:", style="bold"))
        out.append(headline_table(metrics))
        if not metrics.get("ci95"):
            out.append(
                Text(
                    "These metrics come without confidence intervals: this bundle was "
                    "trained before `bonewatch train` recorded them. `bonewatch evaluate` "
                    "gives them on any labelled dataset.",
                    style="dim",
                )
            )
    else:
        out.append(Text("No held-out metrics recorded.", style="dim"))
    out.append(table)
    return out
