"""The GCRA token bucket: burst at once, then one token per interval, due times computed exactly."""

from __future__ import annotations

import pytest

from proxy.layers.bucket import LocalTokenBucket, TokenBucket


def test_burst_tokens_are_free_then_each_is_due_one_interval_later() -> None:
    bucket: TokenBucket = LocalTokenBucket(per_second=10, burst=3)
    assert [bucket.reserve(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert [bucket.reserve(0.0) for _ in range(3)] == [
        pytest.approx(0.1),
        pytest.approx(0.2),
        pytest.approx(0.3),
    ]


def test_tokens_refill_at_the_rate_up_to_the_burst() -> None:
    bucket = LocalTokenBucket(per_second=10, burst=3)
    assert bucket.tokens(0.0) == 3
    for _ in range(3):
        bucket.reserve(0.0)
    assert bucket.tokens(0.0) == 0
    assert bucket.tokens(0.15) == pytest.approx(1.5)
    assert bucket.tokens(100.0) == 3, "never more than the burst"


def test_a_cancelled_reservation_gives_its_token_back() -> None:
    bucket = LocalTokenBucket(per_second=10, burst=1)
    assert bucket.reserve(0.0) == 0.0
    assert bucket.reserve(0.0) == pytest.approx(0.1)
    bucket.cancel(0.0)
    assert bucket.reserve(0.0) == pytest.approx(0.1), "the next one is due where the cancelled one was"


def test_sustained_rate_is_exact() -> None:
    """50/s, burst 1: over 4 s of reservations, tokens are due exactly every 20 ms (200 in 4 s)."""
    bucket = LocalTokenBucket(per_second=50, burst=1)
    due = [bucket.reserve(0.0) for _ in range(201)]
    assert sum(1 for d in due if d < 4.0) == 200
    assert due[200] == pytest.approx(4.0)
