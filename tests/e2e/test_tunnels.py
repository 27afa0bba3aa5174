"""CONNECT tunnels for policies with ``connect: tunnel`` (SPEC 2): `requests` and `httpx` with
HTTPS_PROXY reach a TLS upstream (trustme CA) through Outrigger, which sees only bytes."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import httpx
import pytest
import requests
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from tests.conftest import AccessLog, RunningProxy, StartProxy, free_port, loopback_policy
from tests.e2e.upstreams import RawConnection, TlsMaterial


@pytest.fixture
async def tls_upstream(aiohttp_server: AiohttpServer, tmp_path: Path) -> tuple[int, Path]:
    """An HTTPS upstream on 127.0.0.1 with a certificate for ``localhost`` from a private CA."""
    tls = TlsMaterial.create(tmp_path)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"secure hello {request.query.get('n', '')}")

    app = web.Application()
    app.router.add_get("/hello", hello)
    server = await aiohttp_server(app, ssl=tls.server_context())
    assert server.port is not None
    return server.port, tls.ca_file


def tunnel_policy(port: int, **extra: object) -> dict[str, object]:
    return {
        **loopback_policy(f"https://localhost:{port}", host=f"localhost:{port}"),
        "connect": "tunnel",
        **extra,
    }


async def connect_head(proxy: RunningProxy, authority: str) -> tuple[int, dict[str, str]]:
    """Send `CONNECT authority` on a fresh connection; the answer's status and headers."""
    connection = await RawConnection.open(proxy.port)
    try:
        await connection.send(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        status, _, headers = await connection.read_head()
    finally:
        await connection.close()
    return status, {name.lower(): value for name, value in headers}


async def _metrics(proxy: RunningProxy) -> str:
    return await asyncio.to_thread(
        lambda: requests.get(f"http://127.0.0.1:{proxy.admin_port}/metrics", timeout=5).text
    )


async def test_requests_and_httpx_reach_a_tls_upstream_through_the_tunnel(
    start_proxy: StartProxy, tls_upstream: tuple[int, Path], access_log: AccessLog
) -> None:
    port, ca_file = tls_upstream
    proxy = await start_proxy([tunnel_policy(port)])
    url = f"https://localhost:{port}/hello"

    def with_requests() -> str:
        reply = requests.get(
            url, params={"n": "1"}, proxies={"https": proxy.url}, verify=str(ca_file), timeout=10
        )
        reply.raise_for_status()
        return reply.text

    def with_httpx() -> str:
        with httpx.Client(proxy=proxy.url, verify=ssl.create_default_context(cafile=str(ca_file))) as client:
            return client.get(url, params={"n": "2"}, timeout=10).text

    assert await asyncio.to_thread(with_requests) == "secure hello 1"
    assert await asyncio.to_thread(with_httpx) == "secure hello 2"
    for _ in range(100):  # the tunnels end when the clients close them
        if len([e for e in access_log.entries if e["method"] == "CONNECT"]) == 2:
            break
        await asyncio.sleep(0.02)
    lines = [e for e in access_log.entries if e["method"] == "CONNECT"]
    assert [(e["status"], e["policy"], e["host"]) for e in lines] == [
        (200, f"localhost:{port}", "localhost")
    ] * 2
    metrics = await _metrics(proxy)
    assert f'outrigger_tunnels_total{{host="localhost:{port}",result="closed"}} 2.0' in metrics
    assert f'outrigger_tunnel_bytes_total{{direction="upstream",host="localhost:{port}"}}' in metrics


@pytest.mark.parametrize(
    ("authority", "status", "error"),
    [
        pytest.param("localhost:{other}", 403, "host_not_allowed", id="unclaimed-port"),
        pytest.param("elsewhere.test:443", 403, "host_not_allowed", id="unclaimed-host"),
        pytest.param("plain.test:443", 405, "connect_not_supported", id="policy-without-tunnel"),
        pytest.param("localhost", 400, "bad_request", id="no-port"),
    ],
)
async def test_a_tunnel_outside_the_allowlist_is_refused(
    start_proxy: StartProxy, tls_upstream: tuple[int, Path], authority: str, status: int, error: str
) -> None:
    port, _ = tls_upstream
    proxy = await start_proxy([tunnel_policy(port), loopback_policy("https://plain.test", host="plain.test")])
    answer, headers = await connect_head(proxy, authority.format(other=free_port()))
    assert answer == status
    assert headers["x-outrigger-error"] == error


async def test_a_private_address_is_refused_without_allow_private_addresses(
    start_proxy: StartProxy, tls_upstream: tuple[int, Path]
) -> None:
    port, _ = tls_upstream
    proxy = await start_proxy([tunnel_policy(port, allow_private_addresses=False)])
    answer, headers = await connect_head(proxy, f"localhost:{port}")
    assert answer == 403
    assert headers["x-outrigger-error"] == "address_not_allowed"


async def test_a_silent_tunnel_closes_after_idle(
    start_proxy: StartProxy, tls_upstream: tuple[int, Path]
) -> None:
    port, _ = tls_upstream
    proxy = await start_proxy([tunnel_policy(port, timeouts={"idle": "300ms"})])
    connection = await RawConnection.open(proxy.port)
    loop = asyncio.get_running_loop()
    try:
        await connection.send(f"CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n".encode())
        answer, reason, _ = await connection.read_head()
        assert (answer, reason) == (200, "Connection established")
        started = loop.time()
        assert await connection.at_eof()
        assert 0.25 <= loop.time() - started < 2.0
    finally:
        await connection.close()
    metrics = await _metrics(proxy)
    assert f'outrigger_tunnels_total{{host="localhost:{port}",result="idle_timeout"}} 1.0' in metrics
