"""The bench's inputs: its work folder, phantoms (PNG or DICOM) in MURA layout and small files."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bonewatch.bench.config import INPUT_FORMATS, BenchConfig
from bonewatch.ingest import iter_candidate_files, make_uid, write_dicom, write_png
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


def _phantom_path(folder: Path, index: int, suffix: str = ".png") -> Path:
    """MURA layout, three images per study, parts in runs as an archive walk meets them."""
    study = index // 3
    part = PARTS[(study // 4) % len(PARTS)]
    return (
        folder
        / f"XR_{part}"
        / f"patient{study:05d}"
        / "study1_negative"
        / f"image{index % 3 + 1}{suffix}"
    )


def _on_detector(pixels: np.ndarray, px: int) -> np.ndarray:
    """The phantom centred on a black ``px`` x ``px`` square: a flat-panel detector's one
    matrix size (phantoms come in many shapes; an archive's images in a few)."""
    out = np.zeros((px, px), np.float32)
    h, w = pixels.shape
    top, left = (px - h) // 2, (px - w) // 2
    out[top : top + h, left : left + w] = pixels
    return out


# pylibjpeg-openjpeg's encoder crashes the process when two threads encode at once.
_ENCODER_LOCK = threading.Lock()


def _write_one(path: Path, pixels: np.ndarray, input_format: str, seed: int) -> None:
    syntax = INPUT_FORMATS[input_format]
    if syntax is None:
        write_png(path, pixels)
        return
    # UIDs of the set's own: a set written again with another seed (the distributed figure's
    # fresh content on every run) is other instances, not duplicates in a shared ledger.
    uid = f"{seed}:{path}"
    with _ENCODER_LOCK:
        write_dicom(
            path,
            pixels,
            bits_stored=12,
            transfer_syntax=syntax,
            patient_id=path.parts[-3],
            study_uid=make_uid(uid, "study"),
            series_uid=make_uid(uid, "series"),
            sop_uid=make_uid(uid, "sop"),
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
    input_format: str = "png",
) -> list[Path]:
    """Write ``count`` phantoms of the seven parts under ``folder`` in MURA layout, each on a
    ``px`` square, as PNG or as 12-bit CR DICOM (``input_format``, a key of
    :data:`~bonewatch.bench.config.INPUT_FORMATS`).

    With ``distinct``, only that many phantoms are drawn and the rest are stamped copies of them
    (distinct bytes, so none is a duplicate): drawing is the slow part of writing 10,000 files.

    Returns:
        The paths in walk order.
    """
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input format must be one of {sorted(INPUT_FORMATS)}")
    pool_size = count if distinct is None else min(distinct, count)
    suffix = ".png" if INPUT_FORMATS[input_format] is None else ".dcm"

    def draw(i: int) -> np.ndarray:
        rng = np.random.default_rng([seed, i])
        part = PARTS[(i // 3 // 4) % len(PARTS)]
        pixels = draw_phantom(part, fractured=bool(rng.random() < 0.5), rng=rng, size=px).pixels
        return _on_detector(pixels, px)

    base: list[np.ndarray] = []
    if distinct is not None:
        with ThreadPoolExecutor(workers) as pool:
            base = list(pool.map(draw, range(pool_size)))

    def write(i: int) -> Path:
        path = _phantom_path(folder, i, suffix)
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = draw(i) if distinct is None else _stamp(base[i % pool_size], i)
        _write_one(path, pixels, input_format, seed)
        return path

    with ThreadPoolExecutor(workers) as pool:
        paths = list(pool.map(write, range(count)))
    return sorted(paths)


def phantom_set(folder: Path, config: BenchConfig, *, distinct: int | None) -> list[Path]:
    """The run's phantoms; a kept work folder that already holds the same set reuses it."""
    recipe = json.dumps(
        {
            "count": config.images,
            "px": config.image_px,
            "seed": config.seed,
            "distinct": distinct,
            "format": config.input_format,
        }
    )
    marker = folder / ".bench-phantoms"  # hidden: never registered as an input
    if marker.is_file() and marker.read_text() == recipe:
        return sorted(iter_candidate_files([folder]))
    shutil.rmtree(folder, ignore_errors=True)
    files = write_phantoms(
        folder,
        config.images,
        px=config.image_px,
        seed=config.seed,
        distinct=distinct,
        input_format=config.input_format,
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
