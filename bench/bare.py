"""The bare figure, the engine's limit: both stages' batched forward passes on ready tensors."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from bonewatch.models.bundle import Bundle
from bonewatch.models.cascade import group_by_part, predict_probs

# Bare passes run on at most this many preprocessed images (224 px RGB: 600 KB each).
BARE_MAX_IMAGES = 512


def forward_two_stage(bundle: Bundle, x: np.ndarray, batch_size: int) -> int:
    """Both stages' forward passes on a preprocessed batch, stage 2 grouped by part.

    These are the model calls :func:`models.cascade.run_cascade` makes, without preprocessing or
    building results. Returns the number of stage-2 groups run.
    """
    manifest = bundle.manifest
    probs = predict_probs(bundle.body_part_model, x, batch_size)
    groups = group_by_part(probs, manifest.body_part.labels, manifest.body_part.confidence_floor)
    for part, index in groups.items():
        predict_probs(bundle.fracture_models[part], x[index], batch_size)
    return len(groups)


def bare_pass(
    bundle: Bundle, x: np.ndarray, batch_size: int, streams: int = 1
) -> tuple[float, float]:
    """One timed pass over ``x``: images per second, and stage-2 groups per batch.

    With ``streams`` above 1, that many threads take the batches in turn, as the embedded
    worker's inference streams do.
    """
    starts = range(0, len(x), batch_size)
    start = time.perf_counter()
    with ThreadPoolExecutor(streams, thread_name_prefix="bench-bare") as pool:
        groups = sum(
            pool.map(lambda i: forward_two_stage(bundle, x[i : i + batch_size], batch_size), starts)
        )
    elapsed = time.perf_counter() - start
    return len(x) / elapsed, groups / len(starts)
