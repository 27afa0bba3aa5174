"""Regression tests for the review fixes of b7ca6f1, on real sockets (127.0.0.1 only).

Each test failed on the commit before the fixes: apps that hang up keep retrying and hold their
bulkhead slot; a broken-off upload counts against the upstream; bulkhead queueing is outside the
deadline; unknown hosts share one breaker; a reload during shutdown reopens listeners; upstream
``x-outrigger-*`` headers leak to the app; ``OPTIONS *`` and trailing-dot hosts are mishandled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import RunningProxy, StartProxy, free_port, loopback_policy
from tests.e2e.procs import RawUpstream, assert_error
from tests.e2e.upstreams import raw_exchange
from tests.fakes import Gate, ScriptedUpstream

AiohttpServer = Callable[..., Awaitable[TestServer]]
HOST = "upstream.test"
ACCESS_LOGGER = "outrigger.access"
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=8)


@dataclass
class Upstream:
    """Counts requests per path; /slow waits `delay` then answers `status`; anything else is 200."""

    status: int = 503
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits[request.path] = self.hits.get(request.path, 0) + 1
        with contextlib.suppress(aiohttp.ClientPayloadError, ConnectionError):
            await request.read()
        if request.path == "/slow":
            await asyncio.sleep(self.delay)
            return web.Response(status=self.status, text=f"upstream {self.status}")
        return web.Response(status=200, text="ok", headers=self.headers)


@pytest.fixture
async def upstream(aiohttp_server: AiohttpServer) -> Upstream:
    behaviour = Upstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", behaviour.handle)
    behaviour.server = await aiohttp_server(app)
    return behaviour


@pytest.fixture
def access_lines(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> Callable[[], list[Any]]:
    logger = logging.getLogger(ACCESS_LOGGER)
    monkeypatch.setattr(logger, "propagate", True)
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)

    def lines() -> list[Any]:
        return [json.loads(r.getMessage()) for r in caplog.records if r.name == ACCESS_LOGGER]

    return lines


async def get(proxy: RunningProxy, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as client,
        client.get(f"{proxy.url}{path}", headers={"Host": HOST, **headers}) as response,
    ):
        return response.status, dict(response.headers), await response.read()


async def admin_state(proxy: RunningProxy) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as client,
        client.get(f"http://127.0.0.1:{proxy.admin_port}/state") as response,
    ):
        body: dict[str, Any] = await response.json()
        return body


async def hang_up_after(port: int, data: bytes, seconds: float) -> None:
    """Send `data` on a fresh connection, wait `seconds`, then close without reading an answer."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        await asyncio.sleep(seconds)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def wait_for(condition: Callable[[], bool], within: float) -> bool:
    for _ in range(int(within / 0.02) + 1):
        if condition():
            return True
        await asyncio.sleep(0.02)
    return condition()


# --------------------------------------------------------------------------- 1. handler cancellation


async def test_app_that_hangs_up_stops_its_retries_and_frees_its_slot(
    upstream: Upstream, start_proxy: StartProxy
) -> None:
    upstream.delay = 0.15  # each attempt is still in flight when the app hangs up at 0.1 s
    proxy = await start_proxy(
        [
            loopback_policy(
                upstream.url,
                retries={"max_attempts": 5, "on": [503], "backoff": {"base": "200ms", "max": "200ms"}},
                concurrency={"max_in_flight": 1, "max_queued": 0},
            )
        ]
    )
    await hang_up_after(proxy.port, f"GET /slow HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode(), 0.1)
    await asyncio.sleep(0.2)

    status, headers, body = await get(proxy, "/probe")
    assert status == 200, f"the departed app's handler still holds the only slot: {status} {body!r}"
    assert headers.get("x-outrigger-error") is None

    await asyncio.sleep(1.0)  # long enough for an orphaned handler to reach attempt 3 or more
    assert upstream.hits.get("/slow", 0) <= 2, upstream.hits


# --------------------------------------------------------------------------- 2. broken-off uploads

BREAKER = {"failure_threshold": 1, "failure_on": ["connect-failure", "reset", "timeout", "5xx"]}
PARTIAL_UPLOAD = (
    f"POST /upload HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 1000000\r\n"
    "Content-Type: application/octet-stream\r\n"
)


async def test_broken_off_upload_is_the_apps_failure_not_the_upstreams(
    upstream: Upstream, start_proxy: StartProxy, access_lines: Callable[[], list[Any]]
) -> None:
    proxy = await start_proxy([loopback_policy(upstream.url, circuit_breaker=BREAKER)])
    await hang_up_after(proxy.port, (PARTIAL_UPLOAD + "\r\n").encode() + b"only a few bytes", 0.2)

    def logged() -> bool:
        return any(e["path"] == "/upload" for e in access_lines())

    assert await wait_for(logged, 3.0), access_lines()
    (entry,) = [e for e in access_lines() if e["path"] == "/upload"]
    assert entry["status"] == 499, entry
    assert entry["error_type"] in ("client_disconnected", "cancelled"), entry

    state = await admin_state(proxy)
    assert state[HOST]["circuit_breaker"]["state"] == "closed", state
    assert state[HOST]["circuit_breaker"]["consecutive_failures"] == 0, state
    status, headers, _ = await get(proxy, "/after")
    assert status == 200
    assert headers.get("x-outrigger-error") != "circuit_open"


async def test_broken_off_upload_while_buffering_for_retries_is_not_an_internal_error(
    upstream: Upstream, start_proxy: StartProxy, access_lines: Callable[[], list[Any]]
) -> None:
    proxy = await start_proxy(
        [
            loopback_policy(
                upstream.url,
                circuit_breaker=BREAKER,
                retries={"on": [503], "backoff": {"base": "10ms", "max": "10ms"}},
                idempotency={"replay": {"ttl": "1m"}},
            )
        ]
    )
    head = PARTIAL_UPLOAD + "Idempotency-Key: upload-1\r\n\r\n"
    await hang_up_after(proxy.port, head.encode() + b"only a few bytes", 0.2)

    def logged() -> bool:
        return any(e["path"] == "/upload" for e in access_lines())

    assert await wait_for(logged, 3.0), access_lines()
    (entry,) = [e for e in access_lines() if e["path"] == "/upload"]
    assert entry["status"] == 499, entry
    assert entry["error_type"] != "internal_error"
    assert upstream.hits.get("/upload", 0) == 0, "a body that never arrived whole is not sent"
    state = await admin_state(proxy)
    assert state[HOST]["circuit_breaker"]["state"] == "closed", state
    status, _, _ = await get(proxy, "/after")
    assert status == 200


# --------------------------------------------------------------------------- 4. no URLs in error messages


async def test_reset_during_upload_does_not_echo_the_url_with_its_query(start_proxy: StartProxy) -> None:
    """The upload-write failure (b7ca6f1 still echoed aiohttp's "Can not write request body for <url>";
    fixed in eb576d4)."""
    resetting = await RawUpstream("reset").start()  # reads the head, then RST while we upload
    try:
        proxy = await start_proxy([loopback_policy(f"http://127.0.0.1:{resetting.port}")])
        async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as client:
            for _ in range(3):
                async with client.post(
                    f"{proxy.url}/v1/x?token=SECRET", data=b"x" * 4_000_000, headers={"Host": HOST}
                ) as response:
                    text = await response.text()
                    assert response.status == 502, text
                    assert "SECRET" not in text
    finally:
        await resetting.close()


# --------------------------------------------------------------------------- 5. deadline from arrival


async def test_total_deadline_counts_time_queued_in_the_bulkhead(
    upstream: Upstream, start_proxy: StartProxy
) -> None:
    upstream.status, upstream.delay = 200, 0.4
    proxy = await start_proxy(
        [
            loopback_policy(
                upstream.url, concurrency={"max_in_flight": 1, "max_queued": 5, "queue_timeout": "2s"}
            )
        ]
    )
    first = asyncio.create_task(get(proxy, "/slow"))
    assert await wait_for(lambda: upstream.hits.get("/slow", 0) == 1, 2.0), "A never reached the upstream"
    started = time.monotonic()
    status, headers, body = await get(proxy, "/slow", **{"x-outrigger-timeout-ms": "500"})
    elapsed = time.monotonic() - started
    assert_error(status, headers, body, expected_status=504, error_type="timeout", host=HOST)
    assert elapsed < 0.75, f"B's 500 ms budget started at arrival, yet it took {elapsed:.2f}s"
    assert (await first)[0] == 200


# --------------------------------------------------------------------------- 6. unknown hosts


async def test_one_failing_unknown_host_does_not_open_a_breaker_for_the_others(
    upstream: Upstream, start_proxy: StartProxy
) -> None:
    dead = free_port()  # nothing listens here: every attempt is a connect failure
    assert upstream.server is not None
    proxy = await start_proxy(
        [loopback_policy(upstream.url)],
        unknown_hosts="allow",
        defaults={"allow_private_addresses": True, "circuit_breaker": BREAKER},
    )
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as client:
        async with client.get(f"{proxy.url}/x", headers={"Host": f"127.0.0.1:{dead}"}) as failed:
            assert failed.status == 502, await failed.text()
            assert failed.headers.get("x-outrigger-error") == "upstream_unreachable"
        # another unknown host (unknown hosts get https: this loopback server cannot complete TLS,
        # but the point is that the attempt is made rather than refused by a shared breaker)
        other = {"Host": f"localhost:{upstream.server.port}"}
        async with client.get(f"{proxy.url}/x", headers=other) as response:
            body = await response.text()
            assert response.headers.get("x-outrigger-error") != "circuit_open", body
            assert response.headers.get("x-outrigger-error") == "upstream_unreachable", body
            assert response.headers.get("x-outrigger-attempts") == "1"
    state = await admin_state(proxy)
    assert all(s["circuit_breaker"] is None for name, s in state.items() if name != HOST), state


# --------------------------------------------------------------------------- 9. OPTIONS *


async def test_options_asterisk_is_a_bad_request(upstream: Upstream, start_proxy: StartProxy) -> None:
    proxy = await start_proxy([loopback_policy(upstream.url)])
    reply = await raw_exchange(proxy.port, f"OPTIONS * HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    assert_error(reply.status, reply.headers, reply.body, expected_status=400, error_type="bad_request")
    assert sum(upstream.hits.values()) == 0


# --------------------------------------------------------------------------- 10. no reload while draining


async def test_reload_while_draining_is_refused_and_reopens_no_listener(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy
) -> None:
    gate = Gate(text="ok", hold_limit=8)
    upstream = await ScriptedUpstream(gate).start(aiohttp_server)
    proxy = await start_proxy([loopback_policy(upstream.url)], drain_timeout="8s")
    in_flight = asyncio.create_task(get(proxy, "/held"))
    await gate.wait_arrivals(1, within=3)

    stopping = asyncio.create_task(proxy.server.stop())
    try:
        assert await wait_for(lambda: proxy.server.bound_ports == [], 2.0)
        # an edit that a reload would apply (new version), with a port of its own to open
        policies = proxy.config.path.parent / "policies" / "test.yaml"
        extra = loopback_policy(upstream.url, host="other.test", listen=free_port())
        policies.write_text(yaml.safe_dump([*yaml.safe_load(policies.read_text()), extra]))
        async with (
            aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as client,
            client.post(f"http://127.0.0.1:{proxy.admin_port}/reload") as response,
        ):
            result = await response.json()
        assert proxy.server.bound_ports == [], "a reload during shutdown reopened a listener"
        assert response.status == 422, result
        assert result["ok"] is False
        assert result["error"] == "shutting down"
        assert result["version"] == proxy.config.version
        assert not stopping.done()
    finally:
        gate.open.set()
    assert (await in_flight)[0] == 200
    await asyncio.wait_for(stopping, 8)
    assert proxy.server.bound_ports == []


# --------------------------------------------------------------------------- 14. upstream control headers


async def test_upstream_x_outrigger_headers_do_not_reach_the_app(
    upstream: Upstream, start_proxy: StartProxy
) -> None:
    upstream.headers = {
        "x-outrigger-error": "circuit_open",
        "X-Outrigger-Replayed": "true",
        "x-custom": "kept",
    }
    proxy = await start_proxy([loopback_policy(upstream.url)])
    status, headers, body = await get(proxy, "/v1/x")
    assert (status, body) == (200, b"ok")
    lowered = {k.lower(): v for k, v in headers.items()}
    assert lowered.get("x-custom") == "kept"
    assert "x-outrigger-error" not in lowered
    assert "x-outrigger-replayed" not in lowered
    assert lowered.get("x-outrigger-attempts") == "1"  # Outrigger's own still set


# --------------------------------------------------------------------------- 15. host forms


async def test_host_with_a_trailing_dot_routes_like_the_host(
    upstream: Upstream, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy([loopback_policy(upstream.url)])
    reply = await raw_exchange(
        proxy.port, b"GET /v1/x HTTP/1.1\r\nHost: upstream.test.\r\nConnection: close\r\n\r\n"
    )
    assert reply.status == 200, reply.body
    assert reply.body == b"ok"
    assert upstream.hits == {"/v1/x": 1}


async def test_absolute_target_with_an_invalid_host_is_a_bad_request(
    upstream: Upstream, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy([loopback_policy(upstream.url)])
    reply = await raw_exchange(
        proxy.port, b"GET http://%75p.test/ HTTP/1.1\r\nHost: upstream.test\r\nConnection: close\r\n\r\n"
    )
    assert_error(reply.status, reply.headers, reply.body, expected_status=400, error_type="bad_request")
    assert sum(upstream.hits.values()) == 0
