"""Failover on a fake clock: the stack the pipeline builds (idempotency > retry > failover > attempt)
over a fake upstream that records which upstream each attempt went to, with which headers.

The primary is the request's own target (``http://api.test``); ``http://eu.test`` is the failover
upstream. Each has its own breaker; an open one is skipped without spending an attempt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict
from opentelemetry import trace

from proxy import errors
from proxy.config.model import Policy, PolicySettings, UpstreamTarget
from proxy.exchange import Handler, ProxyRequest, ProxyResponse
from proxy.layers.breaker import CLOSED, HALF_OPEN, OPEN
from proxy.pipeline import PolicyState, build_layers, compose
from tests.fakes import FakeClock, Script, fake_upstream, make_request

PRIMARY = "http://api.test"
EU = "http://eu.test"
US = "http://us.test"


@dataclass
class Seen:
    upstream: str
    headers: CIMultiDict[str]
    tls_sni: str | None


@dataclass
class Recorder:
    """The transport: records each attempt's upstream and headers, answers from a per-upstream script."""

    scripts: dict[str, list[Script]]
    seen: list[Seen] = field(default_factory=list)

    async def __call__(self, request: ProxyRequest) -> ProxyResponse:
        upstream = str(request.target)
        self.seen.append(Seen(upstream, request.headers.copy(), request.settings.tls.sni))
        script = self.scripts[upstream]
        step = script.pop(0) if len(script) > 1 else script[0]
        return await fake_upstream(step)(request)

    def upstreams(self) -> list[str]:
        return [s.upstream for s in self.seen]


def _policy(**sections: Any) -> Policy:
    sections.setdefault("headers", {"set": {"Authorization": "Bearer primary-key"}})
    sections.setdefault(
        "failover",
        {"upstreams": [{"url": EU, "headers": {"set": {"Authorization": "Bearer eu-key"}}}]},
    )
    settings = PolicySettings.model_validate(sections)
    target = UpstreamTarget(scheme="http", host="api.test", port=80)
    return Policy(
        hosts=("api.test",), upstream=target, listen=None, settings=settings, routes=(), source="t:1"
    )


def _clock() -> FakeClock:
    """Fake time starting at the loop's time: the deadline layer counts from `time.monotonic()`."""
    return FakeClock(now=time.monotonic())


BREAKER = {"failure_threshold": 2, "reset_timeout": "30s", "failure_on": ["connect-failure", "5xx"]}
RETRIES = {"max_attempts": 3, "backoff": {"base": "10ms", "max": "10ms"}, "budget": None}


class Stack:
    def __init__(self, clock: FakeClock, recorder: Recorder, **sections: Any) -> None:
        self.policy = _policy(**sections)
        self.state = PolicyState.build(self.policy, clock)
        layers = build_layers(self.policy.settings, self.state, Path("."), clock, trace.NoOpTracer())
        self.handler: Handler = compose(layers, recorder)

    async def send(self, method: str = "GET", **headers: str) -> tuple[ProxyRequest, ProxyResponse]:
        request = make_request(method, headers=headers, settings=self.policy.settings)
        request.policy = self.policy
        return request, await self.handler(request)

    @property
    def primary_breaker(self) -> Any:
        return self.state.breaker

    @property
    def eu_breaker(self) -> Any:
        return self.state.failover_breakers[EU]


async def test_a_failing_primary_sends_the_retry_to_the_failover_with_its_own_key_and_credentials() -> None:
    clock = _clock()
    recorder = Recorder({PRIMARY: [503], EU: [200]})
    stack = Stack(clock, recorder, retries=RETRIES, idempotency={}, circuit_breaker=BREAKER)

    request, response = await stack.send("POST")

    assert response.status == 200
    assert recorder.upstreams() == [PRIMARY, EU]
    primary, eu = recorder.seen
    assert primary.headers["Authorization"] == "Bearer primary-key"
    assert eu.headers.getall("Authorization") == ["Bearer eu-key"], "the primary's credentials stay home"
    key = primary.headers["Idempotency-Key"]
    assert key
    assert eu.headers.getall("Idempotency-Key") == [key]
    assert request.attempts == 2
    assert request.target == UpstreamTarget(scheme="http", host="eu.test", port=80)
    assert request.failover is not None
    assert request.failover.moves == [EU]
    assert [r.reason for r in request.retries] == ["503"]


async def test_a_failover_upstream_without_headers_gets_none_of_the_primarys() -> None:
    clock = _clock()
    recorder = Recorder({PRIMARY: [errors.ConnectFailure("refused")], EU: [200]})
    stack = Stack(
        clock,
        recorder,
        retries=RETRIES,
        headers={"set": {"Authorization": "Bearer primary-key"}, "remove": ["X-Debug"]},
        failover={"upstreams": [{"url": EU, "headers": {"remove": ["X-Trace-Me"]}}]},
    )

    _, response = await stack.send(**{"X-Debug": "1", "X-Trace-Me": "yes", "Authorization": "Bearer app"})

    assert response.status == 200
    primary, eu = recorder.seen
    assert primary.headers["Authorization"] == "Bearer primary-key"
    assert "X-Debug" not in primary.headers
    assert primary.headers["X-Trace-Me"] == "yes"
    # the failover upstream sees the app's headers under its own rules only
    assert eu.headers["Authorization"] == "Bearer app"
    assert eu.headers["X-Debug"] == "1"
    assert "X-Trace-Me" not in eu.headers


async def test_an_outcome_not_in_failover_on_retries_the_same_upstream() -> None:
    clock = _clock()
    recorder = Recorder({PRIMARY: [429, 200], EU: [200]})
    stack = Stack(clock, recorder, retries=RETRIES)

    request, response = await stack.send()

    assert response.status == 200
    assert recorder.upstreams() == [PRIMARY, PRIMARY]
    assert request.failover is not None
    assert request.failover.moves == []


async def test_an_open_primary_is_skipped_without_spending_an_attempt() -> None:
    clock = _clock()
    recorder = Recorder({PRIMARY: [503], EU: [200]})
    stack = Stack(clock, recorder, retries={**RETRIES, "max_attempts": 1}, circuit_breaker=BREAKER)

    for _ in range(2):  # two failed attempts open the primary's breaker (no retries here)
        _, response = await stack.send()
        assert response.status == 503
    assert stack.primary_breaker.state == OPEN
    assert stack.eu_breaker.state == CLOSED

    request, response = await stack.send()

    assert response.status == 200
    assert recorder.upstreams() == [PRIMARY, PRIMARY, EU], "the open primary was not contacted"
    assert request.attempts == 1
    assert request.failover is not None
    assert request.failover.moves == [EU]


async def test_after_reset_timeout_the_half_open_trial_goes_to_the_primary_and_traffic_returns() -> None:
    clock = _clock()
    recorder = Recorder({PRIMARY: [503, 503, 200], EU: [200]})
    stack = Stack(clock, recorder, retries={**RETRIES, "max_attempts": 1}, circuit_breaker=BREAKER)
    for _ in range(2):
        await stack.send()
    _, response = await stack.send()
    assert recorder.upstreams()[-1] == EU

    clock.advance(30.0)
    request, response = await stack.send()

    assert response.status == 200
    assert recorder.upstreams()[-1] == PRIMARY, "the trial goes to the primary"
    assert stack.primary_breaker.state == CLOSED
    assert request.failover is not None
    assert request.failover.moves == []
    await stack.send()
    assert recorder.upstreams()[-1] == PRIMARY


async def test_when_every_breaker_is_open_the_request_fails_fast_with_the_soonest_retry_after() -> None:
    clock = _clock()
    recorder = Recorder({PRIMARY: [503], EU: [503]})
    stack = Stack(clock, recorder, retries={**RETRIES, "max_attempts": 1}, circuit_breaker=BREAKER)
    for _ in range(2):
        await stack.send()
    clock.advance(10.0)
    for _ in range(2):
        await stack.send()
    assert stack.primary_breaker.state == OPEN
    assert stack.eu_breaker.state == OPEN
    calls = len(recorder.seen)

    with pytest.raises(errors.CircuitOpen) as refused:
        await stack.send()

    assert len(recorder.seen) == calls
    assert refused.value.retry_after == pytest.approx(20.0), "the primary half-opens first"


async def test_retries_go_on_while_one_upstream_is_left_and_stop_when_none_is() -> None:
    clock = _clock()
    recorder = Recorder({PRIMARY: [503], EU: [503]})
    breaker = {**BREAKER, "failure_threshold": 1}
    stack = Stack(clock, recorder, retries=RETRIES, circuit_breaker=breaker)

    request, response = await stack.send()

    # attempt 1 opens the primary: the retry still goes (to eu); attempt 2 opens eu: retries stop
    assert recorder.upstreams() == [PRIMARY, EU]
    assert response.status == 503
    assert request.attempts == 2


async def test_attempts_wrap_around_to_the_primary() -> None:
    clock = _clock()
    recorder = Recorder({PRIMARY: [503, 200], EU: [503], US: [503]})
    stack = Stack(
        clock,
        recorder,
        retries={**RETRIES, "max_attempts": 4},
        failover={"upstreams": [{"url": EU}, {"url": US}], "on": ["5xx"]},
    )

    request, response = await stack.send()

    assert response.status == 200
    assert recorder.upstreams() == [PRIMARY, EU, US, PRIMARY]
    assert request.failover is not None
    assert request.failover.moves == [EU, US, PRIMARY]


async def test_without_circuit_open_in_on_an_open_primary_is_not_skipped() -> None:
    clock = _clock()
    recorder = Recorder({PRIMARY: [503], EU: [200]})
    stack = Stack(
        clock,
        recorder,
        retries={**RETRIES, "max_attempts": 1},
        circuit_breaker=BREAKER,
        failover={"upstreams": [{"url": EU}], "on": ["5xx"]},
    )
    for _ in range(2):
        await stack.send()

    with pytest.raises(errors.CircuitOpen):
        await stack.send()
    assert recorder.upstreams() == [PRIMARY, PRIMARY]


async def test_a_half_open_primary_with_its_trial_in_flight_is_skipped() -> None:
    clock = _clock()
    recorder = Recorder({PRIMARY: [503], EU: [200]})
    stack = Stack(clock, recorder, retries={**RETRIES, "max_attempts": 1}, circuit_breaker=BREAKER)
    for _ in range(2):
        await stack.send()
    clock.advance(30.0)
    stack.primary_breaker.admit()  # a trial is in flight elsewhere
    assert stack.primary_breaker.state == HALF_OPEN

    _, response = await stack.send()

    assert response.status == 200
    assert recorder.upstreams()[-1] == EU


async def test_a_failover_upstream_uses_its_own_tls_section() -> None:
    clock = _clock()
    recorder = Recorder({PRIMARY: [errors.ConnectFailure("refused")], EU: [200]})
    stack = Stack(
        clock,
        recorder,
        retries=RETRIES,
        tls={"sni": "primary.example"},
        failover={"upstreams": [{"url": EU, "tls": {"sni": "eu.example"}}]},
    )

    request, _ = await stack.send()

    assert [s.tls_sni for s in recorder.seen] == ["primary.example", "eu.example"]
    assert request.settings.tls.sni == "eu.example"


def test_each_upstreams_breaker_carries_over_a_reload_unless_what_it_judged_changed() -> None:
    clock = _clock()
    before = _policy(circuit_breaker=BREAKER, failover={"upstreams": [{"url": EU}, {"url": US}]})
    state = PolicyState.build(before, clock)
    assert set(state.failover_breakers) == {EU, US}
    assert state.failover_breakers[EU] is not state.breaker

    same = PolicyState.build(
        _policy(circuit_breaker=BREAKER, failover={"upstreams": [{"url": EU}, {"url": US}]}),
        clock,
        (before, state),
    )
    assert same.failover_breakers[EU] is state.failover_breakers[EU]
    assert same.failover_breakers[US] is state.failover_breakers[US]

    changed = _policy(
        circuit_breaker=BREAKER,
        failover={"upstreams": [{"url": EU, "tls": {"verify": False}}, {"url": US}]},
    )
    after = PolicyState.build(changed, clock, (before, state))
    assert after.failover_breakers[EU] is not state.failover_breakers[EU], "new TLS: starts closed"
    assert after.failover_breakers[US] is state.failover_breakers[US]
    assert after.breaker is state.breaker


def test_no_circuit_breaker_section_means_no_breakers_at_all() -> None:
    state = PolicyState.build(_policy(), _clock())
    assert state.breaker is None
    assert state.failover_breakers == {}
