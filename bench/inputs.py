"""The bench's inputs: its work folder, phantom PNGs in MURA layout and small files."""

from __future__ import annotations

import json
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bonewatch.bench.config import BenchConfig
from bonewatch.ingest import iter_candidate_files, write_png
from bonewatch.models.phantoms import PARTS, draw_phantom


@dataclass
class WorkDir:
    """Where a run keeps its bundle, images and ledgers: a kept folder or a temporary one."""

    root: Path
    keep: bool

    @classmethod
    def open(cls, root: Path | None) -> WorkDir:
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)
            return cls(root.resolve(), keep=True)
        return cls(Path(tempfile.mkdtemp(prefix="bonewatch-bench-")), keep=False)

    def close(self) -> None:
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)


def _phantom_path(folder: Path, index: int) -> Path:
    """MURA layout, three images per study, parts in runs as an archive walk meets them."""
    study = index // 3
    part = PARTS[(study // 4) % len(PARTS)]
    return (
        folder
        / f"XR_{part}"
        / f"patient{study:05d}"
        / "study1_negative"
        / f"image{index % 3 + 1}.png"
    )


def _stamp(pixels: np.ndarray, index: int) -> np.ndarray:
    """A copy of ``pixels`` whose first pixels spell ``index``, so every file is distinct."""
    out = pixels.copy()
    for k in range(4):
        out[0, k] = ((index >> (8 * k)) & 0xFF) / 255.0
    return out


def write_phantoms(
    folder: Path,
    count: int,
    *,
    px: int = 512,
    seed: int = 0,
    distinct: int | None = None,
    workers: int = 2,
) -> list[Path]:
    """Write ``count`` phantom PNGs of the seven parts under ``folder`` in MURA layout.

    With ``distinct``, only that many phantoms are drawn and the rest are stamped copies of them
    (distinct bytes, so none is a duplicate): drawing is the slow part of writing 10,000 files.

    Returns:
        The paths in walk order.
    """
    pool_size = count if distinct is None else min(distinct, count)

    def draw(i: int) -> np.ndarray:
        rng = np.random.default_rng([seed, i])
        part = PARTS[(i // 3 // 4) % len(PARTS)]
        return draw_phantom(part, fractured=bool(rng.random() < 0.5), rng=rng, size=px).pixels

    base: list[np.ndarray] = []
    if distinct is not None:
        with ThreadPoolExecutor(workers) as pool:
            base = list(pool.map(draw, range(pool_size)))

    def write(i: int) -> Path:
        path = _phantom_path(folder, i)
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = draw(i) if distinct is None else _stamp(base[i % pool_size], i)
        write_png(path, pixels)
        return path

    with ThreadPoolExecutor(workers) as pool:
        paths = list(pool.map(write, range(count)))
    return sorted(paths)


def phantom_set(folder: Path, config: BenchConfig, *, distinct: int | None) -> list[Path]:
    """The run's phantoms; a kept work folder that already holds the same set reuses it."""
    recipe = json.dumps(
        {"count": config.images, "px": config.image_px, "seed": config.seed, "distinct": distinct}
    )
    marker = folder / ".bench-phantoms"  # hidden: never registered as an input
    if marker.is_file() and marker.read_text() == recipe:
        return sorted(iter_candidate_files([folder]))
    shutil.rmtree(folder, ignore_errors=True)
    files = write_phantoms(
        folder, config.images, px=config.image_px, seed=config.seed, distinct=distinct
    )
    marker.write_text(recipe)
    return files


def write_small_files(folder: Path, count: int, *, seed: int = 0) -> None:
    """``count`` distinct 16x16 PNGs: registration's cost is per file, not per pixel."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        sub = folder / f"batch{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        write_png(sub / f"file{i:06d}.png", _stamp(rng.random((16, 16), np.float32), i))
