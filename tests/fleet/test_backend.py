"""The fleet backend inside a running Outrigger: the gauge, /state, and requests that never fail
because of Redis (down, frozen, back again)."""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.cli import main
from proxy.config.model import Fleet
from proxy.fleet.backend import FleetBackend, redacted
from tests.conftest import StartProxy, free_port, loopback_policy, write_config
from tests.e2e.procs import wait_until
from tests.fleet.conftest import RedisServer


async def _upstream() -> TestServer:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/{tail:.*}", ok)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


async def _gauge(client: aiohttp.ClientSession, admin_port: int) -> str | None:
    async with client.get(f"http://127.0.0.1:{admin_port}/metrics") as response:
        text = await response.text()
    lines = [line for line in text.splitlines() if line.startswith("outrigger_fleet_backend_up")]
    return lines[0].split()[-1] if lines else None


async def _state(client: aiohttp.ClientSession, admin_port: int, policy: str) -> dict[str, Any]:
    async with client.get(f"http://127.0.0.1:{admin_port}/state") as response:
        body: dict[str, dict[str, Any]] = await response.json()
    return body[policy]


async def test_requests_go_on_while_redis_is_down_frozen_and_back(
    start_proxy: StartProxy, redis_server: RedisServer, client: aiohttp.ClientSession
) -> None:
    upstream = await _upstream()
    port = free_port()
    policy = loopback_policy(
        str(upstream.make_url("")).rstrip("/"),
        listen=port,
        rate_limit={"rate": 1000, "scope": "fleet"},
        circuit_breaker={"scope": "fleet"},
    )
    fleet = {"redis": redis_server.url, "key_prefix": f"t{uuid.uuid4().hex[:8]}", "timeout": "50ms"}
    proxy = await start_proxy([policy], fleet=fleet)
    name = "upstream.test"
    try:

        async def get() -> int:
            async with client.get(f"http://127.0.0.1:{port}/x") as response:
                await response.read()
                return response.status

        assert await get() == 200
        assert await _gauge(client, proxy.admin_port) == "1.0"
        state = await _state(client, proxy.admin_port, name)
        assert state["rate_limit"]["scope"] == state["circuit_breaker"]["scope"] == "fleet"
        assert state["rate_limit"]["fleet_backend"] == state["circuit_breaker"]["fleet_backend"] == "up"

        redis_server.freeze()
        assert [await get() for _ in range(5)] == [200] * 5
        assert await _gauge(client, proxy.admin_port) == "0.0"
        redis_server.thaw()
        assert await wait_until(lambda: proxy.server.fleet is not None and proxy.server.fleet.up, within=3.0)

        redis_server.stop()
        assert [await get() for _ in range(5)] == [200] * 5
        state = await _state(client, proxy.admin_port, name)
        assert state["rate_limit"]["fleet_backend"] == state["circuit_breaker"]["fleet_backend"] == "down"

        redis_server.start()
        assert await wait_until(lambda: proxy.server.fleet is not None and proxy.server.fleet.up, within=3.0)
        assert await get() == 200
        assert await _gauge(client, proxy.admin_port) == "1.0"
    finally:
        await upstream.close()


async def test_without_a_fleet_section_there_is_no_fleet_gauge(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy([loopback_policy("http://127.0.0.1:9")])
    assert proxy.server.fleet is None
    assert await _gauge(client, proxy.admin_port) is None


def test_a_password_in_the_redis_url_is_never_shown() -> None:
    assert redacted("redis://:s3cret@redis:6379/0") == "redis://:****@redis:6379/0"
    assert redacted("redis://redis:6379/0") == "redis://redis:6379/0"


async def test_the_keys_of_one_policy_share_a_cluster_slot(redis_server: RedisServer) -> None:
    backend = FleetBackend(Fleet(redis=redis_server.url, key_prefix="prod"))
    try:
        assert backend.key("ratelimit", "api.stripe.com") == "prod:{api.stripe.com}:ratelimit"
        assert backend.key("pause", "api.stripe.com") == "prod:{api.stripe.com}:pause"
    finally:
        await backend.close()


def test_run_without_the_redis_package_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, [], fleet={"redis": "redis://127.0.0.1:6379/0"})
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)  # as if `outrigger[fleet]` were not installed
    assert main(["run", "-c", str(path)]) == 1
    error = capsys.readouterr().err
    assert "the redis package is not installed: pip install 'outrigger[fleet]'" in error
    assert "Traceback" not in error


async def test_the_redis_password_comes_from_its_reference(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", redis_server.port)
    writer.write(b"CONFIG SET requirepass s3cret\r\n")
    assert await reader.readline() == b"+OK\r\n"
    writer.close()
    monkeypatch.setenv("FLEET_REDIS_PASSWORD", "s3cret")
    (tmp_path / "redis-password").write_text("wrong\n")
    good = FleetBackend(
        Fleet(redis=f"redis://:${{env:FLEET_REDIS_PASSWORD}}@127.0.0.1:{redis_server.port}/0")
    )
    bad = FleetBackend(
        Fleet(redis=f"redis://:${{file:redis-password}}@127.0.0.1:{redis_server.port}/0"), tmp_path
    )
    try:
        ping = good.script("return redis.call('PING')")
        assert await good.run(ping, (), ()) == b"PONG"
        assert good.up
        assert await bad.run(bad.script("return redis.call('PING')"), (), ()) is None
        assert not bad.up, "refused for its wrong password: down, and the sidecar goes on locally"
    finally:
        await good.close()
        await bad.close()


async def test_config_shows_an_inline_redis_password_masked(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    fleet = {"redis": "redis://:s3cret@127.0.0.1:9/0", "key_prefix": "t"}
    proxy = await start_proxy([], fleet=fleet)
    async with client.get(f"http://127.0.0.1:{proxy.admin_port}/config") as response:
        text = await response.text()
    assert "s3cret" not in text
    assert (await response.json())["main"]["fleet"] == {
        "redis": "redis://:****@127.0.0.1:9/0",
        "key_prefix": "t",
        "timeout": "50ms",
    }


async def test_a_redis_unreachable_from_the_start_shows_as_down_before_any_request(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    fleet = {"redis": f"redis://127.0.0.1:{free_port()}/0", "key_prefix": "t"}  # nothing listens there
    proxy = await start_proxy([], fleet=fleet)

    async def down() -> bool:
        return await _gauge(client, proxy.admin_port) == "0.0"

    assert await wait_until(down, within=2.0)


def test_redacted_masks_only_inline_passwords_and_keeps_references() -> None:
    assert redacted("redis://${env:REDIS_HOST}:6379/0") == "redis://${env:REDIS_HOST}:6379/0"
    assert redacted("redis://u:hunter2@h/${env:DB}") == "redis://u:****@h/${env:DB}"
    assert redacted("redis://:${env:PW}@h:6379/0") == "redis://:${env:PW}@h:6379/0"
    assert redacted("redis://h:6379/0?password=abc") == "redis://h:6379/0?password=****"
    assert redacted("unix:///run/redis.sock") == "unix:///run/redis.sock"


async def test_the_probe_survives_a_pool_that_fails_to_close(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = FleetBackend(Fleet(redis=redis_server.url, key_prefix="t"), probe_interval=0.05)
    try:
        pool = backend._redis.connection_pool

        async def broken(*args: object, **kwargs: object) -> None:
            raise TimeoutError  # closing a connection to a frozen TLS peer times out

        monkeypatch.setattr(pool, "disconnect", broken)
        redis_server.stop()
        ping = backend.script("return 1")
        assert await backend.run(ping, (), ()) is None
        redis_server.start()
        assert await wait_until(lambda: backend.up, within=3.0)
    finally:
        monkeypatch.undo()
        await backend.close()
