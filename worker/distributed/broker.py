"""What the broker holds: queue depths and, on Redis, the image ids inside its messages."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass

from celery import Celery

from bonewatch.worker.distributed.celery_app import QUEUE_ORDER, TASK_PROCESS


@dataclass
class BrokerView:
    """What the broker holds right now.

    ``ids`` are the image ids inside waiting or freshly delivered messages, or None where the
    transport cannot list messages (AMQP), in which case only ``depths`` are known.
    """

    depths: dict[str, int]
    ids: set[int] | None = None


def _task_ids(raw: bytes | str) -> list[int]:
    """The image ids inside one stored kombu message (JSON envelope, base64 body)."""
    try:
        envelope = json.loads(raw)
        if isinstance(envelope, list):  # the unacked hash stores [message, exchange, key]
            envelope = envelope[0]
        if (envelope.get("headers") or {}).get("task") != TASK_PROCESS:
            return []
        body = envelope["body"]
        if (envelope.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return [int(i) for i in args[0]]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return []


def inspect_broker(app: Celery, *, fresh_seconds: float) -> BrokerView:
    """Queue depths, and on Redis the ids in every waiting message and in messages delivered
    less than ``fresh_seconds`` ago (a worker is about to claim them). Older deliveries whose
    rows are still ``queued`` belong to a worker that died, and do not count."""
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        depths = {}
        for name in QUEUE_ORDER:
            # declared exactly as Celery declares it, so RabbitMQ sees no conflicting arguments
            _, count, _ = app.amqp.queues[name](channel).queue_declare()
            depths[name] = int(count)
        if conn.transport.driver_type != "redis":
            return BrokerView(depths)
        client = channel.client
        ids: set[int] = set()
        keys = [
            name if not pri else f"{name}{channel.sep}{pri}"
            for name in QUEUE_ORDER
            for pri in channel.priority_steps
        ]
        for key in keys:
            for raw in client.lrange(key, 0, -1):
                ids.update(_task_ids(raw))
        cutoff = time.time() - fresh_seconds
        fresh = {
            tag
            for tag, when in client.zrange(channel.unacked_index_key, 0, -1, withscores=True)
            if when >= cutoff
        }
        if fresh:
            for raw in client.hmget(channel.unacked_key, sorted(fresh)):
                if raw is not None:
                    ids.update(_task_ids(raw))
        return BrokerView(depths, ids)
