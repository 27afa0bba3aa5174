"""The three entry modes against a real aiohttp upstream."""

from __future__ import annotations

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import StartProxy, free_port, loopback_policy


async def _upstream(aiohttp_server) -> TestServer:  # type: ignore[no-untyped-def]
    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"host": request.headers["Host"], "path": request.path_qs})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hello)
    server: TestServer = await aiohttp_server(app)
    return server


async def test_three_entry_modes(aiohttp_server, start_proxy: StartProxy) -> None:  # type: ignore[no-untyped-def]
    upstream = await _upstream(aiohttp_server)
    dedicated = free_port()
    proxy = await start_proxy([loopback_policy(f"http://127.0.0.1:{upstream.port}", listen=dedicated)])
    expected = {"host": f"127.0.0.1:{upstream.port}", "path": "/v1/x?a=1"}
    async with aiohttp.ClientSession() as client:
        async with client.get(f"http://127.0.0.1:{dedicated}/v1/x?a=1") as resp:
            assert await resp.json() == expected
            assert resp.headers["x-outrigger-attempts"] == "1"
        async with client.get("http://upstream.test/v1/x?a=1", proxy=proxy.url) as resp:
            assert await resp.json() == expected
        async with client.get(f"{proxy.url}/v1/x?a=1", headers={"Host": "upstream.test"}) as resp:
            assert await resp.json() == expected
