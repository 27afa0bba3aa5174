"""A slow app upload is the app's problem, not the upstream's; a dead address falls back to the next."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from proxy.transport import resolver
from tests.conftest import AccessLog, StartProxy, loopback_policy
from tests.e2e.procs import wait_until
from tests.e2e.upstreams import CountingUpstream, hang_up_after
from tests.fakes import admin_state, app_get


async def _echo_upstream(aiohttp_server: AiohttpServer, seen: list[int]) -> TestServer:
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append(len(body))
        return web.Response(body=body)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return await aiohttp_server(app)


async def test_slow_app_upload_is_a_timeout_but_not_an_upstream_failure(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy
) -> None:
    seen: list[int] = []
    upstream = await _echo_upstream(aiohttp_server, seen)
    proxy = await start_proxy(
        [
            loopback_policy(
                f"http://127.0.0.1:{upstream.port}",
                timeouts={"per_try": "300ms", "idle": "500ms", "total": "5s"},
                circuit_breaker={"failure_threshold": 1, "failure_on": ["timeout", "5xx"]},
            )
        ]
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST /slow HTTP/1.1\r\nHost: upstream.test\r\nContent-Length: 10\r\n\r\nab")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 504"), head
    assert b"x-outrigger-error: timeout" in head.lower()
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"http://127.0.0.1:{proxy.admin_port}/state") as reply,
    ):
        state = await reply.json()
    assert state["upstream.test"]["circuit_breaker"]["state"] == "closed"
    assert state["upstream.test"]["circuit_breaker"]["consecutive_failures"] == 0


async def test_a_refused_address_falls_back_to_the_next_one(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    upstream = await _echo_upstream(aiohttp_server, seen)
    dead = "127.0.0.2"  # loopback, but nothing listens on that port there

    async def two_addresses(host: str, port: int) -> tuple[str, ...]:
        return (dead, "127.0.0.1")

    monkeypatch.setattr(resolver, "system_lookup", two_addresses)
    proxy = await start_proxy(
        [loopback_policy(f"http://multi.test:{upstream.port}", retries={"max_attempts": 2, "on": ["503"]})]
    )
    started = time.monotonic()
    async with (
        aiohttp.ClientSession() as client,
        client.post(
            f"{proxy.url}/x", data=b"payload", headers={"Host": "upstream.test", "Idempotency-Key": "k"}
        ) as reply,
    ):
        assert reply.status == 200
        assert await reply.read() == b"payload"
        assert reply.headers["x-outrigger-attempts"] == "1"
    assert seen == [7]
    assert time.monotonic() - started < 2


async def test_without_a_replayable_body_only_the_first_address_is_tried(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    upstream = await _echo_upstream(aiohttp_server, seen)

    async def two_addresses(host: str, port: int) -> tuple[str, ...]:
        return ("127.0.0.2", "127.0.0.1")

    monkeypatch.setattr(resolver, "system_lookup", two_addresses)
    proxy = await start_proxy([loopback_policy(f"http://multi.test:{upstream.port}")])
    async with (
        aiohttp.ClientSession() as client,
        client.post(f"{proxy.url}/x", data=b"payload", headers={"Host": "upstream.test"}) as reply,
    ):
        assert reply.status == 502
        assert json.loads(await reply.read())["error"]["type"] == "upstream_unreachable"
    assert seen == []


# --------------------------------------------------------------------------- uploads the app breaks off

HOST = "upstream.test"
BREAKER = {"failure_threshold": 1, "failure_on": ["connect-failure", "reset", "timeout", "5xx"]}
PARTIAL_UPLOAD = (
    f"POST /upload HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 1000000\r\n"
    "Content-Type: application/octet-stream\r\n"
)


@pytest.fixture
def access_lines(access_log: AccessLog) -> Callable[[], list[Any]]:
    return lambda: access_log.entries


async def test_broken_off_upload_is_the_apps_failure_not_the_upstreams(
    counting_upstream: CountingUpstream, start_proxy: StartProxy, access_lines: Callable[[], list[Any]]
) -> None:
    proxy = await start_proxy([loopback_policy(counting_upstream.url, circuit_breaker=BREAKER)])
    await hang_up_after(proxy.port, (PARTIAL_UPLOAD + "\r\n").encode() + b"only a few bytes", 0.2)

    def logged() -> bool:
        return any(e["path"] == "/upload" for e in access_lines())

    assert await wait_until(logged, within=3.0), access_lines()
    (entry,) = [e for e in access_lines() if e["path"] == "/upload"]
    assert entry["status"] == 499, entry
    assert entry["error_type"] in ("client_disconnected", "cancelled"), entry

    state = await admin_state(proxy)
    assert state[HOST]["circuit_breaker"]["state"] == "closed", state
    assert state[HOST]["circuit_breaker"]["consecutive_failures"] == 0, state
    status, headers, _ = await app_get(proxy, "/after")
    assert status == 200
    assert headers.get("x-outrigger-error") != "circuit_open"


async def test_broken_off_upload_while_buffering_for_retries_is_not_an_internal_error(
    counting_upstream: CountingUpstream, start_proxy: StartProxy, access_lines: Callable[[], list[Any]]
) -> None:
    proxy = await start_proxy(
        [
            loopback_policy(
                counting_upstream.url,
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

    assert await wait_until(logged, within=3.0), access_lines()
    (entry,) = [e for e in access_lines() if e["path"] == "/upload"]
    assert entry["status"] == 499, entry
    assert entry["error_type"] != "internal_error"
    assert counting_upstream.hits.get("/upload", 0) == 0, "a body that never arrived whole is not sent"
    state = await admin_state(proxy)
    assert state[HOST]["circuit_breaker"]["state"] == "closed", state
    status, _, _ = await app_get(proxy, "/after")
    assert status == 200
