"""A slow app upload is the app's problem, not the upstream's; a dead address falls back to the next."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.transport import resolver
from tests.conftest import StartProxy, loopback_policy

AiohttpServer = Callable[..., Awaitable[TestServer]]


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
