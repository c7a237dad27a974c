"""The one backoff formula for retries: the ledger's transient failures and the worker's outages."""

from __future__ import annotations

import random

# Spread of the jitter around the nominal delay: ±25 %.
JITTER = 0.25
# 2**64 times any base is past any sensible cap, and a float does not overflow on the way.
_MAX_DOUBLINGS = 64


def retry_delay(
    attempts: int, *, base: float, cap: float, rng: random.Random | None = None
) -> float:
    """Seconds to wait before retry number ``attempts`` (1 for the first retry).

    Exponential backoff: base, 2·base, 4·base … With ``rng``, jittered by ±25 % (drawn from it)
    so that the retries of a batch spread apart; without, the nominal delay, which a jittered
    one never exceeds by more than 25 %. Never more than ``cap`` seconds, jitter included.
    """
    delay = min(cap, base * 2.0 ** min(max(attempts - 1, 0), _MAX_DOUBLINGS))
    if rng is not None:
        delay = min(cap, delay * rng.uniform(1 - JITTER, 1 + JITTER))
    return delay
