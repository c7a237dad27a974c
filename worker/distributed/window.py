"""The bulk window in a worker: its consumer takes messages from ``bulk`` only while the window
is open (``BONEWATCH_BULK_WINDOW``, ``bonewatch worker --bulk-window``).

Outside the window the parent stops consuming ``bulk`` and its messages wait in the broker;
``live`` is consumed throughout. The claim itself applies the same window
(:meth:`Pipeline.claim`), so a ``bulk`` message delivered just as the window closes claims
nothing: it is dropped, its rows stay ``queued``, and ``reconcile`` publishes them again.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from celery import Celery, bootsteps

from bonewatch.worker.window import BulkWindow

log = logging.getLogger(__name__)

# How often the consumer looks at the clock.
CHECK_SECONDS = 10.0


def install_window_gate(
    app: Celery, window: BulkWindow, *, check_seconds: float = CHECK_SECONDS
) -> None:
    """Add the consumer step that follows ``window`` on ``app`` (before ``worker_main``)."""

    class BulkWindowGate(bootsteps.StartStopStep):
        """Consume ``bulk`` inside the window only."""

        requires = {"celery.worker.consumer.tasks:Tasks"}

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            self.consuming: bool | None = None
            self.timer: Any = None

        def start(self, consumer: Any) -> None:
            self.consuming = None  # a consumer restarted (broker reconnect) consumes all again
            self.check(consumer)
            self.timer = consumer.timer.call_repeatedly(check_seconds, self.check, (consumer,))

        def stop(self, consumer: Any) -> None:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None

        def check(self, consumer: Any) -> None:
            now = datetime.now(UTC)
            wanted = window.is_open(now)
            if wanted == self.consuming:
                return
            if wanted:
                consumer.add_task_queue("bulk")
                log.warning("bulk window %s open: taking bulk work", window)
            else:
                consumer.cancel_task_queue("bulk")
                opens = window.opens_at(now).astimezone()
                log.warning(
                    "outside the bulk window %s: live only until %s local time",
                    window,
                    f"{opens:%Y-%m-%d %H:%M}",
                )
            self.consuming = wanted

    app.steps["consumer"].add(BulkWindowGate)
