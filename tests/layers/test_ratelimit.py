"""Rate limiter: the bucket (burst, then rate), max_wait, provider pauses, learned pacing, the
priority queue (order, eviction, deadline refusal) and the quota kept.

Almost everything runs on a FakeClock: `clock.run(...)` moves the time to the limiter's next
timer whenever nothing else can happen, so waits are exact and instant. A few tests check
that the real clock's timers give the same answer.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from email.utils import formatdate

import pytest
from multidict import CIMultiDict
from pydantic import ValidationError

from proxy import errors
from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.config.model import RateLimit
from proxy.exchange import ProxyRequest, ProxyResponse
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


async def test_a_wait_longer_than_max_wait_is_refused_at_once() -> None:
    """The next token is 1 s away and max_wait is 50 ms: refused now, not after 50 ms in vain."""
    clock = FakeClock()
    limiter = _limiter(clock, rate=1, per=1.0, burst=1, max_wait=0.05)
    await limiter.acquire()
    with pytest.raises(errors.RateLimited) as raised:
        await limiter.acquire()
    assert clock.now() == 1_000.0, "no time spent waiting"
    error = raised.value
    assert error.status == 429
    assert error.error_type == "rate_limited"
    assert error.retry_after == pytest.approx(1.0), "when the token will be there"
    assert error.headers()["Retry-After"] == "1"
    assert "local rate limit" in error.message
    assert limiter.snapshot()["tokens"] == 0, "the refused request took no token"
    clock.advance(1.0)
    assert await limiter.acquire() == 0.0, "the token came back on time"


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
    waited = await clock.run(limiter.acquire())
    assert clock.now() == pytest.approx(1_002.0)
    assert waited == pytest.approx(2.0)
    assert limiter.pause_remaining() == 0
    assert await limiter.acquire() == 0, "the pause is over: no more waiting"
    assert clock.next_timer() is None


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
    assert await clock.run(limiter.acquire()) == pytest.approx(2.0)
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
    assert await clock.run(limiter.acquire()) == pytest.approx(expected)
    assert clock.now() == pytest.approx(1_000.0 + expected)


async def test_quota_left_does_not_pause() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, burst=10, max_wait=5.0)
    limiter.observe(CIMultiDict({"X-RateLimit-Remaining": "1", "X-RateLimit-Reset": "30"}), 200)
    assert limiter.pause_remaining() == 0
    assert await limiter.acquire() == 0.0


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
    assert clock.now() == 1_005.0, "refused without waiting"
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
        limit=100, remaining=0, reset_seconds=30.0, observed_at=clock.wall(), dialect="x-ratelimit"
    )


# --------------------------------------------------------------------------- the quota as last reported


async def test_snapshot_exposes_the_quota_as_last_reported() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, burst=10, max_wait=5.0)
    assert limiter.snapshot() == {
        "scope": "local",
        "has_capacity": True,
        "tokens": 10.0,
        "paused_for_seconds": 0,
        "queued": {"high": 0, "normal": 0, "low": 0},
        "pacing": None,
        "provider_quota": None,
    }
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
        "dialect": "x-ratelimit",
    }
    clock.advance(10)
    limiter.observe(CIMultiDict({"Content-Type": "application/json"}), 200)
    assert limiter.snapshot()["provider_quota"] == {
        "limit": 5000,
        "remaining": 4100,
        "reset_seconds": pytest.approx(3600.0),
        "observed_at": first_seen,
        "dialect": "x-ratelimit",
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
    second = await clock.run(layer(request, upstream))
    assert second.status == 200
    assert clock.now() == pytest.approx(1_002.0)
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


# --------------------------------------------------------------------------- the priority queue


def _queue_limiter(clock: FakeClock, *, max_queued: int = 1000, max_wait: float = 60.0) -> RateLimiter:
    """10 per second, burst 1, the one token already taken: every acquire from here on queues."""
    settings = RateLimit(rate=10, per=1.0, burst=1, max_wait=max_wait, max_queued=max_queued)
    limiter = RateLimiter("api.test", settings, clock)
    return limiter


async def _served_in_order(
    clock: FakeClock, limiter: RateLimiter, arrivals: list[tuple[str, str]]
) -> tuple[list[str], dict[str, BaseException]]:
    """Queue `arrivals` (name, priority) one after another; the names in the order they got a token,
    and the refusals by name."""
    assert await limiter.acquire() == 0.0  # the burst: everybody after this waits
    order: list[str] = []
    refused: dict[str, BaseException] = {}

    async def one(name: str, priority: str) -> None:
        try:
            await limiter.acquire(priority=priority)
        except errors.RateLimited as exc:
            refused[name] = exc
        else:
            order.append(name)

    tasks = []
    for name, priority in arrivals:
        tasks.append(asyncio.create_task(one(name, priority)))
        await asyncio.sleep(0)  # each is queued before the next arrives
    await clock.run(asyncio.gather(*tasks))
    return order, refused


async def test_waiters_are_served_by_priority_then_first_come_first_served() -> None:
    clock = FakeClock()
    limiter = _queue_limiter(clock)
    arrivals = [
        ("low1", "low"),
        ("n1", "normal"),
        ("high1", "high"),
        ("low2", "low"),
        ("n2", "normal"),
        ("high2", "high"),
    ]
    order, refused = await _served_in_order(clock, limiter, arrivals)
    assert refused == {}
    assert order == ["high1", "high2", "n1", "n2", "low1", "low2"]
    assert clock.now() == pytest.approx(1_000.6), "one every 100 ms, exactly"


async def test_tokens_are_due_from_the_bucket_exactly() -> None:
    clock = FakeClock()
    limiter = _queue_limiter(clock)
    await limiter.acquire()
    started = clock.now()
    granted: list[float] = []

    async def one() -> None:
        await limiter.acquire()
        granted.append(clock.now() - started)

    await clock.run(asyncio.gather(*(one() for _ in range(5))))
    assert granted == [pytest.approx(0.1 * n) for n in range(1, 6)]


async def test_a_higher_priority_arrival_into_a_full_queue_evicts_the_newest_lowest() -> None:
    clock = FakeClock()
    limiter = _queue_limiter(clock, max_queued=3)
    arrivals = [("low1", "low"), ("low2", "low"), ("n1", "normal"), ("high1", "high")]
    order, refused = await _served_in_order(clock, limiter, arrivals)
    assert order == ["high1", "n1", "low1"]
    assert set(refused) == {"low2"}, "the newest of the lowest priority made room"
    evicted = refused["low2"]
    assert isinstance(evicted, errors.RateLimited)
    assert evicted.status == 429
    assert evicted.retry_after is not None
    assert "full" in evicted.message


async def test_an_arrival_of_the_lowest_priority_into_a_full_queue_is_refused() -> None:
    clock = FakeClock()
    limiter = _queue_limiter(clock, max_queued=2)
    arrivals = [("n1", "normal"), ("low1", "low"), ("low2", "low"), ("n2", "normal")]
    order, refused = await _served_in_order(clock, limiter, arrivals)
    assert set(refused) == {"low2", "low1"}, "low2 refused on arrival, then low1 evicted by n2"
    assert order == ["n1", "n2"]


async def test_a_full_queue_of_one_priority_refuses_that_priority() -> None:
    clock = FakeClock()
    limiter = _queue_limiter(clock, max_queued=2)
    order, refused = await _served_in_order(clock, limiter, [("a", "high"), ("b", "high"), ("c", "high")])
    assert order == ["a", "b"]
    assert set(refused) == {"c"}
    assert limiter.snapshot()["queued"] == {"high": 0, "normal": 0, "low": 0}


async def test_max_queued_zero_refuses_whoever_would_wait() -> None:
    clock = FakeClock()
    limiter = _queue_limiter(clock, max_queued=0)
    await limiter.acquire()
    with pytest.raises(errors.RateLimited, match="full"):
        await limiter.acquire(priority="high")
    assert clock.now() == 1_000.0


async def test_a_wait_longer_than_the_deadline_is_refused_at_once() -> None:
    """20 wait ahead (2 s at 10/s): a request with 200 ms left is refused now, with Retry-After."""
    clock = FakeClock()
    limiter = _queue_limiter(clock)
    await limiter.acquire()
    waiting = [asyncio.create_task(limiter.acquire()) for _ in range(20)]
    await asyncio.sleep(0)
    assert limiter.queue_lengths()["normal"] == 20
    with pytest.raises(errors.RateLimited) as raised:
        await limiter.acquire(deadline=clock.now() + 0.2)
    assert clock.now() == 1_000.0, "not a moment waited in vain"
    assert raised.value.retry_after == pytest.approx(2.1)
    assert raised.value.headers()["Retry-After"] == "3"
    await clock.run(asyncio.gather(*waiting))


async def test_a_high_priority_request_with_a_short_deadline_goes_ahead_of_the_queue() -> None:
    clock = FakeClock()
    limiter = _queue_limiter(clock)
    await limiter.acquire()
    waiting = [asyncio.create_task(limiter.acquire()) for _ in range(20)]
    await asyncio.sleep(0)
    waited = await clock.run(limiter.acquire(deadline=clock.now() + 0.25, priority="high"))
    assert waited == pytest.approx(0.1), "the next token is its own"
    await clock.run(asyncio.gather(*waiting))


async def test_a_waiter_pushed_past_its_max_wait_is_refused_then() -> None:
    """Admitted with 0.2 s expected (max_wait 0.25 s); three high arrivals push it to 0.5 s."""
    clock = FakeClock()
    limiter = _queue_limiter(clock, max_wait=0.25)
    await limiter.acquire()
    first = asyncio.create_task(limiter.acquire(priority="low"))
    pushed = asyncio.create_task(limiter.acquire(priority="low"))
    await asyncio.sleep(0)
    highs = [asyncio.create_task(limiter.acquire(priority="high")) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(errors.RateLimited):
        await clock.run(pushed)
    assert clock.now() == pytest.approx(1_000.25), "refused when its max_wait ran out"
    await clock.run(asyncio.gather(*highs))
    with pytest.raises(errors.RateLimited):
        await clock.run(first)  # pushed back too: 0.3 s > 0.25 s


async def test_a_cancelled_waiter_leaves_the_queue_and_its_token_goes_back() -> None:
    clock = FakeClock()
    limiter = _queue_limiter(clock)
    await limiter.acquire()
    task = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)
    assert limiter.queue_lengths()["normal"] == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert limiter.queue_lengths()["normal"] == 0
    assert clock.next_timer() is None, "nobody waits: no timer"
    clock.advance(0.1)
    assert await limiter.acquire() == 0.0, "the token reserved for the cancelled waiter is there"


async def test_a_waiter_cancelled_as_its_token_comes_leaves_the_token_to_the_next() -> None:
    """Cancelling a task cancels the future it awaits at once, but the task resumes (and leaves the
    queue) only on the next loop turn; a timer due in between (the deadline's and the token's
    fire together) must not serve the cancelled waiter."""
    clock = FakeClock()
    limiter = _queue_limiter(clock)
    await limiter.acquire()
    cancelled = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)
    after = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)
    cancelled.cancel()
    clock.advance(0.1)  # the token is due before `cancelled` resumes
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert await after == pytest.approx(0.1), "the token went to the next waiter"
    assert limiter.queue_lengths()["normal"] == 0


async def test_a_waiter_cancelled_as_its_max_wait_runs_out_is_not_refused_too() -> None:
    clock = FakeClock()
    limiter = _queue_limiter(clock, max_wait=0.25)
    await limiter.acquire()
    pushed = asyncio.create_task(limiter.acquire(priority="low"))
    await asyncio.sleep(0)
    highs = [asyncio.create_task(limiter.acquire(priority="high")) for _ in range(2)]
    await asyncio.sleep(0)
    pushed.cancel()
    clock.advance(0.25)  # the highs are served, then its max_wait runs out, before it resumes
    with pytest.raises(asyncio.CancelledError):
        await pushed
    await clock.run(asyncio.gather(*highs))  # both served (the clock ran on before they resumed)
    assert clock.next_timer() is None, "nobody waits: no timer"


async def test_a_cancelled_waiter_evicted_by_a_higher_priority_arrival_makes_room() -> None:
    clock = FakeClock()
    limiter = _queue_limiter(clock, max_queued=1)
    await limiter.acquire()
    low = asyncio.create_task(limiter.acquire(priority="low"))
    await asyncio.sleep(0)
    high = asyncio.create_task(limiter.acquire(priority="high"))
    low.cancel()  # `high` runs first, and finds `low` still queued
    await asyncio.sleep(0)
    with pytest.raises(asyncio.CancelledError):
        await low
    assert await clock.run(high) == pytest.approx(0.1)


async def test_the_fast_path_sets_no_timer() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, burst=5)
    for _ in range(5):
        assert await limiter.acquire() == 0.0
    assert clock.next_timer() is None


_TIMER_GRANULARITY_S = 0.002
"""uvloop rounds timers to the millisecond: one may fire a hair before its due time."""


async def test_real_clock_timers_serve_the_queue_on_time() -> None:
    limiter = _limiter(SYSTEM_CLOCK, rate=50, per=1.0, burst=1, max_wait=2.0)
    await limiter.acquire()
    loop = asyncio.get_running_loop()
    started = loop.time()
    waited = await asyncio.gather(*(limiter.acquire(priority="low") for _ in range(10)))
    elapsed = loop.time() - started
    assert 10 / 50 - _TIMER_GRANULARITY_S <= elapsed < 10 / 50 + 0.05
    assert max(waited) == pytest.approx(0.2, abs=0.02)


# --------------------------------------------------------------------------- learned pacing


def _pacing_limiter(clock: FakeClock) -> RateLimiter:
    """A local limit far above the provider's: the provider's quota decides."""
    return RateLimiter("api.test", RateLimit(rate=1000, burst=1000, max_wait=60.0), clock)


async def test_remaining_n_for_t_seconds_are_spread_over_t() -> None:
    clock = FakeClock()
    limiter = _pacing_limiter(clock)
    limiter.observe(
        CIMultiDict({"RateLimit-Limit": "10", "RateLimit-Remaining": "4", "RateLimit-Reset": "2"}), 200
    )
    pacing = limiter.snapshot()["pacing"]
    assert pacing == {"rate_per_second": 2.0, "until_seconds": 2.0, "remaining": 4}
    started = clock.now()
    sent: list[float] = []

    async def one() -> None:
        await limiter.acquire()
        sent.append(clock.now() - started)

    await clock.run(asyncio.gather(*(one() for _ in range(4))))
    assert sent == [pytest.approx(t) for t in (0.0, 0.5, 1.0, 1.5)], "four over two seconds, none in a burst"
    clock.set(started + 2.0)
    assert limiter.snapshot()["pacing"] is None, "the reset ends the pacing"
    assert [await limiter.acquire() for _ in range(3)] == [0.0, 0.0, 0.0]


async def test_pacing_counts_the_attempts_already_in_flight() -> None:
    clock = FakeClock()
    limiter = _pacing_limiter(clock)
    limiter.in_flight = 2
    limiter.observe(CIMultiDict({"X-RateLimit-Remaining": "6", "X-RateLimit-Reset": "2"}), 200)
    assert limiter.snapshot()["pacing"] == {"rate_per_second": 2.0, "until_seconds": 2.0, "remaining": 4}
    limiter.observe(CIMultiDict({"X-RateLimit-Remaining": "2", "X-RateLimit-Reset": "2"}), 200)
    assert limiter.snapshot()["pacing"] == {"rate_per_second": 2.0, "until_seconds": 2.0, "remaining": 4}, (
        "none left once those in flight are counted: a pause, not a pace"
    )
    assert limiter.pause_remaining() == pytest.approx(2.0)


async def test_a_generous_quota_does_not_pace() -> None:
    clock = FakeClock()
    limiter = RateLimiter("api.test", RateLimit(rate=10, burst=1, max_wait=1.0), clock)
    limiter.observe(CIMultiDict({"X-RateLimit-Remaining": "4000", "X-RateLimit-Reset": "60"}), 200)
    assert limiter.snapshot()["pacing"] is None, "67/s allowed, 10/s configured: our bucket binds"


async def test_a_paced_wait_longer_than_max_wait_is_refused_with_when() -> None:
    clock = FakeClock()
    limiter = RateLimiter("api.test", RateLimit(rate=1000, burst=1000, max_wait=0.1), clock)
    limiter.observe(CIMultiDict({"X-RateLimit-Remaining": "2", "X-RateLimit-Reset": "10"}), 200)
    assert await limiter.acquire() == 0.0
    with pytest.raises(errors.RateLimited, match="pacing") as raised:
        await limiter.acquire()
    assert raised.value.retry_after == pytest.approx(5.0)


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"RateLimit": '"default";r=3;t=6', "RateLimit-Policy": '"default";q=10;w=6'}, id="ietf"),
        pytest.param({"RateLimit": "limit=10, remaining=3, reset=6"}, id="ietf-older"),
        pytest.param({"RateLimit-Remaining": "3", "RateLimit-Reset": "6"}, id="ratelimit"),
        pytest.param({"X-RateLimit-Remaining": "3", "X-RateLimit-Reset": "EPOCH+6"}, id="github"),
        pytest.param(
            {"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "6s"}, id="openai"
        ),
        pytest.param(
            {
                "anthropic-ratelimit-requests-remaining": "3",
                "anthropic-ratelimit-requests-reset": "RFC3339+6",
            },
            id="anthropic",
        ),
    ],
)
async def test_every_dialect_paces(headers: dict[str, str]) -> None:
    clock = FakeClock()
    wall = int(clock.wall())
    resolved = {
        name: value.replace("EPOCH+6", str(wall + 6)).replace(
            "RFC3339+6", datetime.fromtimestamp(wall + 6, tz=UTC).isoformat().replace("+00:00", "Z")
        )
        for name, value in headers.items()
    }
    limiter = _pacing_limiter(clock)
    limiter.observe(CIMultiDict(resolved), 200)
    assert limiter.snapshot()["pacing"] == {"rate_per_second": 0.5, "until_seconds": 6.0, "remaining": 3}


# --------------------------------------------------------------------------- pooled keys


async def test_a_pooled_keys_429_does_not_pause_the_host_but_its_quota_is_kept() -> None:
    clock = FakeClock()
    limiter = _pacing_limiter(clock)
    layer = RateLimitLayer(limiter)

    async def through_key_1(request: ProxyRequest) -> ProxyResponse:
        request.credential_key = 1  # what the credentials layer below records
        return await fake_upstream(
            (
                429,
                {
                    "Retry-After": "30",
                    "X-RateLimit-Limit": "60",
                    "X-RateLimit-Remaining": "0",
                    "X-RateLimit-Reset": "30",
                },
            )
        )(request)

    response = await layer(make_request(), through_key_1)
    assert response.status == 429
    assert limiter.pause_remaining() == 0, "the key rests (credentials layer), not the host"
    assert limiter.snapshot()["pacing"] is None
    assert limiter.quota is not None
    assert (limiter.quota.limit, limiter.quota.remaining) == (60, 0), "still shown in /state"
    assert await limiter.acquire() == 0.0


async def test_a_pooled_keys_quota_does_not_pace_the_host() -> None:
    clock = FakeClock()
    limiter = _pacing_limiter(clock)

    async def through_key_0(request: ProxyRequest) -> ProxyResponse:
        request.credential_key = 0
        return await fake_upstream((200, {"X-RateLimit-Remaining": "1", "X-RateLimit-Reset": "30"}))(request)

    await RateLimitLayer(limiter)(make_request(), through_key_0)
    assert limiter.snapshot()["pacing"] is None
    assert limiter.pause_remaining() == 0


async def test_without_a_key_pool_the_same_answer_pauses_the_host() -> None:
    clock = FakeClock()
    limiter = _pacing_limiter(clock)
    upstream = fake_upstream((429, {"Retry-After": "30"}))
    await RateLimitLayer(limiter)(make_request(), upstream)
    assert limiter.pause_remaining() == pytest.approx(30.0)


async def test_the_layer_counts_attempts_in_flight() -> None:
    clock = FakeClock()
    limiter = _pacing_limiter(clock)
    seen: list[int] = []

    async def upstream(request: ProxyRequest) -> ProxyResponse:
        seen.append(limiter.in_flight)
        return await fake_upstream(200)(request)

    await RateLimitLayer(limiter)(make_request(), upstream)
    assert seen == [1]
    assert limiter.in_flight == 0


async def test_the_layer_passes_the_requests_priority() -> None:
    clock = FakeClock()
    limiter = _queue_limiter(clock, max_queued=1)
    await limiter.acquire()
    layer = RateLimitLayer(limiter)
    low = make_request()
    low.priority = "low"
    low_task = asyncio.create_task(layer(low, fake_upstream(200)))
    await asyncio.sleep(0)
    high = make_request()
    high.priority = "high"
    response = await clock.run(layer(high, fake_upstream(200)))
    assert response.status == 200
    with pytest.raises(errors.RateLimited):
        await low_task
