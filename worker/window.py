"""The bulk window: the hours of the day in which workers take ``bulk`` work as well as ``live``.

``20:00-06:00`` is read in the local time zone of the host that applies it (the ``TZ`` of the
worker, or of ``bonewatch process``), and may run past midnight. Outside it, workers take
``live`` only; a batch already claimed when it closes still finishes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, time, timedelta

_SPEC = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")
# An ETA walks at most this many windows ahead (more than a year of nights).
_MOST_WINDOWS = 400


class WindowError(ValueError):
    """A bulk window that is not ``HH:MM-HH:MM``."""


@dataclass(frozen=True)
class BulkWindow:
    """A daily window from ``start`` to ``end`` (local wall-clock times; past midnight when
    ``end`` comes before ``start``)."""

    start: time
    end: time

    @classmethod
    def parse(cls, spec: str) -> BulkWindow:
        """``"20:00-06:00"`` -> a window.

        Raises:
            WindowError: not two ``HH:MM`` times joined by ``-``, a time out of range, or an
                empty window (both times equal).
        """
        match = _SPEC.match(spec)
        if match is None:
            raise WindowError(f"bulk window {spec!r} is not HH:MM-HH:MM (e.g. 20:00-06:00)")
        h1, m1, h2, m2 = (int(g) for g in match.groups())
        if not (h1 < 24 and h2 < 24 and m1 < 60 and m2 < 60):
            raise WindowError(f"bulk window {spec!r} has a time past 23:59")
        if (h1, m1) == (h2, m2):
            raise WindowError(f"bulk window {spec!r} is empty (it starts when it ends)")
        return cls(time(h1, m1), time(h2, m2))

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"

    def is_open(self, when: datetime) -> bool:
        """Whether ``when`` (timezone-aware) falls inside the window, in local time."""
        now = when.astimezone().time()
        if self.start < self.end:
            return self.start <= now < self.end
        return now >= self.start or now < self.end

    def opens_at(self, when: datetime) -> datetime:
        """The first opening at or after ``when``; ``when`` itself while the window is open."""
        if self.is_open(when):
            return when
        return _next_local(when, self.start)

    def closes_at(self, when: datetime) -> datetime:
        """The next closing after ``when`` (the end of the window open at ``when``, or of the
        next one)."""
        return _next_local(when, self.end)

    def finish_time(self, when: datetime, work_seconds: float) -> datetime:
        """When ``work_seconds`` of work started at ``when`` ends, working inside the window
        only."""
        left = max(work_seconds, 0.0)
        t = when
        for _ in range(_MOST_WINDOWS):
            t = self.opens_at(t)
            close = self.closes_at(t)
            span = (close - t).total_seconds()
            if left <= span:
                return t + timedelta(seconds=left)
            left -= span
            t = close
        return t + timedelta(seconds=left)


def _next_local(when: datetime, at: time) -> datetime:
    """The first local wall-clock ``at`` strictly after ``when`` (an aware datetime)."""
    local = when.astimezone()
    candidate = datetime.combine(local.date(), at).astimezone()
    while candidate <= when:
        local_next = candidate.astimezone().date() + timedelta(days=1)
        candidate = datetime.combine(local_next, at).astimezone()
    return candidate


def parse_window(spec: str | None) -> BulkWindow | None:
    """The window of a setting: None (unset, or empty) means bulk work at any hour."""
    if spec is None or not spec.strip():
        return None
    return BulkWindow.parse(spec)
