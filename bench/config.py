"""What a bench run measures (:class:`BenchConfig`), its defaults and its error."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bonewatch.models.engines import InferenceThreads
from bonewatch.worker.settings import Settings

Report = Callable[[str], None]

BENCH_SALT = "bonewatch-bench"
# The encodings ``--input`` writes the phantoms in: PNG, or 12-bit CR DICOM in a transfer syntax.
INPUT_FORMATS = {
    "png": None,
    "dicom": "1.2.840.10008.1.2.1",  # explicit VR little endian, uncompressed
    "dicom-j2k": "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "dicom-jpegls": "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
}
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/14"
DEFAULT_DISTRIBUTED_DB = "postgresql+psycopg://postgres@127.0.0.1:5432/bonewatch_bench"


class BenchError(RuntimeError):
    """A bench step did not do what it measures (a run failed, rows are missing)."""


@dataclass(frozen=True)
class BenchConfig:
    """What to measure, and the worker settings it runs with."""

    images: int = 200
    backbone: str = "densenet121"
    input_size: int = 224
    engine: str = "auto"
    precision: str = "auto"  # the chosen engine's (BONEWATCH_PRECISION)
    batch_size: int = 16
    decode_workers: int = 2
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    inference_streams: int = 0  # 0: the engine's default (models.engines.default_streams)
    forward_batch: int = 0  # 0: the engine's default (models.engines.cpu_pass_size on a CPU)
    image_px: int = 2000  # the phantoms' long side: a CR's full size
    input_format: str = "png"  # a key of INPUT_FORMATS
    seed_style_images: int = 32
    register_files: int = 2000
    distributed_workers: int | None = None  # None: as `bonewatch worker` starts; 0: skipped
    scale_workers: tuple[int, ...] = ()  # worker-process counts whose distributed figures scale
    broker_url: str = DEFAULT_BROKER_URL
    distributed_database_url: str = DEFAULT_DISTRIBUTED_DB
    seed: int = 0
    repeats: int = 3  # bare, seed-style and embedded runs per engine; medians are reported
    compare_engines: bool = True  # embedded runs on every engine the bundle has, not just one

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> BenchConfig:
        """A config that runs the worker with ``settings``' batch, decode and thread values."""
        base: dict[str, Any] = {
            "engine": settings.engine,
            "precision": settings.precision,
            "batch_size": settings.batch_size,
            "decode_workers": settings.decode_workers,
            "intra_op_threads": settings.intra_op_threads,
            "inter_op_threads": settings.inter_op_threads,
            "inference_streams": settings.inference_streams,
            "forward_batch": settings.forward_batch,
        }
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def threads_for(self, engine: str) -> InferenceThreads:
        """The framework threads the embedded worker gets on ``engine``."""
        threads = InferenceThreads(
            self.intra_op_threads, self.inter_op_threads, self.inference_streams, self.forward_batch
        )
        return threads.for_engine(engine)
