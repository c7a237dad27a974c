"""Tests for db/backoff.py: the one retry delay formula."""

from __future__ import annotations

import random

from bonewatch.db import retry_delay


def test_the_cap_bounds_the_jittered_delay() -> None:
    rng = random.Random(0)
    delays = [retry_delay(a, base=2, cap=5, rng=rng) for a in range(1, 200) for _ in range(5)]
    assert max(delays) <= 5
    # Jitter still spreads a batch apart at the cap, by up to a quarter below it.
    capped = [retry_delay(9, base=2, cap=5, rng=rng) for _ in range(200)]
    assert min(capped) >= 3.75 and len(set(capped)) > 1


def test_without_rng_the_nominal_delay_which_jitter_exceeds_by_a_quarter_at_most() -> None:
    rng = random.Random(1)
    for attempts in range(1, 12):
        nominal = retry_delay(attempts, base=2, cap=60)
        assert nominal == min(60, 2 * 2 ** (attempts - 1))
        draws = [retry_delay(attempts, base=2, cap=60, rng=rng) for _ in range(100)]
        assert 0.75 * nominal <= min(draws) and max(draws) <= min(60, 1.25 * nominal)


def test_first_retry_zero_base_and_huge_attempt_counts() -> None:
    assert retry_delay(0, base=2, cap=60) == retry_delay(1, base=2, cap=60) == 2
    assert retry_delay(10_000, base=2, cap=60) == 60
    assert retry_delay(3, base=0, cap=60, rng=random.Random(2)) == 0
