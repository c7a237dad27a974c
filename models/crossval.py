"""k-fold cross-validation by patient, with a bundle's own recorded training recipe.

Each fold trains a fresh bundle on the other folds with :func:`models.train.train_bundle`, using
the ``training`` block of the given bundle's manifest, and evaluates it on its held-out fold. The
fold's bundle keeps the recipe's validation share (for early stopping and its thresholds) and
gives the recipe's test share to training, since the held-out fold is the test set.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bonewatch.models.bundle import Manifest, forget_bundle, load_bundle
from bonewatch.models.datasets import Sample, kfold_by_patient
from bonewatch.models.evaluate import (
    DEFAULT_BOOTSTRAP,
    HEADLINE_METRICS,
    Bootstrap,
    Scored,
    compute_metrics,
)
from bonewatch.models.evaluate import evaluate_predictions as _evaluate
from bonewatch.models.train import TrainConfig, train_bundle

log = logging.getLogger(__name__)

CI_METHOD = "t interval of the mean over folds: mean +/- t(0.975, k-1) * sd / sqrt(k)"
# Where each headline metric lives; kappa may be negative.
_RANGE = {name: (0.0, 1.0) for name in HEADLINE_METRICS} | {"kappa_study": (-1.0, 1.0)}


@dataclass(frozen=True)
class FoldResult:
    """One fold: its metrics on the held-out patients, their predictions, its training curves."""

    fold: int
    metrics: dict[str, Any]
    scored: list[Scored]
    history: dict[str, dict[str, list[float]]]


@dataclass(frozen=True)
class CrossValidation:
    """Every fold's result and the JSON-ready summary (see :func:`summarise_folds`)."""

    folds: list[FoldResult]
    report: dict[str, Any]


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Turn ``KEY=VALUE`` strings into training-config overrides (values parsed as JSON if they
    parse, else kept as text).

    Raises:
        ValueError: an item without ``=`` or a key that :class:`TrainConfig` does not have.
    """
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        if key not in fields:
            raise ValueError(
                f"unknown training setting {key!r}; known: {', '.join(sorted(fields))}"
            )
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def fold_config(
    training: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> TrainConfig:
    """The training config for a fold: the manifest's recipe, its test share moved to training."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in training.items() if k in fields}
    values.update(overrides or {})
    if "fractions" in values:
        values["fractions"] = tuple(float(f) for f in values["fractions"])
    config = TrainConfig(**values)
    val = config.fractions[1]
    return dataclasses.replace(config, fractions=(1.0 - val, val, 0.0))


def _t_quantile_975(df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def summarise_folds(folds: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Mean and 95 % t interval over folds of every headline metric (None where no fold has it).

    Returns:
        ``(mean, ci95)``: metric name to mean, and metric name to ``[low, high]``.
    """
    mean: dict[str, Any] = {}
    ci95: dict[str, Any] = {}
    for name in HEADLINE_METRICS:
        values = [float(f[name]) for f in folds if f.get(name) is not None]
        if not values:
            mean[name], ci95[name] = None, None
            continue
        m = float(np.mean(values))
        mean[name] = round(m, 4)
        if len(values) < 2:
            ci95[name] = None
            continue
        half = (
            _t_quantile_975(len(values) - 1)
            * float(np.std(values, ddof=1))
            / math.sqrt(len(values))
        )
        lo, hi = _RANGE[name]
        ci95[name] = [round(max(m - half, lo), 4), round(min(m + half, hi), 4)]
    return mean, ci95


def cross_validate(
    samples: Sequence[Sample],
    manifest: Manifest,
    k: int,
    *,
    seed: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    bootstrap: Bootstrap | None = DEFAULT_BOOTSTRAP,
    dataset: str = "",
    command: str = "",
    salt: str = "evaluation",
    work_dir: str | Path | None = None,
    report: Callable[[str], None] = log.info,
) -> CrossValidation:
    """Train and evaluate one bundle per fold; folds are made by patient.

    Args:
        samples: The labelled dataset.
        manifest: The bundle whose ``training`` recipe every fold reuses.
        k: Number of folds (at least 2).
        seed: Fold assignment seed; the recipe's seed when None.
        overrides: Training settings that replace the recipe's (``fracture_epochs`` …).
        bootstrap: Confidence intervals within each fold and over the pooled predictions.
        work_dir: Where the fold bundles are built; a temporary folder, removed afterwards,
            when None.

    Returns:
        The folds and the report: ``folds`` (per-fold metric objects), ``mean`` and ``ci95`` of
        each headline metric over folds, and ``pooled`` (metrics over all held-out predictions).
    """
    if k < 2:
        raise ValueError(f"k-fold cross-validation needs at least 2 folds, got {k}")
    if not manifest.model_extra or "training" not in manifest.model_extra:
        raise ValueError(
            f"bundle {manifest.name} {manifest.version} records no training recipe in its manifest"
        )
    config = fold_config(manifest.model_extra["training"], overrides)
    fold_seed = config.seed if seed is None else seed
    splits = kfold_by_patient(samples, k, fold_seed)
    own_dir = work_dir is None
    root = Path(tempfile.mkdtemp(prefix="bonewatch-folds-")) if own_dir else Path(str(work_dir))
    results: list[FoldResult] = []
    try:
        for i, (train, test) in enumerate(splits, start=1):
            report(f"fold {i}/{k}: training on {len(train)} images, testing on {len(test)}")
            out = root / f"fold{i}"
            trained = train_bundle(
                train,
                out,
                config=config,
                name=f"{manifest.name}-fold{i}",
                version=manifest.version,
                intended_use=f"Fold {i} of {k} of a cross-validation of {manifest.name}.",
                dataset=dataset,
                command=command,
                salt=salt,
                report=report,
            )
            bundle = load_bundle(out)
            metrics, scored = _evaluate(test, bundle, bootstrap=bootstrap)
            forget_bundle(out)
            metrics.pop("bundle", None)
            metrics.pop("bundle_version", None)
            fold_metrics = {
                "fold": i,
                "n_train_images": len(train),
                "n_test_patients": len({s.patient for s in test}),
                **metrics,
            }
            results.append(FoldResult(i, fold_metrics, scored, trained.history))
            report(
                f"fold {i}/{k}: study AUROC {fold_metrics.get('fracture_auroc_study')}, "
                f"kappa {fold_metrics.get('kappa_study')}"
            )
    finally:
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)
    fold_objects = [r.metrics for r in results]
    mean, ci95 = summarise_folds(fold_objects)
    pooled_scored = [s for r in results for s in r.scored]
    pooled = compute_metrics(pooled_scored, manifest.body_part.labels, bootstrap=bootstrap)
    summary: dict[str, Any] = {
        "bundle": manifest.name,
        "bundle_version": manifest.version,
        "k": k,
        "fold_seed": fold_seed,
        "training": dataclasses.asdict(config),
        "folds": fold_objects,
        "mean": mean,
        "ci95": ci95,
        "ci_method": CI_METHOD,
        "pooled": pooled,
    }
    return CrossValidation(results, summary)
