"""Fault drills on a fake clock and a scripted random source: who is drilled, with what, and how.

`RecordingUniform(f)` rolls ``f * 100`` on the 0-100 scale: below ``abort.percent``
aborts, the next ``delay.percent`` delays, the rest pass untouched.
"""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import pytest
from opentelemetry import trace

from proxy import errors
from proxy.config.model import CircuitBreakerSettings, Faults, Policy, Retries
from proxy.layers.breaker import CLOSED, BreakerLayer, CircuitBreaker
from proxy.layers.faults import FaultsLayer
from proxy.layers.retry import RetryLayer
from proxy.pipeline import PolicyState, build_layers, compose
from tests.fakes import FakeClock, RecordingUniform, fake_upstream, make_request, settings_from


def _layer(clock: FakeClock, fraction: float, **settings: object) -> FaultsLayer:
    return FaultsLayer(Faults.model_validate(settings), clock, RecordingUniform(fraction))


DRILL = {
    "abort": {"status": 503, "percent": 10},
    "delay": {"duration": "2s", "percent": 5},
    "header_only": False,
}


async def test_roll_below_abort_percent_aborts_before_the_upstream() -> None:
    clock = FakeClock()
    upstream = fake_upstream(200)
    request = make_request()

    with pytest.raises(errors.FaultInjected) as caught:
        await _layer(clock, 0.0999, **DRILL)(request, upstream)

    assert caught.value.status == 503
    assert caught.value.error_type == "fault_injected"
    assert json_type(caught.value) == "fault_injected"
    assert caught.value.headers()["x-outrigger-error"] == "fault_injected"
    assert upstream.calls == 0
    assert request.fault == "abort"
    assert clock.sleeps == []


def json_type(error: errors.OutriggerError) -> str:
    body = json.loads(error.body("api.test"))
    assert body["error"]["host"] == "api.test"
    return str(body["error"]["type"])


async def test_abort_uses_the_configured_status() -> None:
    with pytest.raises(errors.FaultInjected) as caught:
        await _layer(FakeClock(), 0.0, abort={"status": 500, "percent": 1}, header_only=False)(
            make_request(), fake_upstream(200)
        )
    assert caught.value.status == 500


async def test_roll_in_the_delay_band_sleeps_then_calls_the_upstream() -> None:
    clock = FakeClock()
    upstream = fake_upstream(200)
    request = make_request()

    response = await _layer(clock, 0.12, **DRILL)(request, upstream)

    assert response.status == 200
    assert clock.sleeps == [2.0]
    assert upstream.calls == 1
    assert request.fault == "delay"


async def test_roll_above_both_bands_passes_untouched() -> None:
    clock = FakeClock()
    upstream = fake_upstream(200)
    request = make_request()

    response = await _layer(clock, 0.15, **DRILL)(request, upstream)

    assert response.status == 200
    assert clock.sleeps == []
    assert request.fault is None


async def test_delay_is_bounded_by_the_deadline_and_becomes_a_timeout() -> None:
    clock = FakeClock()
    upstream = fake_upstream(200)
    request = make_request(deadline=clock.now() + 0.5)

    with pytest.raises(errors.Timeout):
        await _layer(clock, 0.0, delay={"duration": "2s", "percent": 100}, header_only=False)(
            request, upstream
        )

    assert clock.sleeps == [0.5]
    assert upstream.calls == 0
    assert request.fault == "delay"


async def test_header_only_drills_only_requests_that_ask() -> None:
    clock = FakeClock()
    layer = _layer(clock, 0.0, abort={"percent": 100})  # header_only defaults to true
    assert layer.settings.header_only is True
    plain = make_request()

    assert (await layer(plain, fake_upstream(200))).status == 200
    assert plain.fault is None
    assert isinstance(layer.uniform, RecordingUniform)
    assert layer.uniform.calls == [], "a request not opted in costs no roll"

    opted_in = make_request()
    opted_in.fault_requested = True
    with pytest.raises(errors.FaultInjected):
        await layer(opted_in, fake_upstream(200))


async def test_percent_zero_never_fires_and_hundred_always_does() -> None:
    never = _layer(FakeClock(), 0.0, abort={"percent": 0}, header_only=False)
    always = _layer(FakeClock(), 0.999999, abort={"percent": 100}, header_only=False)
    assert (await never(make_request(), fake_upstream(200))).status == 200
    with pytest.raises(errors.FaultInjected):
        await always(make_request(), fake_upstream(200))


async def test_rates_follow_the_percents_with_a_real_random_source() -> None:
    layer = FaultsLayer(Faults.model_validate(DRILL), FakeClock(), random.Random(7).uniform)
    counts = {"abort": 0, "delay": 0, None: 0}
    for _ in range(20_000):
        request = make_request()
        with contextlib.suppress(errors.FaultInjected):
            await layer(request, fake_upstream(200))
        counts[request.fault] += 1
    assert 1_800 <= counts["abort"] <= 2_200
    assert 850 <= counts["delay"] <= 1_150


async def test_injected_aborts_never_reach_the_breaker_or_get_retried() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(
        "api.test", CircuitBreakerSettings(failure_threshold=1, failure_on=("5xx",)), clock
    )
    retry = RetryLayer(Retries(on=("503",)), "Idempotency-Key", None, clock)
    faults = _layer(clock, 0.0, abort={"status": 503, "percent": 100}, header_only=False)
    upstream = fake_upstream(200)
    handler = compose([faults, retry, BreakerLayer(breaker)], upstream)

    for _ in range(5):
        with pytest.raises(errors.FaultInjected):
            await handler(make_request())

    assert upstream.calls == 0
    assert breaker.state == CLOSED
    assert breaker.consecutive_failures == 0


def test_invalid_drills_are_refused() -> None:
    for settings, message in [
        ({"abort": {"percent": 101}}, "less than or equal to 100"),
        ({"abort": {"percent": -1}}, "greater than or equal to 0"),
        ({"abort": {"status": 99, "percent": 1}}, "greater than or equal to 200"),
        ({"abort": {}}, "Field required"),
        ({"delay": {"duration": "0s", "percent": 5}}, "greater than 0"),
        ({"abort": {"percent": 60}, "delay": {"duration": "1s", "percent": 50}}, "at most 100"),
    ]:
        with pytest.raises(ValueError, match=message):
            Faults.model_validate(settings)


async def test_fallback_is_outermost_and_faults_sit_right_below_the_deadline() -> None:
    clock = FakeClock()
    full = settings_from(
        fallback={},
        faults={"abort": {"percent": 1}},
        concurrency={},
        idempotency={},
        retries={},
        circuit_breaker={},
        rate_limit={},
    )
    for settings, present in ((full, True), (settings_from(concurrency={}, retries={}), False)):
        policy = Policy(
            hosts=("api.test",), upstream=None, listen=None, settings=settings, routes=(), source="t:1"
        )
        layers = build_layers(
            settings, PolicyState.build(policy, clock), Path("."), clock, trace.get_tracer("t")
        )
        names = [type(layer).__name__ for layer in layers]
        if not present:
            assert "FallbackLayer" not in names
            assert "FaultsLayer" not in names
            continue
        assert names[0] == "FallbackLayer"
        faults = names.index("FaultsLayer")
        assert names[faults - 1] == "DeadlineLayer"
        assert (
            faults < names.index("IdempotencyLayer") < names.index("RetryLayer") < names.index("BreakerLayer")
        )
