"""Bulkhead and rate limiting end to end, against aiohttp upstreams that count and time what reaches them.

- the bulkhead serves `max_in_flight + max_queued` and sheds the rest with 503 `overloaded`;
- the limiter shapes saturating load to `rate` (benchmark-style, real time, generous tolerance);
- a wait beyond `max_wait` is a local 429 `rate_limited` with Retry-After, at once;
- `adaptive`: a provider 429 + Retry-After, or (X-)RateLimit-Remaining: 0 + reset, pauses the
  policy: concurrent requests are held (or refused locally), not sent upstream;
- learned quotas: an upstream that enforces a small window and announces it in any of the
  header dialects we read is paced, never overrun (it answers no 429);
- the priority queue: high before normal before low, the lowest shed first from a full queue,
  and a request whose deadline cannot be met refused at once.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime

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
    """rate 50/s, burst 1, 20 workers for 4 s: the upstream sees 200 +/- 5% attempts in that window."""
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
    assert expected * 0.95 <= in_window <= expected * 1.05, in_window


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


# --------------------------------------------------------------------------- learned quotas


def _announce(
    dialect: str, limit: int, remaining: int, reset: float, window_end_wall: float
) -> dict[str, str]:
    """The quota as the provider of `dialect` writes it (whole seconds rounded up, as providers do)."""
    seconds = str(math.ceil(reset))
    if dialect == "ietf":
        return {
            "RateLimit": f'"default";r={remaining};t={seconds}',
            "RateLimit-Policy": f'"default";q={limit};w=2',
        }
    if dialect == "ietf-older":
        return {"RateLimit": f"limit={limit}, remaining={remaining}, reset={seconds}"}
    if dialect == "ratelimit":
        return {
            "RateLimit-Limit": str(limit),
            "RateLimit-Remaining": str(remaining),
            "RateLimit-Reset": seconds,
        }
    if dialect == "github":
        epoch = str(math.ceil(window_end_wall))
        return {
            "X-RateLimit-Limit": str(limit),
            "X-RateLimit-Remaining": str(remaining),
            "X-RateLimit-Reset": epoch,
        }
    if dialect == "openai":
        return {
            "x-ratelimit-limit-requests": str(limit),
            "x-ratelimit-remaining-requests": str(remaining),
            "x-ratelimit-reset-requests": f"{reset:.3f}s",
        }
    assert dialect == "anthropic"
    when = datetime.fromtimestamp(math.ceil(window_end_wall), tz=UTC).isoformat().replace("+00:00", "Z")
    return {
        "anthropic-ratelimit-requests-limit": str(limit),
        "anthropic-ratelimit-requests-remaining": str(remaining),
        "anthropic-ratelimit-requests-reset": when,
    }


@dataclass
class QuotaUpstream:
    """Enforces `limit` requests per fixed `window` (from its first request), answers 429 beyond
    it, and announces its quota on every answer in `dialect`."""

    dialect: str
    limit: int = 10
    window: float = 2.0
    window_start: float | None = None
    used: int = 0
    statuses: list[int] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self.arrivals.append(now)
        if self.window_start is None or now >= self.window_start + self.window:
            self.window_start = (
                now
                if self.window_start is None
                else self.window_start + self.window * ((now - self.window_start) // self.window)
            )
            self.used = 0
        reset = self.window_start + self.window - now
        status = 200 if self.used < self.limit else 429
        self.used += status == 200
        self.statuses.append(status)
        headers = _announce(
            self.dialect, self.limit, max(0, self.limit - self.used), reset, time_wall() + reset
        )
        if status == 429:
            headers["Retry-After"] = str(math.ceil(reset))
        return web.Response(status=status, headers=headers, text=f"upstream {status}")


def time_wall() -> float:
    return datetime.now(tz=UTC).timestamp()


@pytest.mark.parametrize("dialect", ["ietf", "ietf-older", "ratelimit", "github", "openai", "anthropic"])
async def test_an_announced_quota_is_paced_not_overrun(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy, client: aiohttp.ClientSession, dialect: str
) -> None:
    """10 per 2 s upstream, a local limit far above it, 5 workers saturating 15 requests: the
    upstream answers no 429, and the 15 take a little over one window (10 in the first)."""
    behaviour = QuotaUpstream(dialect)
    upstream = await ScriptedUpstream(behaviour.handle).start(aiohttp_server)
    base = await start_on_own_port(
        start_proxy,
        upstream.url,
        rate_limit={"rate": 1000, "per": "1s", "burst": 5, "max_wait": "10s", "adaptive": True},
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    pending = list(range(15))
    statuses: list[int] = []

    async def worker() -> None:
        while pending:
            pending.pop()
            statuses.append((await timed_get(client, base)).status)

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(5))), timeout=15)
    elapsed = loop.time() - started
    print(f"{dialect}: 15 requests in {elapsed:.2f}s, upstream statuses {behaviour.statuses}")
    assert 429 not in behaviour.statuses, "the upstream never had to refuse"
    assert statuses == [200] * 15
    first_ten = behaviour.arrivals[9] - behaviour.arrivals[0]
    assert first_ten >= 1.0, f"the first window's quota was spread over it, not burst ({first_ten:.2f}s)"
    assert 2.0 <= elapsed < 6.0, "one window for the first 10, and not much more for the rest"


# --------------------------------------------------------------------------- the priority queue


async def test_queued_requests_are_served_high_first_and_low_shed_first(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy
) -> None:
    """A provider pause holds 300 requests (100 of each priority) in a queue of 250; when it ends,
    all high go upstream before any normal, all normal before any low; the 50 refused are low."""
    upstream = await ScriptedUpstream((429, {"Retry-After": "2"}, b"slow down"), 200).start(aiohttp_server)
    base = await start_on_own_port(
        start_proxy,
        upstream.url,
        rate_limit={"rate": 200, "per": "1s", "burst": 1, "max_wait": "10s", "max_queued": 250},
    )
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=20)) as session:
        async with session.get(f"{base}/pause") as first:
            assert first.status == 429
        paused_at = asyncio.get_running_loop().time()

        async def one(priority: str, index: int) -> tuple[str, int, str | None]:
            headers = {"x-outrigger-priority": priority}
            async with session.get(f"{base}/{priority}/{index}", headers=headers) as response:
                await response.read()
                return priority, response.status, response.headers.get("x-outrigger-error")

        order = [p for _ in range(100) for p in ("low", "normal", "high")]
        replies = await asyncio.gather(*(one(priority, i) for i, priority in enumerate(order)))
    assert asyncio.get_running_loop().time() - paused_at > 2.0
    refused = [(p, e) for p, status, e in replies if status != 200]
    assert refused == [("low", "rate_limited")] * 50, "only low requests were shed"
    sent = [seen.path_qs.split("/")[1] for seen in upstream.seen[1:]]
    assert sent.count("high") == 100
    assert sent.count("normal") == 100
    assert sent.count("low") == 50
    assert max(i for i, p in enumerate(sent) if p == "high") < min(
        i for i, p in enumerate(sent) if p == "normal"
    )
    assert max(i for i, p in enumerate(sent) if p == "normal") < min(
        i for i, p in enumerate(sent) if p == "low"
    )


async def test_a_request_whose_deadline_the_queue_cannot_meet_is_refused_at_once(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    upstream = await ScriptedUpstream(200).start(aiohttp_server)
    base = await start_on_own_port(
        start_proxy, upstream.url, rate_limit={"rate": 10, "per": "1s", "burst": 1, "max_wait": "5s"}
    )
    queued = [asyncio.create_task(timed_get(client, base)) for _ in range(21)]  # 2 s of tokens
    loop = asyncio.get_running_loop()
    for _ in range(100):  # bounded: 2 s
        if upstream.count >= 1:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)
    started = loop.time()
    async with client.get(f"{base}/v1/urgent", headers={"x-outrigger-timeout-ms": "200"}) as response:
        body = await response.json()
        elapsed = loop.time() - started
        assert response.status == 429
        assert body["error"]["type"] == "rate_limited"
        assert int(response.headers["Retry-After"]) >= 2
    assert elapsed < 0.1, f"refused at once, not after {elapsed:.3f}s of waiting in vain"
    replies = await asyncio.gather(*queued)
    assert [r.status for r in replies] == [200] * 21
    assert "/v1/urgent" not in [seen.path_qs for seen in upstream.seen]


@pytest.mark.parametrize("value", ["urgent", "", "HIGH "])
async def test_the_priority_header_takes_high_normal_or_low(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy, client: aiohttp.ClientSession, value: str
) -> None:
    upstream = await ScriptedUpstream(200).start(aiohttp_server)
    base = await start_on_own_port(start_proxy, upstream.url, rate_limit={"rate": 100, "burst": 10})
    async with client.get(f"{base}/v1", headers={"x-outrigger-priority": value}) as response:
        if value.strip().lower() == "high":
            assert response.status == 200
            assert "x-outrigger-priority" not in upstream.seen[0].headers, "control headers stay local"
        else:
            assert response.status == 400
            assert "x-outrigger-priority" in (await response.json())["error"]["message"]
            assert upstream.count == 0
