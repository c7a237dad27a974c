"""``bonewatch bench``: throughput against the engine's limit and against seed-style serving.

One run builds a random two-stage bundle with int8 models (``bundle``), writes phantoms at a CR's
full size as PNG or DICOM (``inputs``), and measures on the same machine:

- ``decode``: the worker's decoding alone, reduced where it applies and in full (``run``);
- ``bare``: both stages' batched forward passes on preprocessed tensors, for every engine and
  precision here (the limit; ``bare``);
- ``seed_style``: read each file, then ``model.predict`` on a batch of one per stage
  (``seed_style``);
- ``embedded``: files in a folder to rows in SQLite through a ``bonewatch process`` subprocess,
  for every engine and precision (``--one-engine``: the chosen one only; ``ledger``);
- ``distributed``: the same through Redis, PostgreSQL and ``bonewatch worker`` subprocesses,
  when distributed mode is installed and both servers answer (null otherwise, with the reason;
  ``distributed``);
- ``register_files_s``: how fast ``process`` registers files, on many small files (``ledger``).

Throughput through the ledger is counted from the first image's registration to the last one's
result (``created_at`` and ``finished_at`` in the ledger), so the interpreter's start-up and the
bundle load are left out; they are reported apart as ``embedded_wall_s``.

Bare, seed-style and embedded figures are medians of ``--repeats`` runs (``run`` interleaves
them). ``--rss-track`` is a separate mode (``rss``): one long ``process`` run whose resident
memory is sampled against the number of images finished, to show that it stays flat. Child
processes (``child``) run ``python -m bonewatch`` with this interpreter.
"""

from bonewatch.bench.child import ChildRun, bonewatch_command, run_child
from bonewatch.bench.config import BenchConfig, BenchError
from bonewatch.bench.distributed import distributed_unavailable
from bonewatch.bench.inputs import write_phantoms
from bonewatch.bench.rss import run_rss_track
from bonewatch.bench.run import REPORT_KEYS, run_bench

__all__ = [
    "REPORT_KEYS",
    "BenchConfig",
    "BenchError",
    "ChildRun",
    "bonewatch_command",
    "distributed_unavailable",
    "run_bench",
    "run_child",
    "run_rss_track",
    "write_phantoms",
]
