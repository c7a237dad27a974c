"""Evaluation as in the MURA paper: study score = mean image probability; AUROC and kappa."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import cohen_kappa_score, confusion_matrix, roc_auc_score

from ingest import MURA_PARTS, DecodedImage, IngestError, read_image
from models.bundle import OTHER, Bundle
from models.cascade import Prediction, run_cascade
from models.datasets import Sample

log = logging.getLogger(__name__)


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


def _auroc(y: Sequence[int], p: Sequence[float]) -> float | None:
    if len(set(y)) < 2:
        return None
    return float(roc_auc_score(y, p))


def _kappa(y: Sequence[int], yhat: Sequence[int]) -> float | None:
    if not y:
        return None
    if len(set(y)) < 2 and len(set(yhat)) < 2:
        return 1.0 if list(y) == list(yhat) else 0.0
    return float(cohen_kappa_score(y, yhat))


def _sens_spec(y: Sequence[int], yhat: Sequence[int]) -> tuple[float | None, float | None]:
    y_arr, h_arr = np.asarray(y), np.asarray(yhat)
    pos, neg = y_arr == 1, y_arr == 0
    sens = float((h_arr[pos] == 1).mean()) if pos.any() else None
    spec = float((h_arr[neg] == 0).mean()) if neg.any() else None
    return sens, spec


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


def _fracture_block(images: Sequence[Scored], studies: Sequence[StudyScore]) -> dict[str, object]:
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


def compute_metrics(scored: Sequence[Scored], labels: Sequence[str]) -> dict[str, Any]:
    """Image- and study-level metrics, overall and per part, plus the body-part confusion matrix.

    Fracture metrics cover the images the cascade sent to a fracture model (as served); images that
    stage 1 rejected or that could not be read are counted in ``n_rejected``/``n_unreadable``.
    """
    readable = [s for s in scored if s.prediction is not None]
    y_part = [s.sample.part for s in readable]
    p_part = [s.prediction.body_part for s in readable]  # type: ignore[union-attr]
    with_p = [
        s
        for s in readable
        if s.sample.part != OTHER and s.prediction.p_fracture is not None  # type: ignore[union-attr]
    ]
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
    return {
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


def evaluate_bundle(
    samples: Sequence[Sample],
    bundle: Bundle,
    *,
    batch_size: int = 32,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run ``bundle`` over a labelled dataset and return :func:`compute_metrics`' report."""
    scored = predict_samples(samples, bundle, batch_size=batch_size, on_batch=on_batch)
    report = compute_metrics(scored, bundle.manifest.body_part.labels)
    report["bundle"] = bundle.name
    report["bundle_version"] = bundle.version
    return report
