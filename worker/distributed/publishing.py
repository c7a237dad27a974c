"""Publishing image ids on the ``live`` and ``bulk`` queues, and send passes on ``send``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from celery import Celery

from bonewatch.db import QUEUES
from bonewatch.worker.distributed.celery_app import SEND_QUEUE, TASK_PROCESS, TASK_SEND, get_app
from bonewatch.worker.settings import Settings


def _batches(ids: Sequence[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(ids), size):
        yield list(ids[start : start + size])


def publish(
    app: Celery,
    image_ids: Sequence[int],
    queue: str,
    *,
    batch_size: int,
    countdown: float | None = None,
) -> int:
    """Send ``image_ids`` as messages of at most ``batch_size`` ids each; returns the count."""
    if queue not in QUEUES:
        raise ValueError(f"unknown queue {queue!r}; expected one of {QUEUES}")
    sent = 0
    with app.producer_or_acquire() as producer:
        # Declared on every call, not once per connection: a broker that lost its memory
        # (Redis FLUSHALL, a restart without persistence) also lost the queue's binding, and
        # messages published without it would vanish.
        app.amqp.queues[queue](producer.channel).declare()
        for chunk in _batches(list(image_ids), batch_size):
            app.send_task(
                TASK_PROCESS,
                args=[chunk],
                queue=queue,
                routing_key=queue,
                countdown=countdown,
                producer=producer,
            )
            sent += 1
    return sent


def publish_send(app: Celery) -> None:
    """Ask for a pass over the outbox on the ``send`` queue (results back to PACS). Passes take
    the ledger's lock one at a time, so asking twice costs one cheap pass."""
    from kombu import Exchange, Queue

    with app.producer_or_acquire() as producer:
        Queue(SEND_QUEUE, Exchange(SEND_QUEUE), routing_key=SEND_QUEUE)(producer.channel).declare()
        app.send_task(TASK_SEND, queue=SEND_QUEUE, routing_key=SEND_QUEUE, producer=producer)


class Publisher:
    """A callback for :func:`worker.pipeline.register_paths`: publishes each chunk's new rows."""

    def __init__(self, settings: Settings, queue: str) -> None:
        self.app = get_app(settings)
        self.queue = queue
        self.batch_size = settings.batch_size
        self.images = 0
        self.messages = 0

    def __call__(self, image_ids: list[int]) -> None:
        if image_ids:
            self.messages += publish(self.app, image_ids, self.queue, batch_size=self.batch_size)
            self.images += len(image_ids)
