"""Bulkhead and rate limiting end to end, against aiohttp upstreams that count and time what reaches them.

- the bulkhead serves `max_in_flight + max_queued` and sheds the rest with 503 `overloaded`;
- the limiter shapes saturating load to `rate` (benchmark-style, real time, generous tolerance);
- a wait beyond `max_wait` is a local 429 `rate_limited` with Retry-After;
- `adaptive`: a provider 429 + Retry-After, or (X-)RateLimit-Remaining: 0 + reset, pauses the
  policy: concurrent requests are held (or refused locally), not sent upstream.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from tests.conftest import StartProxy, start_on_own_port
from tests.e2e.upstreams import timed_get
from tests.fakes import ScriptedUpstream


@dataclass
class Counting:
    """An upstream that counts and timestamps requests; optionally slow, optionally scripted."""

    delay: float = 0.0
    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    """Answers for the first requests, in order; afterwards 200."""
    arrivals: list[float] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

    @property
    def hits(self) -> int:
        return len(self.arrivals)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        index = len(self.arrivals)
        self.arrivals.append(asyncio.get_running_loop().time())
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            status, headers = self.script[index] if index < len(self.script) else (200, {})
            return web.Response(status=status, headers=headers, text=f"upstream {status}")
        finally:
            self.in_flight -= 1


# --------------------------------------------------------------------------- bulkhead


async def test_bulkhead_serves_in_flight_plus_queued_and_sheds_the_rest(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    behaviour = Counting(delay=0.1)
    upstream = await ScriptedUpstream(behaviour.handle).start(aiohttp_server)
    base = await start_on_own_port(
        start_proxy,
        upstream.url,
        concurrency={"max_in_flight": 2, "max_queued": 2, "queue_timeout": "300ms"},
    )
    replies = await asyncio.gather(*(timed_get(client, base) for _ in range(8)))
    served = [r for r in replies if r.status == 200]
    shed = [r for r in replies if r.status != 200]
    assert len(served) == 4, [r.status for r in replies]
    assert len(shed) == 4
    for reply in served:
        assert reply.error_type() is None
    for reply in shed:
        assert reply.status == 503
        assert reply.error_type() == "overloaded"
        assert reply.headers.get("retry-after") == "1"
        assert reply.elapsed < 0.1, "shed at once, not after queue_timeout"
    assert behaviour.hits == 4
    assert behaviour.max_in_flight == 2
    assert max(r.elapsed for r in served) >= 0.19, "two of them waited in the queue for a slot"


async def test_bulkhead_queue_timeout_answers_overloaded(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    behaviour = Counting(delay=1.0)
    upstream = await ScriptedUpstream(behaviour.handle).start(aiohttp_server)
    base = await start_on_own_port(
        start_proxy,
        upstream.url,
        concurrency={"max_in_flight": 1, "max_queued": 5, "queue_timeout": "200ms"},
    )
    first, second = await asyncio.gather(timed_get(client, base), timed_get(client, base))
    slow, queued = (first, second) if first.status == 200 else (second, first)
    assert slow.status == 200
    assert queued.status == 503
    assert queued.error_type() == "overloaded"
    assert 0.18 <= queued.elapsed < 0.9, "gave up after queue_timeout, before the slot came back"
    assert behaviour.hits == 1


# --------------------------------------------------------------------------- rate limit


RATE = 50
WINDOW = 4.0


async def test_rate_limit_accuracy_under_saturating_load(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    """rate 50/s, burst 1, 20 workers for 4 s: the upstream sees 200 +/- 10% attempts in that window."""
    behaviour = Counting()
    upstream = await ScriptedUpstream(behaviour.handle).start(aiohttp_server)
    base = await start_on_own_port(
        start_proxy, upstream.url, rate_limit={"rate": RATE, "per": "1s", "burst": 1, "max_wait": "10s"}
    )
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + WINDOW + 0.5
    statuses: list[int] = []

    async def worker() -> None:
        for _ in range(1000):  # bounded: at most 1000 requests per worker
            if loop.time() >= stop_at:
                return
            reply = await timed_get(client, base)
            statuses.append(reply.status)

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(20))), timeout=WINDOW + 10)
    assert set(statuses) == {200}, "max_wait is large: nothing is refused locally"
    start = behaviour.arrivals[0]
    in_window = sum(1 for t in behaviour.arrivals if start <= t < start + WINDOW)
    expected = RATE * WINDOW
    print(f"rate-limit accuracy: {in_window} attempts in {WINDOW:g}s (expected {expected:g})")
    assert expected * 0.9 <= in_window <= expected * 1.1, in_window


async def test_a_burst_beyond_max_wait_is_answered_429_locally(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    behaviour = Counting()
    upstream = await ScriptedUpstream(behaviour.handle).start(aiohttp_server)
    base = await start_on_own_port(
        start_proxy, upstream.url, rate_limit={"rate": 5, "per": "1s", "burst": 2, "max_wait": "50ms"}
    )
    replies = await asyncio.gather(*(timed_get(client, base) for _ in range(10)))
    served = [r for r in replies if r.status == 200]
    limited = [r for r in replies if r.status == 429]
    assert len(served) + len(limited) == 10
    assert 2 <= len(served) <= 3, "the burst, plus at most one token refilled within max_wait"
    assert len(limited) >= 7
    for reply in limited:
        assert reply.error_type() == "rate_limited"
        retry_after = reply.headers.get("retry-after")
        assert retry_after is not None
        assert int(retry_after) >= 1
        assert reply.elapsed < 0.5, "refused after max_wait, not after the token came"
    assert behaviour.hits == len(served), "refused requests never reached the upstream"


# --------------------------------------------------------------------------- adaptive pauses

PROVIDER_SIGNALS = [
    pytest.param(429, {"Retry-After": "1"}, id="429-retry-after"),
    pytest.param(
        200,
        {"X-RateLimit-Limit": "10", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1"},
        id="x-ratelimit",
    ),
    pytest.param(
        200, {"RateLimit-Limit": "10", "RateLimit-Remaining": "0", "RateLimit-Reset": "1"}, id="ratelimit"
    ),
]
GENEROUS = {"rate": 1000, "per": "1s", "burst": 1000}
"""A local limit that never binds: any waiting is the provider's pause."""


@pytest.mark.parametrize(("status", "headers"), PROVIDER_SIGNALS)
async def test_provider_pause_holds_concurrent_requests_until_the_reset(
    aiohttp_server: AiohttpServer,
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
    status: int,
    headers: dict[str, str],
) -> None:
    behaviour = Counting(script=[(status, headers)])
    upstream = await ScriptedUpstream(behaviour.handle).start(aiohttp_server)
    base = await start_on_own_port(
        start_proxy, upstream.url, rate_limit={**GENEROUS, "max_wait": "3s", "adaptive": True}
    )
    first = await timed_get(client, base)
    assert first.status == status
    assert first.error_type() is None, "the provider's own answer is passed on"
    signalled_at = first.finished
    tasks = [asyncio.create_task(timed_get(client, base)) for _ in range(5)]
    await asyncio.sleep(0.5)
    assert behaviour.hits == 1, "nothing is sent upstream during the pause"
    assert not any(t.done() for t in tasks), "they wait (max_wait allows it)"
    replies = await asyncio.gather(*tasks)
    assert [r.status for r in replies] == [200] * 5
    assert behaviour.hits == 6
    for arrival in behaviour.arrivals[1:]:
        assert arrival >= signalled_at + 0.9, "sent only after the provider's reset"
    assert max(r.finished for r in replies) < signalled_at + 2.5


@pytest.mark.parametrize(("status", "headers"), PROVIDER_SIGNALS)
async def test_provider_pause_beyond_max_wait_is_refused_locally(
    aiohttp_server: AiohttpServer,
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
    status: int,
    headers: dict[str, str],
) -> None:
    behaviour = Counting(script=[(status, headers)])
    upstream = await ScriptedUpstream(behaviour.handle).start(aiohttp_server)
    base = await start_on_own_port(
        start_proxy, upstream.url, rate_limit={**GENEROUS, "max_wait": "200ms", "adaptive": True}
    )
    first = await timed_get(client, base)
    assert first.status == status
    replies = await asyncio.gather(*(timed_get(client, base) for _ in range(5)))
    for reply in replies:
        assert reply.status == 429
        assert reply.error_type() == "rate_limited"
        assert reply.headers.get("retry-after") == "1"
        assert reply.elapsed < 0.15, "refused at once: the pause is longer than max_wait"
    assert behaviour.hits == 1
    await asyncio.sleep(max(0.0, first.finished + 1.1 - asyncio.get_running_loop().time()))
    after = await timed_get(client, base)
    assert after.status == 200
    assert after.error_type() is None
    assert behaviour.hits == 2


async def test_without_adaptive_the_provider_429_does_not_pause(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    behaviour = Counting(script=[(429, {"Retry-After": "1"})])
    upstream = await ScriptedUpstream(behaviour.handle).start(aiohttp_server)
    base = await start_on_own_port(
        start_proxy, upstream.url, rate_limit={**GENEROUS, "max_wait": "3s", "adaptive": False}
    )
    first = await timed_get(client, base)
    assert first.status == 429
    replies = await asyncio.gather(*(timed_get(client, base) for _ in range(5)))
    assert [r.status for r in replies] == [200] * 5
    assert all(r.elapsed < 0.5 for r in replies)
    assert behaviour.hits == 6
