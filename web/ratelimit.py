"""Rate-limiting wrong passwords, per account and per client address, in this process.

Each failure is remembered for ``window`` seconds; once an account has ``attempts`` of them (an
address ``4 * attempts``), logins to it are refused without checking the password until the
oldest falls out of the window. A correct password clears its account's failures.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence

# Keys remembered at most; the least recently failed are forgotten first.
MAX_KEYS = 10_000
ADDRESS_FACTOR = 4


class LoginLimiter:
    """Counts recent failures by key (``user:NAME``, ``addr:IP``)."""

    def __init__(
        self, attempts: int, window: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.attempts = attempts
        self.window = window
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def _limit(self, key: str) -> int:
        return self.attempts * (ADDRESS_FACTOR if key.startswith("addr:") else 1)

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.get(key)
        if times is None:
            return deque()
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]
        return times

    def retry_after(self, keys: Sequence[str]) -> float:
        """Seconds until a login under ``keys`` is accepted again; 0 when it is now."""
        now = self._clock()
        wait = 0.0
        with self._lock:
            for key in keys:
                times = self._recent(key, now)
                if len(times) >= self._limit(key):
                    wait = max(wait, times[0] + self.window - now)
        return wait

    def failed(self, keys: Sequence[str]) -> None:
        now = self._clock()
        with self._lock:
            for key in keys:
                self._recent(key, now)
                times = self._failures.setdefault(key, deque())
                times.append(now)
                self._failures.move_to_end(key)
                while len(times) > self._limit(key):
                    times.popleft()
            while len(self._failures) > MAX_KEYS:
                self._failures.popitem(last=False)

    def succeeded(self, key: str) -> None:
        with self._lock:
            self._failures.pop(key, None)
