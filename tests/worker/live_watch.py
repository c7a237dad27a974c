"""``watch_inbox`` on a thread of the test, with what it raised kept for the assertions."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bonewatch.worker.runner import watch_inbox
from bonewatch.worker.settings import Settings
from tests.worker.conftest import wait_for


@dataclass
class LiveWatch:
    thread: threading.Thread
    stop: threading.Event
    events: list[str] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def running(self) -> bool:
        return self.thread.is_alive() and not self.errors

    def started(self) -> bool:
        """Wait until the watcher is up (its start-up scan done)."""
        return self.wait(lambda: any(event.startswith("watching ") for event in self.events))

    def wait(self, predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
        """Wait for ``predicate`` as :func:`wait_for` does; fail at once if ``watch`` stopped."""
        held = wait_for(lambda: predicate() or not self.running(), timeout)
        assert self.running(), f"watch stopped: {self.errors!r}"
        return held and predicate()


@contextmanager
def live_watch(
    inbox: Path, settings: Settings, *, join_timeout: float = 30.0
) -> Iterator[LiveWatch]:
    """Run ``watch_inbox(inbox, settings)`` until the block ends; the block sees a
    :class:`LiveWatch` whose ``errors`` holds what the loop raised, if it stopped."""
    stop = threading.Event()
    watch = LiveWatch(threading.Thread(target=lambda: None), stop)

    def run() -> None:
        try:
            watch_inbox(inbox, settings, stop=stop, on_event=watch.events.append)
        except BaseException as exc:  # kept for the test, which asserts on it
            watch.errors.append(exc)

    watch.thread = threading.Thread(target=run, name="test-watch", daemon=True)
    watch.thread.start()
    try:
        yield watch
    finally:
        stop.set()
        watch.thread.join(timeout=join_timeout)
