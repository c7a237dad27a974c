"""Evaluation as in the MURA paper: study score = mean image probability; AUROC and kappa.

Point estimates come from scikit-learn. Each headline metric, overall and per part, also gets a
95 % bootstrap confidence interval: studies are resampled with replacement (a study's images go
with it), the metric is recomputed on each resample, and the interval is the 2.5th and 97.5th
percentiles of the resampled values. The resampling is seeded, so the same predictions give the
same intervals.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import cohen_kappa_score, confusion_matrix, roc_auc_score

from bonewatch.ingest import MURA_PARTS, DecodedImage, IngestError, read_image
from bonewatch.models.bundle import OTHER, Bundle
from bonewatch.models.cascade import Prediction, run_cascade
from bonewatch.models.datasets import Sample

log = logging.getLogger(__name__)

# The metrics that summarise a bundle: overall keys in a report, and their per-part names.
HEADLINE_METRICS = (
    "body_part_accuracy",
    "fracture_auroc_image",
    "fracture_auroc_study",
    "kappa_study",
    "sensitivity_study",
    "specificity_study",
)
PART_METRICS = (
    "auroc_image",
    "auroc_study",
    "kappa_study",
    "sensitivity_study",
    "specificity_study",
)
_OVERALL_NAME = {
    "auroc_image": "fracture_auroc_image",
    "auroc_study": "fracture_auroc_study",
    "kappa_study": "kappa_study",
    "sensitivity_study": "sensitivity_study",
    "specificity_study": "specificity_study",
}


@dataclass(frozen=True)
class Bootstrap:
    """How confidence intervals are drawn: ``resamples`` resamples of the studies, seeded."""

    resamples: int = 1000
    seed: int = 0
    level: float = 0.95

    def describe(self) -> dict[str, object]:
        return {
            "resamples": self.resamples,
            "seed": self.seed,
            "level": self.level,
            "unit": "study",
            "interval": "percentile",
        }


DEFAULT_BOOTSTRAP = Bootstrap()


@dataclass(frozen=True)
class Scored:
    """One evaluated image: its ground truth and what the cascade said (None: unreadable)."""

    sample: Sample
    prediction: Prediction | None


def predict_samples(
    samples: Sequence[Sample],
    bundle: Bundle,
    *,
    salt: str = "evaluation",
    batch_size: int = 32,
    on_batch: Callable[[int], None] | None = None,
) -> list[Scored]:
    """Read every sample and run the cascade over it in batches."""

    def read(sample: Sample) -> DecodedImage | None:
        try:
            return read_image(sample.path, salt=salt)
        except (IngestError, OSError) as exc:
            log.warning("skipping %s: %s", sample.path, exc)
            return None

    scored: list[Scored] = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            images = list(pool.map(read, chunk))
            readable = [im for im in images if im is not None]
            preds = iter(run_cascade(readable, bundle, batch_size=batch_size))
            scored.extend(
                Scored(s, None if im is None else next(preds))
                for s, im in zip(chunk, images, strict=True)
            )
            if on_batch is not None:
                on_batch(len(chunk))
    return scored


# ---------------------------------------------------------------------------------------------
# Metric functions. The scikit-learn ones give the reported values; the numpy twins below give
# the same numbers (the tests check that) and are fast enough for a thousand bootstrap resamples.
# ---------------------------------------------------------------------------------------------


def _auroc(y: Sequence[int] | np.ndarray, p: Sequence[float] | np.ndarray) -> float | None:
    if len(set(np.asarray(y).tolist())) < 2:
        return None
    return float(roc_auc_score(y, p))


def _kappa(y: Sequence[int] | np.ndarray, yhat: Sequence[int] | np.ndarray) -> float | None:
    y_list, h_list = np.asarray(y).tolist(), np.asarray(yhat).tolist()
    if not y_list:
        return None
    if len(set(y_list)) < 2 and len(set(h_list)) < 2:
        return 1.0 if y_list == h_list else 0.0
    return float(cohen_kappa_score(y_list, h_list))


def _sens_spec(
    y: Sequence[int] | np.ndarray, yhat: Sequence[int] | np.ndarray
) -> tuple[float | None, float | None]:
    y_arr, h_arr = np.asarray(y), np.asarray(yhat)
    pos, neg = y_arr == 1, y_arr == 0
    sens = float((h_arr[pos] == 1).mean()) if pos.any() else None
    spec = float((h_arr[neg] == 0).mean()) if neg.any() else None
    return sens, spec


def rank_auroc(y: np.ndarray, p: np.ndarray) -> float | None:
    """AUROC as the Mann-Whitney statistic (ties count one half); None without both classes."""
    pos = y == 1
    n_pos = int(pos.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
    # Average rank of each distinct value, 1-based.
    mid_rank = np.cumsum(counts) - (counts - 1) / 2.0
    ranks = mid_rank[inverse]
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def binary_kappa(y: np.ndarray, yhat: np.ndarray) -> float | None:
    """Cohen's kappa of two 0/1 vectors; 1 or 0 when both are constant (agree or not)."""
    n = len(y)
    if n == 0:
        return None
    tp = float(np.sum((y == 1) & (yhat == 1)))
    tn = float(np.sum((y == 0) & (yhat == 0)))
    p_obs = (tp + tn) / n
    y1, h1 = float(np.sum(y == 1)) / n, float(np.sum(yhat == 1)) / n
    p_exp = y1 * h1 + (1.0 - y1) * (1.0 - h1)
    if p_exp >= 1.0:
        return 1.0 if p_obs == 1.0 else 0.0
    return (p_obs - p_exp) / (1.0 - p_exp)


# ---------------------------------------------------------------------------------------------
# Study scores and the report
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyScore:
    study: str
    part: str
    label: int
    score: float
    threshold: float


def study_scores(scored: Sequence[Scored]) -> list[StudyScore]:
    """Mean of the image probabilities per study (MURA's study score), for the seven parts."""
    groups: dict[str, list[Scored]] = defaultdict(list)
    for item in scored:
        if item.sample.part != OTHER and item.prediction and item.prediction.p_fracture is not None:
            groups[item.sample.study].append(item)
    out = []
    for study, items in sorted(groups.items()):
        preds = [i.prediction for i in items if i.prediction is not None]
        out.append(
            StudyScore(
                study=study,
                part=items[0].sample.part,
                label=items[0].sample.label,
                score=float(np.mean([p.p_fracture for p in preds])),
                threshold=float(np.mean([p.threshold for p in preds])),
            )
        )
    return out


def _fracture_block(images: Sequence[Scored], studies: Sequence[StudyScore]) -> dict[str, Any]:
    y_img = [s.sample.label for s in images]
    p_img = [s.prediction.p_fracture for s in images if s.prediction]
    y_study = [s.label for s in studies]
    yhat_study = [int(s.score >= s.threshold) for s in studies]
    sens, spec = _sens_spec(y_study, yhat_study)
    return {
        "auroc_image": _auroc(y_img, p_img),  # type: ignore[arg-type]
        "auroc_study": _auroc(y_study, [s.score for s in studies]),
        "kappa_study": _kappa(y_study, yhat_study),
        "sensitivity_study": sens,
        "specificity_study": spec,
        "n_images": len(images),
        "n_studies": len(studies),
    }


class _Arrays:
    """The predictions as flat arrays, with each image's and study's index into the study units
    that the bootstrap resamples."""

    def __init__(self, readable: Sequence[Scored], studies: Sequence[StudyScore]) -> None:
        units = sorted({s.sample.study for s in readable})
        unit_of = {study: i for i, study in enumerate(units)}
        self.n_units = len(units)
        # Body-part accuracy covers every readable image, `other` regions included.
        self.part_unit = np.array([unit_of[s.sample.study] for s in readable], dtype=np.intp)
        self.part_ok = np.array(
            [s.sample.part == s.prediction.body_part for s in readable],  # type: ignore[union-attr]
            dtype=np.bool_,
        )
        with_p = [s for s in readable if _has_fracture_score(s)]
        self.img_unit = np.array([unit_of[s.sample.study] for s in with_p], dtype=np.intp)
        self.img_y = np.array([s.sample.label for s in with_p], dtype=np.int8)
        self.img_p = np.array([s.prediction.p_fracture for s in with_p], dtype=np.float64)  # type: ignore[union-attr]
        # Parts as small integer codes: comparing them is what each resample does most.
        self.part_code = {part: i for i, part in enumerate(MURA_PARTS)}
        self.img_part = np.array([self.part_code[s.sample.part] for s in with_p], dtype=np.int8)
        self.st_unit = np.array([unit_of[s.study] for s in studies], dtype=np.intp)
        self.st_y = np.array([s.label for s in studies], dtype=np.int8)
        self.st_score = np.array([s.score for s in studies], dtype=np.float64)
        self.st_hat = np.array([s.score >= s.threshold for s in studies], dtype=np.int8)
        self.st_part = np.array([self.part_code[s.part] for s in studies], dtype=np.int8)


def _has_fracture_score(s: Scored) -> bool:
    return (
        s.prediction is not None and s.sample.part != OTHER and s.prediction.p_fracture is not None
    )


def _resampled_metrics(
    a: _Arrays, counts: np.ndarray, parts: Sequence[str]
) -> dict[str, dict[str, float | None]]:
    """Every metric on one resample, given how many times each study unit was drawn."""
    part_idx = np.repeat(np.arange(len(a.part_unit)), counts[a.part_unit])
    img_idx = np.repeat(np.arange(len(a.img_unit)), counts[a.img_unit])
    st_idx = np.repeat(np.arange(len(a.st_unit)), counts[a.st_unit])

    def block(img: np.ndarray, st: np.ndarray) -> dict[str, float | None]:
        y, hat = a.st_y[st], a.st_hat[st]
        pos, neg = y == 1, y == 0
        return {
            "auroc_image": rank_auroc(a.img_y[img], a.img_p[img]),
            "auroc_study": rank_auroc(y, a.st_score[st]),
            "kappa_study": binary_kappa(y, hat),
            "sensitivity_study": float(hat[pos].mean()) if pos.any() else None,
            "specificity_study": float(1 - hat[neg].mean()) if neg.any() else None,
        }

    out: dict[str, dict[str, float | None]] = {}
    overall = block(img_idx, st_idx)
    overall["body_part_accuracy"] = float(a.part_ok[part_idx].mean()) if len(part_idx) else None
    out[""] = {_OVERALL_NAME.get(k, k): v for k, v in overall.items()}
    img_part, st_part = a.img_part[img_idx], a.st_part[st_idx]
    for part in parts:
        code = a.part_code[part]
        out[part] = block(img_idx[img_part == code], st_idx[st_part == code])
    return out


def _percentiles(values: list[float | None], level: float) -> list[float] | None:
    kept = [v for v in values if v is not None and np.isfinite(v)]
    if not kept:
        return None
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(kept, [tail, 100 - tail])
    return [round(float(lo), 4), round(float(hi), 4)]


def bootstrap_intervals(
    readable: Sequence[Scored],
    studies: Sequence[StudyScore],
    parts: Sequence[str],
    bootstrap: Bootstrap,
) -> tuple[dict[str, list[float] | None], dict[str, dict[str, list[float] | None]]]:
    """Percentile intervals of every metric over study resamples: overall, then per part."""
    a = _Arrays(readable, studies)
    draws: dict[str, dict[str, list[float | None]]] = defaultdict(lambda: defaultdict(list))
    if a.n_units and bootstrap.resamples > 0:
        rng = np.random.default_rng(bootstrap.seed)
        for _ in range(bootstrap.resamples):
            pick = rng.integers(0, a.n_units, a.n_units)
            counts = np.bincount(pick, minlength=a.n_units)
            for group, values in _resampled_metrics(a, counts, parts).items():
                for key, value in values.items():
                    draws[group][key].append(value)
    overall = {k: _percentiles(draws[""][k], bootstrap.level) for k in HEADLINE_METRICS}
    per_part = {
        part: {k: _percentiles(draws[part][k], bootstrap.level) for k in PART_METRICS}
        for part in parts
    }
    return overall, per_part


def compute_metrics(
    scored: Sequence[Scored],
    labels: Sequence[str],
    *,
    bootstrap: Bootstrap | None = DEFAULT_BOOTSTRAP,
) -> dict[str, Any]:
    """Image- and study-level metrics, overall and per part, plus the body-part confusion matrix.

    Fracture metrics cover the images the cascade sent to a fracture model (as served); images that
    stage 1 rejected or that could not be read are counted in ``n_rejected``/``n_unreadable``.
    Sensitivity, specificity and kappa take a study as positive when its score reaches the
    threshold of the fracture model that scored it (the manifest's per-part threshold).

    Returns:
        The report; with ``bootstrap``, ``ci95`` (overall) and ``per_part[part]["ci95"]`` hold
        ``[low, high]`` for every metric (None where a resample never had both classes).
    """
    readable = [s for s in scored if s.prediction is not None]
    y_part = [s.sample.part for s in readable]
    p_part = [s.prediction.body_part for s in readable]  # type: ignore[union-attr]
    with_p = [s for s in readable if _has_fracture_score(s)]
    studies = study_scores(readable)
    overall = _fracture_block(with_p, studies)
    per_part = {}
    for part in MURA_PARTS:
        block = _fracture_block(
            [s for s in with_p if s.sample.part == part], [s for s in studies if s.part == part]
        )
        if block["n_images"]:
            per_part[part] = block
    matrix = confusion_matrix(y_part, p_part, labels=list(labels)) if readable else []
    report: dict[str, Any] = {
        "n_images": len(scored),
        "n_unreadable": len(scored) - len(readable),
        "n_rejected": sum(
            True
            for s in readable
            if s.sample.part != OTHER and s.prediction.p_fracture is None  # type: ignore[union-attr]
        ),
        "body_part_accuracy": float(np.mean([a == b for a, b in zip(y_part, p_part, strict=True)]))
        if readable
        else None,
        "body_part_labels": list(labels),
        "body_part_confusion": np.asarray(matrix).tolist(),
        "fracture_auroc_image": overall["auroc_image"],
        "fracture_auroc_study": overall["auroc_study"],
        "kappa_study": overall["kappa_study"],
        "sensitivity_study": overall["sensitivity_study"],
        "specificity_study": overall["specificity_study"],
        "n_studies": overall["n_studies"],
        "per_part": per_part,
    }
    if bootstrap is not None:
        ci_overall, ci_parts = bootstrap_intervals(readable, studies, list(per_part), bootstrap)
        report["ci95"] = ci_overall
        for part, block in per_part.items():
            block["ci95"] = ci_parts[part]
        report["bootstrap"] = bootstrap.describe()
    return report


def evaluate_predictions(
    samples: Sequence[Sample],
    bundle: Bundle,
    *,
    batch_size: int = 32,
    bootstrap: Bootstrap | None = DEFAULT_BOOTSTRAP,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[dict[str, Any], list[Scored]]:
    """Run ``bundle`` over a labelled dataset; returns the report and every image's prediction."""
    scored = predict_samples(samples, bundle, batch_size=batch_size, on_batch=on_batch)
    report = compute_metrics(scored, bundle.manifest.body_part.labels, bootstrap=bootstrap)
    report["bundle"] = bundle.name
    report["bundle_version"] = bundle.version
    report["thresholds"] = {part: e.threshold for part, e in bundle.manifest.fracture.items()}
    return report, scored


def evaluate_bundle(
    samples: Sequence[Sample],
    bundle: Bundle,
    *,
    batch_size: int = 32,
    bootstrap: Bootstrap | None = DEFAULT_BOOTSTRAP,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run ``bundle`` over a labelled dataset and return :func:`compute_metrics`' report."""
    report, _ = evaluate_predictions(
        samples, bundle, batch_size=batch_size, bootstrap=bootstrap, on_batch=on_batch
    )
    return report
