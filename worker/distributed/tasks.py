"""The one Celery task: thin. It passes ids, retries transient faults, and leaves the work to
:meth:`bonewatch.worker.pipeline.Pipeline.run_batch`.

Messages carry image ids, never pixels; the ledger stays the source of truth. A message that is
delivered twice, or for an image that is already done, claims nothing and costs nothing, which is
what makes re-publishing lost messages (``bonewatch reconcile``) safe.
"""

from __future__ import annotations

import random

from celery import Celery, Task

from bonewatch.db import retry_delay
from bonewatch.worker.distributed.celery_app import TASK_PROCESS, TASK_SEND
from bonewatch.worker.distributed.child import child_pipeline, run_task
from bonewatch.worker.distributed.publishing import publish, publish_send
from bonewatch.worker.pipeline import transient_errors, worker_id
from bonewatch.worker.settings import Settings

_jitter = random.Random()


def register_tasks(app: Celery, settings: Settings) -> None:
    """Register ``process_images`` and ``send_results`` on ``app``; they run with ``settings``,
    the launcher's."""
    sending = bool(settings.dicom_destinations or settings.dicomweb_url)  # results to PACS

    @app.task(  # type: ignore[untyped-decorator]
        name=TASK_PROCESS,
        shared=False,  # each app (one per configuration) owns its own copy
        bind=True,
        max_retries=settings.transient_retries,
    )
    def process_images(
        self: Task, image_ids: list[int], handed_over_by: list[str] | None = None
    ) -> int:
        """Claim, decode, predict and record the given images (those still waiting)."""
        queue = (self.request.delivery_info or {}).get("routing_key") or "bulk"
        earlier = list(handed_over_by or [])
        try:
            outcome = run_task(settings, image_ids, taking_over_from=earlier)
        except transient_errors() as exc:
            # The retry may run in another process: it is told whose leases it may take over
            # (every process that tried this batch), so the batch never waits for them to expire.
            delay = retry_delay(
                self.request.retries + 1,
                base=settings.retry_backoff_seconds,
                cap=settings.retry_backoff_max,
                rng=_jitter,
            )
            raise self.retry(
                exc=exc,
                countdown=delay,
                args=[image_ids],
                kwargs={"handed_over_by": sorted({*earlier, worker_id()})},
            ) from exc
        if outcome.waiting:
            # Files that could not be read for a passing reason wait out their backoff in the
            # ledger; a delayed message brings them back (reconcile would, too). It comes just
            # after the longest backoff the ledger may have given them (+25 % jitter, capped).
            backoff = retry_delay(
                outcome.waiting_attempts,
                base=settings.retry_backoff_seconds,
                cap=settings.retry_backoff_max,
                rng=None,
            )
            publish(
                self.app,
                outcome.waiting,
                queue,
                batch_size=settings.batch_size,
                countdown=min(backoff * 1.25, settings.retry_backoff_max) + 0.5,
            )
        if outcome.finished and sending:
            publish_send(self.app)  # finished images may have completed a study
        return outcome.finished

    @app.task(  # type: ignore[untyped-decorator]
        name=TASK_SEND, shared=False, bind=True, max_retries=settings.transient_retries
    )
    def send_results(self: Task) -> int:
        """Results back to PACS: one pass over the outbox (worker/delivery.py); returns the
        objects sent."""
        from bonewatch.worker.delivery import exclusive_send_pass

        pipeline = child_pipeline(settings)
        try:
            return exclusive_send_pass(pipeline.engine, pipeline.bundle, settings).sent
        except transient_errors() as exc:
            delay = retry_delay(
                self.request.retries + 1,
                base=settings.retry_backoff_seconds,
                cap=settings.retry_backoff_max,
                rng=_jitter,
            )
            raise self.retry(exc=exc, countdown=delay) from exc
