"""Failover end to end: two real aiohttp upstreams on 127.0.0.1, a primary and a failover.

The primary can answer 503, answer 200, or be down (its listener stopped, so connections are
refused); it can come back on the same port. Proves: a retried POST reaches the failover with the
failover's own credentials (never the primary's) and the same idempotency key; the response names
the upstream that answered; once the primary's breaker opens, requests go straight to the
failover without touching the primary; after `reset_timeout` the half-open trial goes to the
primary and traffic returns; /state shows both breakers; metrics count the failovers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDict

from tests.conftest import RunningProxy, StartProxy, free_port, loopback_policy
from tests.e2e.test_metrics import scrape
from tests.fakes import admin_state, call

HOST = "upstream.test"
RESET = 1.0
"""The breakers' reset_timeout: long enough that 'still open' checks are not racing it."""


@dataclass
class Upstream:
    """A real upstream on a fixed loopback port that can be stopped and started again."""

    name: str
    status: int = 200
    port: int = field(default_factory=free_port)
    seen: list[CIMultiDict[str]] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.seen.append(CIMultiDict(request.headers))
        return web.Response(status=self.status, text=f"{self.name} says {self.status}")

    async def start(self) -> Upstream:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@pytest.fixture
async def upstreams() -> AsyncIterator[tuple[Upstream, Upstream]]:
    primary, standby = Upstream("primary"), Upstream("standby")
    await primary.start()
    await standby.start()
    yield primary, standby
    await primary.stop()
    await standby.stop()


async def _start(
    start_proxy: StartProxy, tmp_path: Path, primary: Upstream, standby: Upstream
) -> RunningProxy:
    (tmp_path / "primary-key").write_text("primary-secret\n")
    (tmp_path / "standby-key").write_text("standby-secret\n")
    policy: dict[str, Any] = loopback_policy(
        primary.url,
        headers={"set": {"Authorization": f"Bearer ${{file:{tmp_path / 'primary-key'}}}"}},
        retries={
            "max_attempts": 3,
            "on": ["connect-failure", "503"],
            "backoff": {"base": "10ms", "max": "20ms"},
            "budget": None,
        },
        idempotency={},
        circuit_breaker={
            "failure_threshold": 2,
            "reset_timeout": f"{int(RESET * 1000)}ms",
            "failure_on": ["connect-failure", "5xx"],
        },
        failover={
            "upstreams": [
                {
                    "url": standby.url,
                    "headers": {"set": {"Authorization": f"Bearer ${{file:{tmp_path / 'standby-key'}}}"}},
                }
            ]
        },
    )
    return await start_proxy([policy])


async def _send(proxy: RunningProxy, method: str = "GET") -> Any:
    return await call(
        method,
        f"{proxy.url}/v1/charges",
        headers={"Host": HOST},
        data=b"amount=5" if method == "POST" else None,
    )


async def test_a_retried_post_reaches_the_failover_with_its_own_credentials_and_the_same_key(
    upstreams: tuple[Upstream, Upstream], start_proxy: StartProxy, tmp_path: Path
) -> None:
    primary, standby = upstreams
    primary.status = 503
    proxy = await _start(start_proxy, tmp_path, primary, standby)

    reply = await _send(proxy, "POST")

    assert reply.status == 200
    assert reply.body == b"standby says 200"
    assert reply.headers["x-outrigger-upstream"] == standby.url
    assert reply.headers["x-outrigger-attempts"] == "2"
    (to_primary,) = primary.seen
    (to_standby,) = standby.seen
    assert to_primary.getall("Authorization") == ["Bearer primary-secret"]
    assert to_standby.getall("Authorization") == ["Bearer standby-secret"], "the primary's key stays home"
    key = to_primary["Idempotency-Key"]
    assert len(key) == 36
    assert to_standby.getall("Idempotency-Key") == [key]
    assert to_standby["Host"] == f"127.0.0.1:{standby.port}"


async def test_primary_down_breaker_opens_failover_serves_then_the_half_open_trial_brings_traffic_back(
    upstreams: tuple[Upstream, Upstream], start_proxy: StartProxy, tmp_path: Path
) -> None:
    primary, standby = upstreams
    proxy = await _start(start_proxy, tmp_path, primary, standby)
    reply = await _send(proxy)
    assert reply.headers["x-outrigger-upstream"] == primary.url, "healthy: the primary answers"
    assert reply.body == b"primary says 200"
    await primary.stop()  # connections to the primary are refused from now on

    # two refused attempts (one per request) open the primary's breaker; each retry is answered
    for _ in range(2):
        reply = await _send(proxy)
        assert reply.status == 200
        assert reply.body == b"standby says 200"
        assert reply.headers["x-outrigger-upstream"] == standby.url
        assert reply.headers["x-outrigger-attempts"] == "2"
    loop = asyncio.get_running_loop()
    opened_at = loop.time()
    state = (await admin_state(proxy))[HOST]
    by_url = {u["url"]: u["circuit_breaker"] for u in state["failover"]["upstreams"]}
    assert by_url[primary.url]["state"] == "open"
    assert by_url[standby.url]["state"] == "closed"
    assert state["circuit_breaker"]["state"] == "open"

    # open: straight to the failover, no attempt spent on the primary (even once it is back up)
    await primary.start()
    primary.seen.clear()
    reply = await _send(proxy)
    assert loop.time() - opened_at < RESET, "the check ran inside reset_timeout"
    assert reply.headers["x-outrigger-upstream"] == standby.url
    assert reply.headers["x-outrigger-attempts"] == "1"
    assert primary.seen == []

    # after reset_timeout the half-open trial goes to the primary, and traffic stays there
    await asyncio.sleep(max(0.0, opened_at + RESET + 0.1 - loop.time()))
    before = len(standby.seen)
    for _ in range(3):
        reply = await _send(proxy)
        assert reply.status == 200
        assert reply.body == b"primary says 200"
        assert reply.headers["x-outrigger-upstream"] == primary.url
        assert reply.headers["x-outrigger-attempts"] == "1"
    assert len(primary.seen) == 3
    assert len(standby.seen) == before
    state = (await admin_state(proxy))[HOST]
    by_url = {u["url"]: u["circuit_breaker"] for u in state["failover"]["upstreams"]}
    assert by_url[primary.url]["state"] == "closed"

    metrics = await scrape(proxy)
    assert metrics.value("outrigger_failovers_total", host=HOST, upstream=standby.url) == 3.0
    assert metrics.value("outrigger_failovers_total", host=HOST, upstream=primary.url) == 0.0


async def test_when_both_upstreams_are_down_the_breakers_open_and_requests_fail_fast(
    upstreams: tuple[Upstream, Upstream], start_proxy: StartProxy, tmp_path: Path
) -> None:
    primary, standby = upstreams
    proxy = await _start(start_proxy, tmp_path, primary, standby)
    await primary.stop()
    await standby.stop()

    first = await _send(proxy)
    assert first.status == 502
    assert first.json()["error"]["type"] == "upstream_unreachable"
    second = await _send(proxy)
    assert second.status == 502

    # request 1: primary, standby, primary (all refused); request 2: standby again: both open
    third = await _send(proxy)
    assert third.status == 503
    assert third.json()["error"]["type"] == "circuit_open"
    assert third.headers["x-outrigger-attempts"] == "0"
    assert int(third.headers["Retry-After"]) >= 1
    state = (await admin_state(proxy))[HOST]
    assert [u["circuit_breaker"]["state"] for u in state["failover"]["upstreams"]] == ["open", "open"]


async def test_a_policy_without_failover_does_not_name_the_upstream(
    upstreams: tuple[Upstream, Upstream], start_proxy: StartProxy
) -> None:
    primary, _ = upstreams
    proxy = await start_proxy([loopback_policy(primary.url)])

    reply = await _send(proxy)

    assert reply.status == 200
    assert "x-outrigger-upstream" not in reply.headers
    assert reply.headers["x-outrigger-attempts"] == "1"
