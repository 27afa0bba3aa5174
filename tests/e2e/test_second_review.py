"""Regressions found by the second code review (end to end, real sockets on 127.0.0.1)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.config.loader import load_config
from tests.conftest import StartProxy, free_port, loopback_policy

AiohttpServer = Callable[..., Awaitable[TestServer]]


async def test_policies_written_on_one_line_keep_their_own_credentials(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy, tmp_path: Path
) -> None:
    async def echo(request: web.Request) -> web.Response:
        return web.Response(text=request.headers.get("X-Secret", ""))

    app = web.Application()
    app.router.add_get("/{tail:.*}", echo)
    upstream = await aiohttp_server(app)
    url = f"http://127.0.0.1:{upstream.port}"
    proxy = await start_proxy([loopback_policy(url, host="placeholder.test")])
    flow = [
        loopback_policy(url, host="a.test", headers={"set": {"X-Secret": "for-a"}}),
        loopback_policy(url, host="b.test", headers={"set": {"X-Secret": "for-b"}}),
    ]
    policy_file = tmp_path / "policies" / "test.yaml"
    policy_file.write_text(yaml.safe_dump(flow, default_flow_style=True, width=100_000))
    assert len(policy_file.read_text().strip().splitlines()) == 1, "both policies on one line"
    await proxy.server.apply(load_config(proxy.config.path))
    async with aiohttp.ClientSession() as client:
        for host, secret in (("a.test", "for-a"), ("b.test", "for-b")):
            async with client.get(f"{proxy.url}/x", headers={"Host": host}) as reply:
                assert reply.status == 200
                assert await reply.text() == secret


async def test_an_upstream_that_stops_reading_the_upload_is_an_upstream_timeout(
    start_proxy: StartProxy,
) -> None:
    """Blocked writing to the upstream is the upstream's fault: it counts for the breaker."""
    port = free_port()
    accepted: list[asyncio.StreamWriter] = []

    async def never_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # read nothing, answer nothing

    server = await asyncio.start_server(never_read, "127.0.0.1", port)
    try:
        proxy = await start_proxy(
            [
                loopback_policy(
                    f"http://127.0.0.1:{port}",
                    timeouts={"per_try": "2s", "idle": "500ms", "total": "5s"},
                    circuit_breaker={"failure_threshold": 1, "failure_on": ["timeout"]},
                )
            ]
        )
        payload = b"x" * (32 * 1024 * 1024)  # far more than the socket buffers hold
        async with aiohttp.ClientSession() as client:
            async with client.put(
                f"{proxy.url}/up", data=payload, headers={"Host": "upstream.test"}
            ) as reply:
                assert reply.status == 504
                assert reply.headers["x-outrigger-error"] == "timeout"
            async with client.get(f"http://127.0.0.1:{proxy.admin_port}/state") as reply:
                state = await reply.json()
        assert state["upstream.test"]["circuit_breaker"]["state"] == "open"
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
