"""``bonewatch rescore``: images already scored go through another bundle (or version).

The ledger keeps one prediction per (image, bundle, version), so the earlier results stay and
``bonewatch results --bundle NAME`` shows either.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

from bonewatch.db import queue_for_rescoring
from bonewatch.models.bundle import read_manifest
from bonewatch.worker.pipeline import Pipeline, recover_leases
from bonewatch.worker.runner import drain, enqueue_ledger, open_ledger
from bonewatch.worker.settings import Settings


@dataclass(frozen=True)
class RescoreSummary:
    bundle: str
    version: str
    queued: int
    finished: int


def rescore(
    settings: Settings,
    *,
    study: str | None = None,
    part: str | None = None,
    since: datetime | None = None,
    path_glob: str | None = None,
    on_queued: Callable[[int], None] | None = None,
    on_finished: Callable[[int], None] | None = None,
    enqueue: Callable[[list[int]], None] | None = None,
) -> RescoreSummary:
    """Queue the matching finished images that the configured bundle has not scored, then
    score them here (embedded mode) or hand their ids to ``enqueue`` (distributed mode, on
    ``bulk``; the workers must serve the same bundle)."""
    manifest = read_manifest(settings.bundle)
    engine = enqueue_ledger(settings) if enqueue else open_ledger(settings)
    try:
        ids = queue_for_rescoring(
            engine,
            bundle_name=manifest.name,
            bundle_version=manifest.version,
            study=study,
            part=part,
            since=since,
            path_glob=path_glob,
        )
        if on_queued is not None:
            on_queued(len(ids))
        if enqueue is not None:
            enqueue(ids)
            return RescoreSummary(manifest.name, manifest.version, len(ids), 0)
        recover_leases(engine, settings)
        with ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="bonewatch-io") as pool:
            drained = drain(Pipeline.open(settings, engine, pool), on_finished=on_finished)
        return RescoreSummary(manifest.name, manifest.version, len(ids), drained.finished)
    finally:
        engine.dispose()
