"""A rate limit with ``scope: fleet``: one bucket in a real Redis, drawn from by several sidecars."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from multidict import CIMultiDict

from proxy import errors, fleet
from proxy.clock import SYSTEM_CLOCK
from proxy.config.model import RateLimit
from proxy.fleet import FleetBackend
from proxy.layers.ratelimit import RateLimiter
from tests.e2e.procs import wait_until
from tests.fleet.conftest import RedisServer

Sidecar = Callable[..., Awaitable[RateLimiter]]


@pytest.fixture
def sidecar(fleet_backends: Callable[[], FleetBackend]) -> Sidecar:
    """One limiter per call, each on its own Redis client, as two sidecars would be."""

    async def make(**limit: Any) -> RateLimiter:
        return fleet.limiter("api.example", RateLimit(scope="fleet", **limit), SYSTEM_CLOCK, fleet_backends())

    return make


async def timed(limiter: RateLimiter) -> float:
    started = time.monotonic()
    await limiter.acquire()
    return time.monotonic() - started


async def test_two_sidecars_draw_from_one_bucket(sidecar: Sidecar) -> None:
    a, b = await sidecar(rate=10, burst=1), await sidecar(rate=10, burst=1)
    assert await timed(a) < 0.05
    assert 0.07 < await timed(b) < 0.2  # the token a took was the fleet's, not only a's
    assert 0.07 < await timed(a) < 0.2


async def test_a_wait_longer_than_max_wait_is_refused_without_taking_a_token(sidecar: Sidecar) -> None:
    a, b = await sidecar(rate=1, burst=1, max_wait="100ms"), await sidecar(rate=1, burst=1, max_wait="100ms")
    await a.acquire()
    with pytest.raises(errors.RateLimited) as refused:
        await b.acquire()
    assert "fleet rate limit for api.example" in str(refused.value)
    assert refused.value.retry_after is not None
    assert 0.8 < refused.value.retry_after <= 1.0
    fast = await sidecar(rate=1, burst=1, max_wait="2s")
    assert 0.7 < await timed(fast) < 1.2  # the refusals cost no token: the next one is a second after a's


async def test_a_provider_pause_learned_by_one_sidecar_reaches_the_others(sidecar: Sidecar) -> None:
    a, b = await sidecar(rate=100, max_wait="100ms"), await sidecar(rate=100, max_wait="100ms")
    a.observe(CIMultiDict({"Retry-After": "2"}), 429)

    async def b_refused() -> bool:
        try:
            await b.acquire()
        except errors.RateLimited as refusal:
            return "asked us to slow down" in str(refusal)
        return False

    assert await wait_until(b_refused, within=2.0)
    snapshot = b.snapshot()
    assert isinstance(snapshot["paused_for_seconds"], float)
    assert 1.0 < snapshot["paused_for_seconds"] <= 2.0


async def test_a_waiter_cancelled_gives_its_token_back(sidecar: Sidecar) -> None:
    a, b = await sidecar(rate=2, burst=1, max_wait="2s"), await sidecar(rate=2, burst=1, max_wait="2s")
    await a.acquire()
    waiting = asyncio.create_task(b.acquire())  # its token is due in 0.5 s
    await asyncio.sleep(0.1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await asyncio.sleep(0.05)  # the give-back is reported without waiting
    assert await timed(a) < 0.45  # the cancelled token came back: a's second waits 0.5 s, not 1 s


async def test_redis_down_falls_back_to_the_local_bucket_at_once_and_rejoins(
    sidecar: Sidecar, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    a = await sidecar(rate=10, burst=5)
    shared = a.shared
    assert shared is not None
    await a.acquire()
    assert a.snapshot()["fleet_backend"] == "up"
    redis_server.stop()
    caplog.set_level(logging.ERROR, logger="outrigger.fleet")
    started = time.monotonic()
    for _ in range(4):  # the local bucket's burst: no Redis, no wait, no error
        await a.acquire()
    assert time.monotonic() - started < 0.5
    assert not shared.up
    assert a.snapshot()["fleet_backend"] == "down"
    assert len([r for r in caplog.records if "unreachable" in r.getMessage()]) == 1, "logged once"
    redis_server.start()
    assert await wait_until(lambda: shared.up, within=3.0)
    assert a.snapshot()["fleet_backend"] == "up"


async def test_a_redis_slower_than_the_timeout_counts_as_down(
    sidecar: Sidecar, redis_server: RedisServer
) -> None:
    a = await sidecar(rate=10, burst=5)
    await a.acquire()
    redis_server.freeze()  # connected, but no answer
    try:
        started = time.monotonic()
        await a.acquire()
        assert time.monotonic() - started < 0.2  # the 50 ms timeout, then the local bucket
        assert a.shared is not None
        assert not a.shared.up
    finally:
        redis_server.thaw()
    assert await wait_until(lambda: a.shared is not None and a.shared.up, within=3.0)


async def test_max_queued_counts_only_waiters_and_a_refused_waiter_gives_its_token_back(
    sidecar: Sidecar,
) -> None:
    a = await sidecar(rate=2, burst=2, max_wait="2s", max_queued=0)
    b = await sidecar(rate=2, burst=2, max_wait="2s", max_queued=0)
    assert await timed(a) < 0.05  # due at once: not a waiter, so max_queued 0 lets it through
    assert await timed(b) < 0.05
    with pytest.raises(errors.RateLimited) as full:
        await a.acquire()  # its token is 0.5 s away: it would wait, and nobody may
    assert "queue for api.example is full (0 waiting)" in str(full.value)
    await asyncio.sleep(0.05)  # the give-back is reported without waiting
    patient = await sidecar(rate=2, burst=2, max_wait="2s")
    assert 0.3 < await timed(patient) < 0.6  # the refused one's token came back: 0.5 s, not 1 s
