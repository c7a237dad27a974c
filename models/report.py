"""The evaluation report: one HTML page with PNG plots, written into a folder the user names.

Plots (matplotlib figures on the Agg canvas, no pyplot state):

- ``roc.png``: study- and image-level ROC curves, all parts together and per part, with the
  operating point at the manifest threshold.
- ``confusion.png``: the body-part confusion matrix.
- ``training.png``: loss and the monitored metric per epoch for every trained model, when
  training curves are known (from cross-validation, or a manifest that records them).
- ``errors.png``: the most confident false positives and false negatives as thumbnails, with
  the fracture model's Grad-CAM over them when the bundle is at hand.
"""

from __future__ import annotations

import datetime as dt
import html
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

from bonewatch.ingest import MURA_PARTS, IngestError, read_image
from bonewatch.models.bundle import Bundle, Manifest
from bonewatch.models.evaluate import (
    HEADLINE_METRICS,
    PART_METRICS,
    Scored,
    StudyScore,
    study_scores,
)

log = logging.getLogger(__name__)

History = Mapping[str, Mapping[str, Sequence[float]]]  # model -> keras metric -> per-epoch values

_LABELS = {
    "body_part_accuracy": "body-part accuracy",
    "fracture_auroc_image": "AUROC (image)",
    "fracture_auroc_study": "AUROC (study)",
    "kappa_study": "Cohen's kappa (study)",
    "sensitivity_study": "sensitivity (study)",
    "specificity_study": "specificity (study)",
    "auroc_image": "AUROC (image)",
    "auroc_study": "AUROC (study)",
}


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}"


def _with_ci(value: Any, ci: Any) -> str:
    if ci is None:
        return _fmt(value)
    return f"{_fmt(value)} ({ci[0]:.3f}–{ci[1]:.3f})"


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def plot_roc(scored: Sequence[Scored], metrics: Mapping[str, Any], path: Path) -> None:
    """ROC curves (study solid, image dashed) for all parts together and for each part."""
    served = [s for s in scored if s.prediction is not None and s.prediction.p_fracture is not None]
    studies = study_scores(scored)
    groups = ["all parts", *[p for p in MURA_PARTS if p in metrics.get("per_part", {})]]
    cols = 4
    rows = (len(groups) + cols - 1) // cols
    fig = _figure(4 * cols, 3.9 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, group in zip(axes, groups, strict=False):
        block: Mapping[str, Any]
        if group == "all parts":
            img = served
            st = studies
            block = {
                "auroc_study": metrics.get("fracture_auroc_study"),
                "auroc_image": metrics.get("fracture_auroc_image"),
                "ci95": {
                    "auroc_study": (metrics.get("ci95") or {}).get("fracture_auroc_study"),
                    "auroc_image": (metrics.get("ci95") or {}).get("fracture_auroc_image"),
                },
                "sensitivity_study": metrics.get("sensitivity_study"),
                "specificity_study": metrics.get("specificity_study"),
            }
        else:
            img = [s for s in served if s.sample.part == group]
            st = [s for s in studies if s.part == group]
            block = metrics["per_part"][group]
        ci = block.get("ci95") or {}
        ax.plot([0, 1], [0, 1], color="0.75", lw=1)
        y_st = [s.label for s in st]
        if len(set(y_st)) == 2:
            fpr, tpr, _ = roc_curve(y_st, [s.score for s in st])
            label = f"study {_with_ci(block.get('auroc_study'), ci.get('auroc_study'))}"
            ax.plot(fpr, tpr, color="tab:blue", lw=2, label=label)
        y_img = [s.sample.label for s in img]
        if len(set(y_img)) == 2:
            p_img = [s.prediction.p_fracture for s in img]  # type: ignore[union-attr]
            fpr, tpr, _ = roc_curve(y_img, p_img)
            label = f"image {_with_ci(block.get('auroc_image'), ci.get('auroc_image'))}"
            ax.plot(fpr, tpr, color="tab:orange", lw=1.5, ls="--", label=label)
        sens, spec = block.get("sensitivity_study"), block.get("specificity_study")
        if sens is not None and spec is not None:
            ax.plot([1 - spec], [sens], "o", color="tab:red", ms=7, label="at manifest threshold")
        ax.set_title(f"{group} ({len(st)} studies)", fontsize=11)
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.set_aspect("equal")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize=8, title="AUROC (95 % CI)", title_fontsize=8)
        else:
            ax.text(0.5, 0.5, "one class only: no ROC", ha="center", va="center")
    for ax in axes[len(groups) :]:
        ax.set_visible(False)
    fig.suptitle("ROC curves: study score = mean image probability", fontsize=13)
    fig.savefig(path)


def plot_confusion(metrics: Mapping[str, Any], path: Path) -> None:
    """The body-part confusion matrix: counts, shaded by the share of each true part's images."""
    labels = list(metrics["body_part_labels"])
    matrix = np.asarray(metrics["body_part_confusion"], dtype=float).reshape(len(labels), -1)
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    fig = _figure(7.5, 6.5)
    ax = fig.subplots()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if matrix[i, j]:
                colour = "white" if share[i, j] > 0.6 else "black"
                ax.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center", color=colour)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted by stage 1")
    ax.set_ylabel("true region")
    accuracy = metrics.get("body_part_accuracy")
    ax.set_title(f"Body part: accuracy {_fmt(accuracy)} over {int(matrix.sum())} images")
    fig.colorbar(im, ax=ax, shrink=0.8, label="share of the true region's images")
    fig.savefig(path)


def plot_training(histories: Mapping[str, History], path: Path) -> None:
    """Loss per epoch (training solid, validation dashed) and the monitored validation metric
    (dotted, right axis) for every model; one colour per run (bundle or fold)."""
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    stages: list[str] = []
    for history in histories.values():
        stages.extend(s for s in history if s not in stages)
    cols = 3
    rows = (len(stages) + cols - 1) // cols
    fig = _figure(5 * cols, 3.4 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colours = colormaps["tab10"]
    for ax, stage in zip(axes, stages, strict=False):
        right = ax.twinx()
        for k, (run, history) in enumerate(histories.items()):
            curves = history.get(stage)
            if not curves:
                continue
            colour = colours(k % 10)
            epochs = np.arange(1, len(curves.get("loss", [])) + 1)
            if "loss" in curves:
                ax.plot(epochs, curves["loss"], color=colour, lw=1.5, marker=".", label=run)
            if "val_loss" in curves:
                x = np.arange(1, len(curves["val_loss"]) + 1)
                ax.plot(x, curves["val_loss"], color=colour, lw=1.5, ls="--", marker=".")
            for metric in ("val_auc", "val_accuracy"):
                if metric in curves:
                    x = np.arange(1, len(curves[metric]) + 1)
                    right.plot(x, curves[metric], color=colour, lw=1, ls=":", marker=".")
                    right.set_ylabel(metric.removeprefix("val_") + " (validation, dotted)")
                    break
        right.set_ylim(0, 1.02)
        ax.set_title(stage.replace("_", " "), fontsize=11)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("loss (train solid, val dashed)")
    for ax in axes[len(stages) :]:
        ax.set_visible(False)
    if len(histories) > 1:
        handles, names = axes[0].get_legend_handles_labels()
        fig.legend(
            handles,
            names,
            loc="outside lower center",
            ncols=min(len(names), 10),
        )
    fig.suptitle("Training curves", fontsize=13)
    fig.savefig(path)


@dataclass(frozen=True)
class StudyError:
    """A study on the wrong side of its threshold, shown by its highest-scored image."""

    study: StudyScore
    image: Scored


def confident_errors(scored: Sequence[Scored], n: int) -> tuple[list[StudyError], list[StudyError]]:
    """The ``n`` negative studies scored furthest above their threshold (false positives) and the
    ``n`` positive studies scored furthest below it (false negatives).

    Labels are per study, as in MURA, so errors are counted per study; each is shown by the image
    the fracture model scored highest, the one that raised the alarm or came nearest to it.
    """
    best: dict[str, Scored] = {}
    for item in scored:
        p = item.prediction.p_fracture if item.prediction is not None else None
        if p is None:
            continue
        held = best.get(item.sample.study)
        if held is None or p > (held.prediction.p_fracture or 0.0):  # type: ignore[union-attr]
            best[item.sample.study] = item
    studies = study_scores(scored)
    fp = [s for s in studies if s.label == 0 and s.score >= s.threshold]
    fn = [s for s in studies if s.label == 1 and s.score < s.threshold]
    fp.sort(key=lambda s: s.threshold - s.score)
    fn.sort(key=lambda s: s.score - s.threshold)
    return (
        [StudyError(s, best[s.study]) for s in fp[:n]],
        [StudyError(s, best[s.study]) for s in fn[:n]],
    )


def _thumbnail(item: Scored, bundle: Bundle | None, salt: str) -> np.ndarray | None:
    from bonewatch.models.gradcam import PICTURE_MIN_SIDE, explain_images, overlay_heatmap

    try:
        image = read_image(item.sample.path, salt=salt, min_side=PICTURE_MIN_SIDE)
    except (IngestError, OSError) as exc:
        log.warning("no thumbnail for %s: %s", item.sample.path, exc)
        return None
    if bundle is None or item.prediction is None:
        return image.pixels
    part = item.prediction.body_part
    explanation = explain_images([image.pixels], [part], bundle, grids=[image.grid])[0]
    return overlay_heatmap(image.pixels, explanation.heatmap)


def plot_errors(
    fp: Sequence[StudyError],
    fn: Sequence[StudyError],
    path: Path,
    *,
    bundle: Bundle | None,
    salt: str,
) -> None:
    """A grid of thumbnails: false positives on the top row, false negatives below."""
    cols = max(len(fp), len(fn), 1)
    fig = _figure(2.4 * cols, 6.0)
    axes = fig.subplots(2, cols, squeeze=False)
    for row, (items, kind) in enumerate(((fp, "false positive"), (fn, "false negative"))):
        for col in range(cols):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(items):
                ax.axis("off")
                if col == 0:
                    ax.text(0.5, 0.5, f"no {kind}s", ha="center", va="center")
                continue
            error = items[col]
            image = _thumbnail(error.image, bundle, salt)
            if image is not None:
                ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1)
            p_image = error.image.prediction.p_fracture  # type: ignore[union-attr]
            folder = error.study.study.rsplit("/", 2)[-2:]
            ax.set_title(
                f"{error.study.part}: study {error.study.score:.2f} (t {error.study.threshold:.2f})"
                f"\nimage {p_image:.2f}  {folder[0]}\n{folder[-1]}/{error.image.sample.path.name}",
                fontsize=7,
            )
        axes[row, 0].set_ylabel(f"{kind}s", fontsize=10)
    note = "; Grad-CAM of the fracture model over each image" if bundle is not None else ""
    fig.suptitle(
        f"Most confident study errors at the manifest thresholds (highest-scored image{note})",
        fontsize=11,
    )
    fig.savefig(path)


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------


def manifest_history(manifest: Manifest | None) -> History | None:
    """Training curves recorded in a manifest (``history``: model -> metric -> values), if any."""
    if manifest is None or not manifest.model_extra:
        return None
    history = manifest.model_extra.get("history")
    if not isinstance(history, Mapping):
        return None
    # Keep only per-epoch number lists; anything else a manifest may hold there is not a curve.
    curves = {
        str(stage): {
            str(name): [float(v) for v in values]
            for name, values in metrics.items()
            if isinstance(values, list) and all(isinstance(v, int | float) for v in values)
        }
        for stage, metrics in history.items()
        if isinstance(metrics, Mapping)
    }
    curves = {stage: metrics for stage, metrics in curves.items() if metrics}
    return curves or None


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _metrics_section(metrics: Mapping[str, Any]) -> str:
    ci = metrics.get("ci95") or {}
    rows = [[_LABELS[k], _with_ci(metrics.get(k), ci.get(k))] for k in HEADLINE_METRICS]
    parts = metrics.get("per_part", {})
    thresholds = metrics.get("thresholds", {})
    part_rows = []
    for part, block in parts.items():
        pci = block.get("ci95") or {}
        part_rows.append(
            [
                part,
                str(block["n_studies"]),
                str(block["n_images"]),
                _fmt(thresholds.get(part)),
                *[_with_ci(block.get(k), pci.get(k)) for k in PART_METRICS],
            ]
        )
    boot = metrics.get("bootstrap")
    note = (
        f"<p class=note>95 % confidence intervals: percentile bootstrap over "
        f"{boot['resamples']} resamples of the studies (seed {boot['seed']}).</p>"
        if boot
        else ""
    )
    counts = (
        f"<p>{metrics['n_images']} images, {metrics.get('n_studies', 0)} studies scored by a "
        f"fracture model; {metrics['n_rejected']} refused by stage 1, "
        f"{metrics['n_unreadable']} unreadable.</p>"
    )
    header = ["part", "studies", "images", "threshold", *[_LABELS.get(k, k) for k in PART_METRICS]]
    return (
        counts
        + _table(["metric", "value (95 % CI)"], rows)
        + note
        + "<h3>Per part</h3>"
        + _table([h.replace("_", " ") for h in header], part_rows)
    )


def _folds_section(cv: Mapping[str, Any]) -> str:
    rows = [
        [str(f["fold"]), str(f["n_train_images"]), str(f["n_images"])]
        + [_fmt(f.get(k)) for k in HEADLINE_METRICS]
        for f in cv["folds"]
    ]
    rows.append(["mean", "", ""] + [_fmt(cv["mean"].get(k)) for k in HEADLINE_METRICS])
    rows.append(
        ["95 % CI", "", ""]
        + [
            "–" if cv["ci95"].get(k) is None else f"{cv['ci95'][k][0]:.3f}–{cv['ci95'][k][1]:.3f}"
            for k in HEADLINE_METRICS
        ]
    )
    header = ["fold", "train images", "test images", *[_LABELS[k] for k in HEADLINE_METRICS]]
    recipe = html.escape(f"{cv['bundle']} {cv['bundle_version']}")
    return (
        f"<h2>{cv['k']}-fold cross-validation by patient</h2>"
        + _table(header, rows)
        + f"<p class=note>Interval over folds: {html.escape(cv['ci_method'])}. Each fold trained "
        f"a bundle with the recipe of {recipe} "
        "on the other folds. The sections below pool every fold's held-out predictions.</p>"
    )


_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1400px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead { background: #eef; }
img { max-width: 100%; border: 1px solid #ddd; }
.note { color: #555; font-size: 0.9em; }
"""


def write_report(
    out_dir: str | Path,
    metrics: Mapping[str, Any],
    scored: Sequence[Scored],
    *,
    title: str,
    manifest: Manifest | None = None,
    histories: Mapping[str, History] | None = None,
    cross_validation: Mapping[str, Any] | None = None,
    bundle: Bundle | None = None,
    salt: str = "evaluation",
    n_errors: int = 8,
) -> Path:
    """Write ``index.html`` and its PNG plots into ``out_dir``.

    Args:
        metrics: A :func:`models.evaluate.compute_metrics` report of ``scored``.
        scored: The predictions behind it (pooled over folds for cross-validation).
        manifest: The evaluated bundle's manifest: threshold rule and training curves.
        histories: Training curves by run name (a fold's, say); else the manifest's, if any.
        cross_validation: The cross-validation summary, for its per-fold table.
        bundle: When given, error thumbnails carry the fracture model's Grad-CAM.

    Returns:
        The path of ``index.html``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections = [f"<h1>{html.escape(title)}</h1>"]
    sections.append(
        f"<p class=note>Written {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}.</p>"
    )
    if cross_validation is not None:
        sections.append(_folds_section(cross_validation))
    sections.append("<h2>Metrics</h2>" + _metrics_section(metrics))
    if manifest is not None:
        rules = {e.threshold_rule for e in manifest.fracture.values()}
        sections.append(
            "<p class=note>Sensitivity, specificity and kappa use each part's threshold from the "
            f"manifest, chosen on validation patients: {html.escape('; '.join(sorted(rules)))}.</p>"
        )

    plot_roc(scored, metrics, out / "roc.png")
    sections.append('<h2>ROC curves</h2><img src="roc.png" alt="ROC curves per part">')

    plot_confusion(metrics, out / "confusion.png")
    sections.append(
        '<h2>Body-part confusion matrix</h2><img src="confusion.png" alt="confusion matrix">'
    )

    curves: Mapping[str, History] | None = histories
    source = "the cross-validation folds"
    if not curves:
        recorded = manifest_history(manifest)
        curves = {manifest.name: recorded} if recorded and manifest else None
        source = "the manifest"
    sections.append("<h2>Training curves</h2>")
    if curves:
        plot_training(curves, out / "training.png")
        sections.append(
            f'<p class=note>From {source}.</p><img src="training.png" alt="training curves">'
        )
    else:
        sections.append(
            "<p>The bundle's manifest records no training curves, so none are shown: it was "
            "trained before <code>bonewatch train</code> kept them. Bundles it trains now carry "
            "them, and cross-validation (<code>--folds K</code>) plots the curves of the "
            "bundles it trains.</p>"
        )

    fp, fn = confident_errors(scored, n_errors)
    plot_errors(fp, fn, out / "errors.png", bundle=bundle, salt=salt)
    listing = [
        [
            kind,
            e.study.study,
            _fmt(e.study.score),
            _fmt(e.study.threshold),
            str(e.image.sample.path),
        ]
        for kind, items in (("false positive", fp), ("false negative", fn))
        for e in items
    ]
    sections.append(
        "<h2>Most confident errors</h2>"
        '<img src="errors.png" alt="most confident false positives and negatives">'
        + _table(["error", "study", "study score", "threshold", "image shown"], listing)
    )
    page = (
        "<!doctype html><html><head><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        + "\n".join(sections)
        + "</body></html>\n"
    )
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
