"""Circuit breaker end to end: a misbehaving aiohttp upstream that counts what reaches it.

Proves on real sockets that the breaker opens after N failed attempts, then fails
fast with 503 `circuit_open` + Retry-After without contacting the upstream (its
own counter does not move), half-opens after `reset_timeout`, lets exactly one
trial through under 20 concurrent requests, and closes on success.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from tests.conftest import StartProxy, free_port, loopback_policy, start_on_own_port
from tests.e2e.procs import wait_until
from tests.e2e.upstreams import CountingUpstream, TimedReply, timed_get
from tests.fakes import CALL_TIMEOUT, ScriptedUpstream, admin_state

HOST = "upstream.test"
HOLD_LIMIT = 10.0
"""Longest any upstream handler is held (a hang fails the test instead of stalling it)."""


@dataclass
class Misbehaving:
    """An upstream answering `status` (503 storm, 200 recovery), optionally holding requests or hanging."""

    status: int = 503
    hits: int = 0
    gate: asyncio.Event | None = None
    """When set, each request waits for it (requests held in flight, or a hang)."""
    arrivals: list[float] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        self.arrivals.append(asyncio.get_running_loop().time())
        if self.gate is not None:
            await asyncio.wait_for(self.gate.wait(), HOLD_LIMIT)
        return web.Response(status=self.status, text=f"upstream says {self.status}")


@pytest.fixture
async def upstream(aiohttp_server: AiohttpServer) -> AsyncIterator[tuple[Misbehaving, str]]:
    """The behaviour and the base URL of an upstream that follows it."""
    behaviour = Misbehaving()
    scripted = await ScriptedUpstream(behaviour.handle).start(aiohttp_server)
    yield behaviour, scripted.url
    if behaviour.gate is not None:
        behaviour.gate.set()  # free any held handler before the server closes


def _assert_circuit_open(reply: TimedReply) -> None:
    assert reply.status == 503, reply
    assert reply.error()["type"] == "circuit_open"
    retry_after = reply.headers.get("retry-after")
    assert retry_after is not None
    assert retry_after.isdigit()
    assert int(retry_after) >= 1


def _assert_upstream_reply(reply: TimedReply, status: int) -> None:
    """The upstream's own response, passed through (never replaced by an Outrigger error)."""
    assert reply.status == status, reply
    assert "x-outrigger-error" not in reply.headers
    assert reply.body == f"upstream says {status}".encode()


async def test_503_storm_opens_fails_fast_half_opens_one_trial_and_recovers(
    upstream: tuple[Misbehaving, str], start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    behaviour, url = upstream
    base = await start_on_own_port(
        start_proxy,
        url,
        circuit_breaker={
            "failure_threshold": 3,
            "reset_timeout": "500ms",
            "half_open_max": 1,
            "failure_on": ["5xx"],
        },
    )
    loop = asyncio.get_running_loop()

    # the storm: N failed attempts reach the upstream and come back as they are
    for _ in range(3):
        _assert_upstream_reply(await timed_get(client, base), 503)
    assert behaviour.hits == 3
    opened_at = loop.time()

    # open: fail fast, no upstream contact
    for _ in range(10):
        reply = await timed_get(client, base)
        _assert_circuit_open(reply)
        assert reply.elapsed < 0.25
        assert reply.headers["retry-after"] == "1"  # ceil(time left of 500 ms)
    assert behaviour.hits == 3, "an open breaker must not contact the upstream"
    assert loop.time() - opened_at < 0.5, "still inside reset_timeout"

    # half-open after reset_timeout: 20 concurrent requests, exactly one trial reaches the upstream
    await asyncio.sleep(max(0.0, opened_at + 0.6 - loop.time()))
    behaviour.status = 200
    behaviour.gate = asyncio.Event()
    tasks = [asyncio.create_task(timed_get(client, base)) for _ in range(20)]
    assert await wait_until(lambda: sum(t.done() for t in tasks) == 19, within=5.0, interval=0.01), (
        "condition not reached in time"
    )
    assert behaviour.hits == 4, "exactly one trial reached the upstream"
    rejected = [t.result() for t in tasks if t.done()]
    for reply in rejected:
        _assert_circuit_open(reply)
    behaviour.gate.set()
    replies = await asyncio.gather(*tasks)
    trials = [r for r in replies if r.status == 200]
    assert len(trials) == 1
    _assert_upstream_reply(trials[0], 200)

    # closed: traffic flows again
    behaviour.gate = None
    for _ in range(5):
        _assert_upstream_reply(await timed_get(client, base), 200)
    assert behaviour.hits == 9


async def test_a_failed_trial_reopens(
    upstream: tuple[Misbehaving, str], start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    behaviour, url = upstream
    base = await start_on_own_port(
        start_proxy,
        url,
        circuit_breaker={"failure_threshold": 2, "reset_timeout": "300ms", "failure_on": ["5xx"]},
    )
    for _ in range(2):
        _assert_upstream_reply(await timed_get(client, base), 503)
    _assert_circuit_open(await timed_get(client, base))
    await asyncio.sleep(0.4)
    _assert_upstream_reply(await timed_get(client, base), 503)  # the trial fails ...
    assert behaviour.hits == 3
    for _ in range(3):
        _assert_circuit_open(await timed_get(client, base))  # ... and the breaker is open again
    assert behaviour.hits == 3
    behaviour.status = 200
    await asyncio.sleep(0.4)
    _assert_upstream_reply(await timed_get(client, base), 200)
    _assert_upstream_reply(await timed_get(client, base), 200)
    assert behaviour.hits == 5


async def test_retries_stop_when_the_breaker_opens_and_the_app_gets_the_tripping_response(
    upstream: tuple[Misbehaving, str], start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    behaviour, url = upstream
    base = await start_on_own_port(
        start_proxy,
        url,
        retries={"max_attempts": 5, "on": [503], "backoff": {"base": "10ms", "max": "20ms"}},
        circuit_breaker={"failure_threshold": 3, "reset_timeout": "30s", "failure_on": ["5xx"]},
    )
    reply = await timed_get(client, base)
    _assert_upstream_reply(reply, 503)
    assert reply.headers["x-outrigger-attempts"] == "3", "retries stopped at the attempt that opened it"
    assert behaviour.hits == 3
    second = await timed_get(client, base)
    _assert_circuit_open(second)
    assert second.headers["x-outrigger-attempts"] == "0"
    assert behaviour.hits == 3


async def test_a_hung_upstream_opens_the_breaker_through_per_try_timeouts(
    upstream: tuple[Misbehaving, str], start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    behaviour, url = upstream
    behaviour.gate = asyncio.Event()  # never set during the test: the upstream hangs
    base = await start_on_own_port(
        start_proxy,
        url,
        timeouts={"connect": "100ms", "per_try": "150ms", "total": "5s"},
        circuit_breaker={"failure_threshold": 2, "reset_timeout": "30s", "failure_on": ["timeout"]},
    )
    for _ in range(2):
        reply = await timed_get(client, base)
        assert reply.status == 504
        assert reply.error()["type"] == "timeout"
        assert reply.elapsed >= 0.14
    assert behaviour.hits == 2
    reply = await timed_get(client, base)
    _assert_circuit_open(reply)
    assert reply.elapsed < 0.14, "failed fast instead of waiting for per_try"
    assert int(reply.headers["retry-after"]) in (29, 30)
    assert behaviour.hits == 2


async def test_timeouts_do_not_open_a_breaker_that_does_not_list_them(
    upstream: tuple[Misbehaving, str], start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    behaviour, url = upstream
    behaviour.gate = asyncio.Event()
    base = await start_on_own_port(
        start_proxy,
        url,
        timeouts={"connect": "100ms", "per_try": "100ms", "total": "5s"},
        circuit_breaker={"failure_threshold": 2, "reset_timeout": "30s", "failure_on": ["5xx"]},
    )
    for _ in range(3):
        reply = await timed_get(client, base)
        assert reply.status == 504
        assert reply.error()["type"] == "timeout"
    assert behaviour.hits == 3, "every request still reached the upstream"


async def test_connect_failures_open_the_breaker(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    closed_port = free_port()  # nothing listens there
    base = await start_on_own_port(
        start_proxy,
        f"http://127.0.0.1:{closed_port}",
        circuit_breaker={"failure_threshold": 2, "reset_timeout": "30s", "failure_on": ["connect-failure"]},
    )
    for _ in range(2):
        reply = await timed_get(client, base)
        assert reply.status == 502
        assert reply.error()["type"] == "upstream_unreachable"
    _assert_circuit_open(await timed_get(client, base))


# --------------------------------------------------------------------------- unknown hosts share no breaker

BREAKER = {"failure_threshold": 1, "failure_on": ["connect-failure", "reset", "timeout", "5xx"]}


async def test_one_failing_unknown_host_does_not_open_a_breaker_for_the_others(
    counting_upstream: CountingUpstream, start_proxy: StartProxy
) -> None:
    dead = free_port()  # nothing listens here: every attempt is a connect failure
    assert counting_upstream.server is not None
    proxy = await start_proxy(
        [loopback_policy(counting_upstream.url)],
        unknown_hosts="allow",
        defaults={"allow_private_addresses": True, "circuit_breaker": BREAKER},
    )
    async with aiohttp.ClientSession(timeout=CALL_TIMEOUT) as client:
        async with client.get(f"{proxy.url}/x", headers={"Host": f"127.0.0.1:{dead}"}) as failed:
            assert failed.status == 502, await failed.text()
            assert failed.headers.get("x-outrigger-error") == "upstream_unreachable"
        # another unknown host (unknown hosts get https: this loopback server cannot complete TLS,
        # but the point is that the attempt is made rather than refused by a shared breaker)
        other = {"Host": f"localhost:{counting_upstream.server.port}"}
        async with client.get(f"{proxy.url}/x", headers=other) as response:
            body = await response.text()
            assert response.headers.get("x-outrigger-error") != "circuit_open", body
            assert response.headers.get("x-outrigger-error") == "upstream_unreachable", body
            assert response.headers.get("x-outrigger-attempts") == "1"
    state = await admin_state(proxy)
    assert all(s["circuit_breaker"] is None for name, s in state.items() if name != HOST), state
