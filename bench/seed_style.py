"""The seed-style figure: serving as the seed projects did, ``model.predict`` per image."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from bonewatch.bench.config import BENCH_SALT
from bonewatch.ingest import read_image
from bonewatch.models.bundle import OTHER, load_keras_model, read_manifest
from bonewatch.models.preprocess import preprocess


class SeedStyleServer:
    """Serving as the seed projects did: ``model.predict`` on a batch of one, once per stage."""

    def __init__(self, bundle_dir: Path) -> None:
        self._root = bundle_dir.resolve()
        self.manifest = read_manifest(self._root)
        self._stage1 = load_keras_model(self._root, self.manifest.body_part)
        self._fracture: dict[str, Any] = {}

    def _fracture_model(self, part: str) -> Any:
        if part not in self._fracture:
            self._fracture[part] = load_keras_model(self._root, self.manifest.fracture[part])
        return self._fracture[part]

    def predict(self, pixels: np.ndarray) -> tuple[str, float | None]:
        """The body part and p(fracture) of one image's grey pixels."""
        body = self.manifest.body_part
        x = preprocess(pixels, body.spec)[None]
        probs = self._stage1.predict(x, verbose=0)[0]
        part = body.labels[int(np.argmax(probs))]
        if part == OTHER or float(probs.max()) < body.confidence_floor:
            return part, None
        entry = self.manifest.fracture[part]
        y = x if entry.spec == body.spec else preprocess(pixels, entry.spec)[None]
        return part, float(self._fracture_model(part).predict(y, verbose=0)[0, -1])


def measure_seed_style(bundle_dir: Path, files: list[Path], repeats: int = 1) -> list[float]:
    """Images per second reading each file and calling ``model.predict`` once per stage.

    Returns:
        One figure per pass over ``files``.
    """
    server = SeedStyleServer(bundle_dir)
    server.predict(read_image(files[0], salt=BENCH_SALT).pixels)  # builds predict's function
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for path in files:
            server.predict(read_image(path, salt=BENCH_SALT).pixels)
        runs.append(len(files) / (time.perf_counter() - start))
    return runs
