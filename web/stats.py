"""The model against its reviewers: agreement, sensitivity, specificity, Cohen's kappa and
AUROC of the reviewed studies' results, with the reviewers' labels as the truth, overall and per
part, each with a bootstrap interval; and the ROC plot.

Each reviewed study counts once, with its latest review, against the result that review judged
(its label and score when the verdict was given). Intervals follow :mod:`models.evaluate`:
studies resampled with replacement, seeded, percentile intervals. Its numpy metric functions
(:func:`binary_kappa`, :func:`rank_auroc`) are reused here; nothing here runs a model.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from bonewatch.db.reviews import PARTS, ReviewedStudy
from bonewatch.models.evaluate import Bootstrap, binary_kappa, rank_auroc

METRICS = ("agreement", "sensitivity", "specificity", "kappa", "auroc")
# A part gets its own ROC curve from this many reviewed studies on; fewer draw only noise.
MIN_CURVE_STUDIES = 10
OVERALL = "overall"


def _metrics(y: np.ndarray, hat: np.ndarray, score: np.ndarray) -> dict[str, float | None]:
    pos, neg = y == 1, y == 0
    return {
        "agreement": float((y == hat).mean()) if len(y) else None,
        "sensitivity": float(hat[pos].mean()) if pos.any() else None,
        "specificity": float(1.0 - hat[neg].mean()) if neg.any() else None,
        "kappa": binary_kappa(y, hat),
        "auroc": rank_auroc(y[~np.isnan(score)], score[~np.isnan(score)]),
    }


def _interval(values: list[float | None], level: float) -> list[float] | None:
    kept = [v for v in values if v is not None and np.isfinite(v)]
    if not kept:
        return None
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(kept, [tail, 100.0 - tail])
    return [round(float(lo), 4) + 0.0, round(float(hi), 4) + 0.0]  # + 0.0: no "-0.0"


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4) + 0.0


def review_stats(
    reviewed: Sequence[ReviewedStudy], bootstrap: Bootstrap | None = None
) -> dict[str, Any]:
    """Per part and overall: ``n_studies``, ``n_positive`` (by the reviewers) and each metric of
    :data:`METRICS` as ``{"value": v, "ci": [lo, hi]}`` (None where undefined: no positive
    study, say). Studies whose result had no label are left out."""
    bootstrap = bootstrap or Bootstrap()
    usable = [r for r in reviewed if r.model_label in ("positive", "negative")]
    y = np.array([r.label == "positive" for r in usable], dtype=np.int8)
    hat = np.array([r.model_label == "positive" for r in usable], dtype=np.int8)
    score = np.array(
        [np.nan if r.model_score is None else r.model_score for r in usable], dtype=np.float64
    )
    part = np.array([r.part or "" for r in usable], dtype=object)
    groups = {OVERALL: np.ones(len(usable), dtype=bool)}
    for name in PARTS:
        mask = part == name
        if mask.any():
            groups[name] = mask

    draws: dict[str, dict[str, list[float | None]]] = {g: {m: [] for m in METRICS} for g in groups}
    if len(usable) and bootstrap.resamples > 0:
        rng = np.random.default_rng(bootstrap.seed)
        for _ in range(bootstrap.resamples):
            pick = rng.integers(0, len(usable), len(usable))
            for name, mask in groups.items():
                chosen = pick[mask[pick]]
                values = _metrics(y[chosen], hat[chosen], score[chosen])
                for metric in METRICS:
                    draws[name][metric].append(values[metric])

    def block(name: str, mask: np.ndarray) -> dict[str, Any]:
        values = _metrics(y[mask], hat[mask], score[mask])
        out: dict[str, Any] = {"n_studies": int(mask.sum()), "n_positive": int(y[mask].sum())}
        for metric in METRICS:
            out[metric] = {
                "value": _rounded(values[metric]),
                "ci": _interval(draws[name][metric], bootstrap.level),
            }
        return out

    return {
        "n_reviewed": len(reviewed),
        "n_compared": len(usable),
        "bootstrap": bootstrap.describe(),
        OVERALL: block(OVERALL, groups[OVERALL]),
        "per_part": {name: block(name, mask) for name, mask in groups.items() if name != OVERALL},
    }


def roc_points(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every threshold, from (0, 0) to (1, 1)."""
    order = np.argsort(-score, kind="mergesort")
    y, score = y[order], score[order]
    distinct = np.r_[np.flatnonzero(np.diff(score)), len(y) - 1]
    tp = np.cumsum(y)[distinct]
    fp = (distinct + 1) - tp
    n_pos, n_neg = max(int(y.sum()), 1), max(int(len(y) - y.sum()), 1)
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


def roc_png(reviewed: Sequence[ReviewedStudy], *, title: str = "") -> bytes:
    """The ROC curves of the study scores against the reviewers' labels, overall and for each
    part with both classes and at least :data:`MIN_CURVE_STUDIES` studies, as a PNG."""
    from matplotlib.figure import Figure

    usable = [r for r in reviewed if r.model_score is not None]
    figure = Figure(figsize=(5.2, 5.0), dpi=110)
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], linestyle=":", color="#888888", linewidth=1)
    curves = [(OVERALL, usable)] + [(name, [r for r in usable if r.part == name]) for name in PARTS]
    drawn = 0
    for name, rows in curves:
        y = np.array([r.label == "positive" for r in rows], dtype=np.int8)
        enough = len(rows) >= (2 if name == OVERALL else MIN_CURVE_STUDIES)
        if not enough or y.all() or not y.any():
            continue
        score = np.array([r.model_score for r in rows], dtype=np.float64)
        fpr, tpr = roc_points(y, score)
        auc = rank_auroc(y, score)
        overall = name == OVERALL
        axes.plot(
            fpr,
            tpr,
            linewidth=2.4 if overall else 1.2,
            color="black" if overall else None,
            alpha=1.0 if overall else 0.8,
            label=f"{name.lower()} (AUROC {auc:.2f}, n={len(rows)})",
            drawstyle="steps-post",
        )
        drawn += 1
    if not drawn:
        axes.text(0.5, 0.5, "no reviewed studies of both classes yet", ha="center", va="center")
    else:
        axes.legend(loc="lower right", fontsize=7, frameon=False)
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.01)
    axes.set_xlabel("1 - specificity (false-positive rate)")
    axes.set_ylabel("sensitivity (true-positive rate)")
    axes.set_title(title or "Study scores against the reviewers' labels", fontsize=9)
    axes.set_aspect("equal")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
