"""WebSockets (and other upgrades) through Outrigger on every entry mode (SPEC 2).

A real aiohttp WebSocket server upstream and aiohttp's WebSocket client as the
app; after the upstream's 101, bytes flow both ways untouched.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from pytest_aiohttp import AiohttpServer

from tests.conftest import StartProxy, free_port, loopback_policy
from tests.e2e.upstreams import raw_exchange, request_bytes
from tests.fakes import admin_state

HOST = "ws.test"


@pytest.fixture
async def echo_server(aiohttp_server: AiohttpServer) -> tuple[str, list[dict[str, str]]]:
    """ws://.../echo echoes text and binary; a text 'close:N' closes with code N."""
    handshakes: list[dict[str, str]] = []

    async def echo(request: web.Request) -> web.WebSocketResponse:
        handshakes.append(dict(request.headers))
        ws = web.WebSocketResponse(max_msg_size=4 << 20)
        await ws.prepare(request)
        async for message in ws:
            if message.type == WSMsgType.TEXT and message.data.startswith("close:"):
                await ws.close(code=int(message.data[6:]), message=b"bye")
            elif message.type == WSMsgType.TEXT:
                await ws.send_str(message.data)
            elif message.type == WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        return ws

    async def silent(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=None)
        await ws.prepare(request)
        await asyncio.sleep(10)
        return ws

    app = web.Application()
    app.router.add_get("/echo", echo)
    app.router.add_get("/silent", silent)

    async def declines(request: web.Request) -> web.Response:
        return web.Response(status=426, text="upgrade required")

    app.router.add_get("/plain", declines)
    server = await aiohttp_server(app)
    return f"http://127.0.0.1:{server.port}", handshakes


async def test_echo_text_binary_and_close_code_through_a_dedicated_port(
    start_proxy: StartProxy, echo_server: tuple[str, list[dict[str, str]]]
) -> None:
    url, handshakes = echo_server
    port = free_port()
    await start_proxy(
        [loopback_policy(url, host=HOST, listen=port, headers={"set": {"Authorization": "Bearer s3cret"}})]
    )
    async with (
        aiohttp.ClientSession() as client,
        client.ws_connect(f"ws://127.0.0.1:{port}/echo", max_msg_size=4 << 20) as ws,
    ):
        await ws.send_str("hello")
        assert (await ws.receive(timeout=5)).data == "hello"
        await ws.send_bytes(b"\x00\x01\xff")
        assert (await ws.receive(timeout=5)).data == b"\x00\x01\xff"
        big = bytes(range(256)) * 4096  # 1 MiB
        await ws.send_bytes(big)
        assert (await ws.receive(timeout=10)).data == big
        await ws.send_str("close:4001")
        closing = await ws.receive(timeout=5)
        assert closing.type == WSMsgType.CLOSE
        assert ws.close_code == 4001
    assert handshakes[0]["Authorization"] == "Bearer s3cret", "the policy's headers reach the handshake"
    assert handshakes[0]["Upgrade"].lower() == "websocket"


@pytest.mark.parametrize("mode", ["host-header", "forward-proxy"])
async def test_the_main_listener_upgrades_too(
    start_proxy: StartProxy, echo_server: tuple[str, list[dict[str, str]]], mode: str
) -> None:
    url, _ = echo_server
    proxy = await start_proxy([loopback_policy(url, host=HOST)])
    async with aiohttp.ClientSession() as client:
        if mode == "host-header":
            connecting = client.ws_connect(f"ws://127.0.0.1:{proxy.port}/echo", headers={"Host": HOST})
        else:
            connecting = client.ws_connect(f"ws://{HOST}/echo", proxy=proxy.url)
        async with connecting as ws:
            await ws.send_str(mode)
            assert (await ws.receive(timeout=5)).data == mode


async def test_a_hundred_sockets_at_once_and_concurrency_counts_them(
    start_proxy: StartProxy, echo_server: tuple[str, list[dict[str, str]]]
) -> None:
    url, _ = echo_server
    port = free_port()
    proxy = await start_proxy(
        [loopback_policy(url, host=HOST, listen=port, concurrency={"max_in_flight": 200})]
    )
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        sockets = [await client.ws_connect(f"ws://127.0.0.1:{port}/echo") for _ in range(100)]
        try:
            state = await admin_state(proxy)
            assert state[HOST]["concurrency"]["in_flight"] == 100, "an open socket holds its slot"
            for index, ws in enumerate(sockets):
                await ws.send_str(f"n{index}")
            answers = [(await ws.receive(timeout=10)).data for ws in sockets]
            assert answers == [f"n{index}" for index in range(100)]
        finally:
            for ws in sockets:
                await ws.close()
    for _ in range(100):  # bounded: slots come back as the splices end
        if (await admin_state(proxy))[HOST]["concurrency"]["in_flight"] == 0:
            break
        await asyncio.sleep(0.02)
    assert (await admin_state(proxy))[HOST]["concurrency"]["in_flight"] == 0


async def test_a_silent_socket_is_closed_after_idle(
    start_proxy: StartProxy, echo_server: tuple[str, list[dict[str, str]]]
) -> None:
    url, _ = echo_server
    port = free_port()
    await start_proxy([loopback_policy(url, host=HOST, listen=port, timeouts={"idle": "300ms"})])
    loop = asyncio.get_running_loop()
    async with (
        aiohttp.ClientSession() as client,
        client.ws_connect(f"ws://127.0.0.1:{port}/silent", heartbeat=None, autoclose=False) as ws,
    ):
        started = loop.time()
        message = await ws.receive(timeout=5)
        assert message.type in (WSMsgType.CLOSED, WSMsgType.CLOSE, WSMsgType.ERROR)
        assert 0.25 <= loop.time() - started < 2.0


async def test_an_upgrade_the_upstream_declines_is_an_ordinary_response(
    start_proxy: StartProxy, echo_server: tuple[str, list[dict[str, str]]]
) -> None:
    url, _ = echo_server
    port = free_port()
    await start_proxy([loopback_policy(url, host=HOST, listen=port)])
    head = (
        "GET /plain HTTP/1.1\nHost: localhost\nConnection: Upgrade\nUpgrade: websocket\n"
        "Sec-WebSocket-Version: 13\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="
    )
    response = await raw_exchange(port, request_bytes(head))
    assert (response.status, response.body) == (426, b"upgrade required")


async def test_upgraded_connections_are_counted_in_bytes(
    start_proxy: StartProxy, echo_server: tuple[str, list[dict[str, str]]]
) -> None:
    url, _ = echo_server
    port = free_port()
    proxy = await start_proxy([loopback_policy(url, host=HOST, listen=port)])
    async with aiohttp.ClientSession() as client:
        async with client.ws_connect(f"ws://127.0.0.1:{port}/echo") as ws:
            await ws.send_bytes(b"x" * 10_000)
            await ws.receive(timeout=5)
        for _ in range(100):
            async with client.get(f"http://127.0.0.1:{proxy.admin_port}/metrics") as reply:
                text = await reply.text()
            if f'outrigger_tunnel_bytes_total{{direction="app",host="{HOST}"}}' in text:
                break
            await asyncio.sleep(0.02)
    lines = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith("outrigger_tunnel_bytes_total")
    }
    assert lines[f'outrigger_tunnel_bytes_total{{direction="upstream",host="{HOST}"}}'] >= 10_000
    assert lines[f'outrigger_tunnel_bytes_total{{direction="app",host="{HOST}"}}'] >= 10_000
    assert f'outrigger_requests_total{{code="101",host="{HOST}",method="GET"}} 1.0' in text
