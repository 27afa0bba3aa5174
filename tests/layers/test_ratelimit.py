"""Rate limiter: aiolimiter bucket (burst, then rate), max_wait, provider pauses and the quota kept.

Provider pauses run on a FakeClock (instant, exact). The token bucket itself is
aiolimiter's and runs on loop time, so the few tests that wait for a token use
short real waits (tens of milliseconds) and check bounds, not exact values.
"""

from __future__ import annotations

import asyncio
from email.utils import formatdate

import pytest
from multidict import CIMultiDict
from pydantic import ValidationError

from proxy import errors
from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.config.model import RateLimit
from proxy.layers.ratelimit import RateLimiter, RateLimitLayer
from proxy.layers.retry import RetryLayer
from proxy.pipeline import compose
from proxy.provider_headers import ProviderQuota
from tests.fakes import FakeClock, RecordingUniform, TrackedBody, fake_upstream, make_request, settings_from

SLOW = 1 / 3600
"""A rate so slow no token comes back during a test (one per hour)."""


def _limiter(
    clock: Clock,
    *,
    rate: float = SLOW,
    per: float = 1.0,
    burst: int = 1,
    max_wait: float = 0.0,
    adaptive: bool = True,
) -> RateLimiter:
    settings = RateLimit(rate=rate, per=per, burst=burst, max_wait=max_wait, adaptive=adaptive)
    return RateLimiter("api.test", settings, clock)


async def _take_all(limiter: RateLimiter, limit: int = 1000) -> int:
    """Tokens available right now (max_wait 0 refuses at once when none is left)."""
    taken = 0
    while taken < limit:
        try:
            await limiter.acquire()
        except errors.RateLimited:
            return taken
        taken += 1
    return taken


# --------------------------------------------------------------------------- the bucket


@pytest.mark.parametrize("burst", [1, 5, 20])
async def test_burst_tokens_are_available_at_once_then_refused(burst: int) -> None:
    limiter = _limiter(FakeClock(), burst=burst)
    assert limiter.snapshot()["has_capacity"] is True
    assert await _take_all(limiter) == burst
    assert limiter.snapshot()["has_capacity"] is False


async def test_after_the_burst_tokens_come_at_the_configured_rate() -> None:
    limiter = _limiter(SYSTEM_CLOCK, rate=50, per=1.0, burst=1, max_wait=2.0)
    loop = asyncio.get_running_loop()
    await limiter.acquire()  # the burst
    started = loop.time()
    for _ in range(10):
        await limiter.acquire()
    elapsed = loop.time() - started
    assert elapsed >= 10 / 50 * 0.9, "tokens came faster than 50 per second"
    assert elapsed < 10 / 50 + 0.4


async def test_rate_per_period_uses_per() -> None:
    """`rate: 5, per: 100ms` is 50 per second."""
    limiter = _limiter(SYSTEM_CLOCK, rate=5, per=0.1, burst=1, max_wait=2.0)
    loop = asyncio.get_running_loop()
    await limiter.acquire()
    started = loop.time()
    for _ in range(5):
        await limiter.acquire()
    elapsed = loop.time() - started
    assert 5 / 50 * 0.9 <= elapsed < 5 / 50 + 0.4


async def test_acquire_reports_the_time_waited() -> None:
    limiter = _limiter(SYSTEM_CLOCK, rate=20, burst=1, max_wait=1.0)
    assert await limiter.acquire() == pytest.approx(0, abs=0.01)
    waited = await limiter.acquire()
    assert 0.04 <= waited < 0.5


async def test_the_wait_never_outlasts_the_requests_deadline() -> None:
    """max_wait 5s, but only 100ms of the request's total are left: refused by then, not at 5s."""
    limiter = _limiter(SYSTEM_CLOCK, rate=1, per=1.0, burst=1, max_wait=5.0)
    await limiter.acquire()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(errors.RateLimited):
        await limiter.acquire(deadline=started + 0.1)
    assert loop.time() - started < 0.5


async def test_a_provider_pause_longer_than_the_deadline_is_refused_at_once() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, rate=100, burst=10, max_wait=60.0)
    limiter.observe(CIMultiDict({"Retry-After": "30"}), 429)
    with pytest.raises(errors.RateLimited, match="slow down"):
        await limiter.acquire(deadline=clock.now() + 1.0)
    assert clock.now() == 1_000.0, "no time spent waiting in vain"


async def test_a_wait_longer_than_max_wait_is_rate_limited() -> None:
    limiter = _limiter(SYSTEM_CLOCK, rate=1, per=1.0, burst=1, max_wait=0.05)
    await limiter.acquire()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(errors.RateLimited) as raised:
        await limiter.acquire()
    waited = loop.time() - started
    assert 0.04 <= waited < 0.5, "waited max_wait, not for the token (1 s)"
    error = raised.value
    assert error.status == 429
    assert error.error_type == "rate_limited"
    assert error.retry_after is not None
    assert error.retry_after >= 1
    assert error.headers()["Retry-After"] == "1"


async def test_max_wait_zero_refuses_without_waiting() -> None:
    limiter = _limiter(SYSTEM_CLOCK, rate=1, burst=1, max_wait=0.0)
    await limiter.acquire()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(errors.RateLimited):
        await limiter.acquire()
    assert loop.time() - started < 0.05


# --------------------------------------------------------------------------- provider pauses


async def test_429_with_retry_after_pauses_the_bucket() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, burst=10, max_wait=5.0)
    limiter.observe(CIMultiDict({"Retry-After": "2"}), 429)
    assert limiter.pause_remaining() == pytest.approx(2.0)
    assert limiter.snapshot()["paused_for_seconds"] == pytest.approx(2.0)
    waited = await limiter.acquire()
    assert clock.sleeps == [pytest.approx(2.0)]
    assert waited == pytest.approx(2.0)
    assert limiter.pause_remaining() == 0
    assert await limiter.acquire() == 0, "the pause is over: no more waiting"
    assert clock.sleeps == [pytest.approx(2.0)]


async def test_retry_after_http_date_pauses_until_that_time() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, burst=10, max_wait=60.0)
    limiter.observe(CIMultiDict({"Retry-After": formatdate(clock.wall() + 9, usegmt=True)}), 429)
    assert limiter.pause_remaining() == pytest.approx(9.0)


async def test_the_pause_elapses_with_the_clock() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, burst=10, max_wait=5.0)
    limiter.observe(CIMultiDict({"Retry-After": "3"}), 429)
    clock.advance(1.0)
    assert limiter.pause_remaining() == pytest.approx(2.0)
    await limiter.acquire()
    assert clock.sleeps == [pytest.approx(2.0)]
    clock.advance(10)
    assert limiter.snapshot()["paused_for_seconds"] == 0


PAUSES = [
    pytest.param({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "30"}, 30.0, id="x-delta"),
    pytest.param({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "EPOCH+45"}, 45.0, id="x-epoch"),
    pytest.param({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "EPOCHMS+12"}, 12.0, id="x-epoch-ms"),
    pytest.param({"RateLimit-Remaining": "0", "RateLimit-Reset": "7"}, 7.0, id="ietf-delta"),
]


@pytest.mark.parametrize(("headers", "expected"), PAUSES)
@pytest.mark.parametrize("status", [200, 429])
async def test_remaining_zero_with_a_reset_pauses_until_the_reset(
    headers: dict[str, str], expected: float, status: int
) -> None:
    clock = FakeClock()
    wall = int(clock.wall())
    resolved = {
        name: value.replace("EPOCHMS+12", str((wall + 12) * 1000)).replace("EPOCH+45", str(wall + 45))
        for name, value in headers.items()
    }
    limiter = _limiter(clock, burst=10, max_wait=100.0)
    limiter.observe(CIMultiDict(resolved), status)
    assert limiter.pause_remaining() == pytest.approx(expected)
    assert await limiter.acquire() == pytest.approx(expected)
    assert clock.sleeps == [pytest.approx(expected)]


async def test_quota_left_does_not_pause() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, burst=10, max_wait=5.0)
    limiter.observe(CIMultiDict({"X-RateLimit-Remaining": "1", "X-RateLimit-Reset": "30"}), 200)
    assert limiter.pause_remaining() == 0
    await limiter.acquire()
    assert clock.sleeps == []


async def test_a_pause_longer_than_max_wait_is_refused_at_once() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, burst=10, max_wait=0.5)
    limiter.observe(CIMultiDict({"Retry-After": "20"}), 429)
    clock.advance(5)
    upstream = fake_upstream(200)
    with pytest.raises(errors.RateLimited) as raised:
        await RateLimitLayer(limiter)(make_request(), upstream)
    assert raised.value.retry_after == pytest.approx(15.0)
    assert raised.value.headers()["Retry-After"] == "15"
    assert "429 with Retry-After" in raised.value.message
    assert clock.sleeps == [], "refused without waiting"
    assert upstream.calls == 0
    assert await _take_all(limiter) == 0, "still paused for everybody"


async def test_a_longer_pause_is_not_shortened_by_a_later_shorter_one() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, burst=10, max_wait=100.0)
    limiter.observe(CIMultiDict({"Retry-After": "10"}), 429)
    limiter.observe(CIMultiDict({"Retry-After": "2"}), 429)
    assert limiter.pause_remaining() == pytest.approx(10.0)
    limiter.observe(CIMultiDict({"RateLimit-Remaining": "0", "RateLimit-Reset": "25"}), 200)
    assert limiter.pause_remaining() == pytest.approx(25.0)


async def test_not_adaptive_never_pauses_but_still_records_the_quota() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, burst=10, max_wait=0.0, adaptive=False)
    limiter.observe(
        CIMultiDict(
            {
                "Retry-After": "30",
                "X-RateLimit-Limit": "100",
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": "30",
            }
        ),
        429,
    )
    assert limiter.pause_remaining() == 0
    assert await limiter.acquire() == 0
    assert clock.sleeps == []
    assert limiter.quota == ProviderQuota(
        limit=100, remaining=0, reset_seconds=30.0, observed_at=clock.wall()
    )


# --------------------------------------------------------------------------- the quota as last reported


async def test_snapshot_exposes_the_quota_as_last_reported() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, burst=10, max_wait=5.0)
    assert limiter.snapshot() == {"has_capacity": True, "paused_for_seconds": 0, "provider_quota": None}
    reset_at = int(clock.wall()) + 3600
    limiter.observe(
        CIMultiDict(
            {"X-RateLimit-Limit": "5000", "X-RateLimit-Remaining": "4100", "X-RateLimit-Reset": str(reset_at)}
        ),
        200,
    )
    first_seen = clock.wall()
    assert limiter.snapshot()["provider_quota"] == {
        "limit": 5000,
        "remaining": 4100,
        "reset_seconds": pytest.approx(3600.0),
        "observed_at": first_seen,
    }
    clock.advance(10)
    limiter.observe(CIMultiDict({"Content-Type": "application/json"}), 200)
    assert limiter.snapshot()["provider_quota"] == {
        "limit": 5000,
        "remaining": 4100,
        "reset_seconds": pytest.approx(3600.0),
        "observed_at": first_seen,
    }, "a response without quota headers keeps the last report"
    limiter.observe(CIMultiDict({"RateLimit-Limit": "5000", "RateLimit-Remaining": "900"}), 200)
    assert limiter.quota is not None
    assert (limiter.quota.remaining, limiter.quota.observed_at) == (900, first_seen + 10)


async def test_the_layer_records_the_quota_and_pause_from_each_response() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, burst=10, max_wait=5.0)
    layer = RateLimitLayer(limiter)
    upstream = fake_upstream(
        (429, {"Retry-After": "2", "X-RateLimit-Limit": "60", "X-RateLimit-Remaining": "0"}), 200
    )
    first = await layer(make_request(), upstream)
    assert first.status == 429, "the provider's own 429 is passed on, not replaced"
    assert limiter.quota is not None
    assert (limiter.quota.limit, limiter.quota.remaining) == (60, 0)
    request = make_request()
    second = await layer(request, upstream)
    assert second.status == 200
    assert clock.sleeps == [pytest.approx(2.0)]
    assert request.ratelimit_wait == pytest.approx(2.0)


# --------------------------------------------------------------------------- every attempt takes a token


def _retry(clock: FakeClock, max_attempts: int = 3) -> RetryLayer:
    retries = settings_from(retries={"max_attempts": max_attempts, "on": ["503"]}).retries
    assert retries is not None
    return RetryLayer(retries, "Idempotency-Key", None, clock, uniform=RecordingUniform(0.0))


async def test_every_attempt_takes_a_token() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, burst=10)
    upstream = fake_upstream(503, 503, 200)
    handler = compose([_retry(clock), RateLimitLayer(limiter)], upstream)
    response = await handler(make_request())
    assert response.status == 200
    assert upstream.calls == 3
    assert await _take_all(limiter) == 7, "3 attempts consumed 3 of the 10 tokens"


async def test_a_retry_refused_by_the_limiter_returns_the_previous_upstream_response() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, burst=1, max_wait=0.0)
    upstream = fake_upstream((503, {"X-Attempt": "1"}), 200)
    handler = compose([_retry(clock), RateLimitLayer(limiter)], upstream)
    response = await handler(make_request())
    assert upstream.calls == 1
    assert response.status == 503
    assert response.headers["X-Attempt"] == "1"
    first = upstream.responses[0].body
    assert isinstance(first, TrackedBody)
    assert first.released, "the small body was read and its connection freed before the backoff"


async def test_a_first_attempt_refused_by_the_limiter_is_rate_limited() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, burst=1, max_wait=0.0)
    await limiter.acquire()
    upstream = fake_upstream(200)
    handler = compose([_retry(clock), RateLimitLayer(limiter)], upstream)
    with pytest.raises(errors.RateLimited):
        await handler(make_request())
    assert upstream.calls == 0


async def test_a_non_finite_reset_does_not_break_the_limiter() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, burst=10, max_wait=1.0)
    limiter.observe(CIMultiDict({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "inf"}), 200)
    assert limiter.pause_remaining() == 0.0, "a non-finite reset is ignored, not taken as a pause"
    assert await limiter.acquire() == 0.0, "the token is granted at once"


# --------------------------------------------------------------------------- rate_limit.max_pause


def test_max_pause_is_a_config_key_defaulting_to_five_minutes() -> None:
    assert RateLimit().max_pause == 300.0
    settings = settings_from(rate_limit={"max_pause": "10s"})
    assert settings.rate_limit is not None
    assert settings.rate_limit.max_pause == 10.0
    with pytest.raises(ValidationError):
        settings_from(rate_limit={"max_pause": "0s"})


def test_retry_after_a_day_pauses_at_most_max_pause() -> None:
    clock = FakeClock()
    limiter = RateLimiter("api.test", RateLimit(), clock)
    limiter.observe(CIMultiDict({"Retry-After": "86400"}), 429)
    assert 0 < limiter.pause_remaining() <= 300.0
    clock.advance(300.0)
    assert limiter.pause_remaining() == 0.0


def test_explicit_max_pause_caps_the_pause() -> None:
    settings = settings_from(rate_limit={"max_pause": "10s"})
    assert settings.rate_limit is not None
    limiter = RateLimiter("api.test", settings.rate_limit, FakeClock())
    limiter.observe(CIMultiDict({"Retry-After": "86400"}), 429)
    assert limiter.pause_remaining() == pytest.approx(10.0)
