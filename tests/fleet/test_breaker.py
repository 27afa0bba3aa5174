"""A circuit breaker with ``scope: fleet``: its state in a real Redis, shared by several sidecars."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from proxy import errors, fleet
from proxy.clock import SYSTEM_CLOCK
from proxy.config.loader import load_config
from proxy.config.model import CircuitBreakerSettings
from proxy.fleet import FleetBackend
from proxy.fleet.breaker import FleetBreaker
from proxy.layers.breaker import CLOSED, HALF_OPEN, OPEN, Admission, CircuitBreaker
from proxy.pipeline import PolicyState
from tests.conftest import write_config
from tests.e2e.procs import wait_until
from tests.fleet.conftest import RedisServer

Sidecar = Callable[..., Awaitable[CircuitBreaker]]


@pytest.fixture
def sidecar(fleet_backends: Callable[[], FleetBackend]) -> Sidecar:
    async def make(**settings: Any) -> CircuitBreaker:
        values = {"failure_threshold": 3, "reset_timeout": "300ms", **settings}
        breaker_settings = CircuitBreakerSettings(scope="fleet", **values)
        return fleet.breaker("api.example", breaker_settings, SYSTEM_CLOCK, fleet_backends())

    return make


async def attempt(breaker: CircuitBreaker, failed: bool | None) -> Admission:
    admission = await breaker.admit_async()
    breaker.finish(admission, failed)
    await asyncio.sleep(0.02)  # outcomes are reported without holding up the response
    return admission


async def refused(breaker: CircuitBreaker) -> errors.CircuitOpen:
    with pytest.raises(errors.CircuitOpen) as refusal:
        await breaker.admit_async()
    return refusal.value


async def test_a_breaker_opened_by_one_sidecar_fails_fast_in_the_others(sidecar: Sidecar) -> None:
    a, b, c = await sidecar(), await sidecar(), await sidecar()
    for _ in range(3):
        await attempt(a, failed=True)
    assert a.state == OPEN
    for other in (b, c):
        refusal = await refused(other)
        assert "fleet-wide" in str(refusal)
        assert refusal.retry_after is not None
        assert 0.1 < refusal.retry_after <= 0.3
        assert other.state == OPEN
        assert other.snapshot()["state"] == OPEN


async def test_consecutive_failures_count_across_sidecars_and_a_success_resets_them(sidecar: Sidecar) -> None:
    a, b = await sidecar(), await sidecar()
    await attempt(a, failed=True)
    await attempt(b, failed=True)
    await attempt(a, failed=False)
    await attempt(b, failed=True)
    await attempt(a, failed=True)
    assert a.state == CLOSED
    assert a.consecutive_failures == 2
    await attempt(b, failed=True)
    assert b.state == OPEN


async def test_half_open_trials_are_limited_fleet_wide(sidecar: Sidecar) -> None:
    a, b = await sidecar(), await sidecar()
    for _ in range(3):
        await attempt(a, failed=True)
    await asyncio.sleep(0.35)
    trial = await a.admit_async()
    assert (trial.state, trial.shared) == (HALF_OPEN, True)
    refusal = await refused(b)
    assert "trial requests are in flight" in str(refusal)
    a.finish(trial, failed=False)
    assert await wait_until(lambda: a.state == CLOSED, within=1.0)
    assert (await b.admit_async()).state == CLOSED


async def test_a_failed_trial_opens_the_breaker_again_for_everyone(sidecar: Sidecar) -> None:
    a, b = await sidecar(), await sidecar()
    for _ in range(3):
        await attempt(a, failed=True)
    await asyncio.sleep(0.35)
    await attempt(b, failed=True)
    assert b.state == OPEN
    await refused(a)


async def test_a_trial_never_reported_is_forgotten_after_reset_timeout(sidecar: Sidecar) -> None:
    a, b = await sidecar(), await sidecar()
    for _ in range(3):
        await attempt(a, failed=True)
    await asyncio.sleep(0.35)
    await a.admit_async()  # its sidecar dies before it reports
    await refused(b)
    await asyncio.sleep(0.35)
    assert (await b.admit_async()).state == HALF_OPEN


async def test_a_cancelled_attempt_is_neutral_but_frees_its_trial(sidecar: Sidecar) -> None:
    a, b = await sidecar(), await sidecar()
    for _ in range(3):
        await attempt(a, failed=True)
    await asyncio.sleep(0.35)
    await attempt(a, failed=None)
    assert (await b.admit_async()).state == HALF_OPEN  # a's trial slot was given back


async def test_redis_down_fails_open_to_the_local_breaker(
    sidecar: Sidecar, redis_server: RedisServer
) -> None:
    a, b = await sidecar(), await sidecar()
    for _ in range(3):
        await attempt(a, failed=True)
    await refused(b)
    redis_server.stop()
    admission = await b.admit_async()
    assert admission == Admission(CLOSED, shared=False)  # b's own breaker saw no failure
    b.finish(admission, failed=False)
    assert b.snapshot()["fleet_backend"] == "down"
    assert b.state == CLOSED
    redis_server.start()  # an empty Redis: the fleet starts over, closed
    assert await wait_until(lambda: b.snapshot()["fleet_backend"] == "up", within=3.0)
    assert (await b.admit_async()).shared


async def test_failover_upstreams_get_fleet_breakers_of_their_own(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    policy = {
        "hosts": ["api.example"],
        "upstream": "https://api.example",
        "circuit_breaker": {"scope": "fleet"},
        "rate_limit": {"scope": "fleet"},
        "failover": {"upstreams": [{"url": "https://eu.api.example"}]},
    }
    fleet_settings = {"redis": redis_server.url, "key_prefix": f"t{uuid.uuid4().hex[:8]}"}
    config = load_config(write_config(tmp_path, [policy], fleet=fleet_settings))
    assert config.main.fleet is not None
    backend = FleetBackend(config.main.fleet)
    try:
        state = PolicyState.build(config.policies[0], SYSTEM_CLOCK, fleet=backend)
        assert isinstance(state.breaker, FleetBreaker)
        assert state.limiter is not None
        assert state.limiter.shared is not None
        eu = state.failover_breakers["https://eu.api.example"]
        assert isinstance(eu, FleetBreaker)
        assert eu.name == "api.example -> https://eu.api.example"
        local = PolicyState.build(config.policies[0], SYSTEM_CLOCK)  # no backend: nothing to share
        assert not isinstance(local.breaker, FleetBreaker)
        assert local.limiter is not None
        assert local.limiter.shared is None
    finally:
        await backend.close()


async def test_a_late_trial_of_an_earlier_half_open_round_counts_for_nothing(sidecar: Sidecar) -> None:
    a, b = await sidecar(half_open_max=2), await sidecar(half_open_max=2)
    for _ in range(3):
        await attempt(a, failed=True)
    await asyncio.sleep(0.35)
    slow = await a.admit_async()  # a trial of the first half-open round, slow to finish
    await attempt(b, failed=True)  # another trial fails: open again
    await asyncio.sleep(0.35)
    second = await b.admit_async()  # the second round's trial
    assert second.state == HALF_OPEN
    assert second.round != slow.round
    a.finish(slow, failed=False)  # late: it must neither close the breaker nor free a slot
    await asyncio.sleep(0.05)
    assert (await a.admit_async()).state == HALF_OPEN  # the 2nd slot of this round, not a closed breaker
    await refused(b)  # both slots of this round are taken
