"""Outrigger in front of a real third-party server: PyPI's httpbin under gunicorn."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
import pytest

from tests.conftest import RunningProxy, StartProxy, free_port, loopback_policy
from tests.e2e.procs import stop_process, wait_for_http_ok
from tests.e2e.upstreams import raw_exchange, request_bytes

STARTUP_TIMEOUT = 20.0
ATTEMPTS = "x-outrigger-attempts"


@dataclass(frozen=True)
class Httpbin:
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _gunicorn_command(port: int) -> list[str]:
    command = [
        sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{port}",
        "--worker-class", "gthread", "--threads", "8", "--log-level", "warning",
    ]  # fmt: skip
    try:
        from gunicorn.config import KNOWN_SETTINGS

        if any(setting.name == "control_socket_disable" for setting in KNOWN_SETTINGS):
            command.append("--no-control-socket")  # gunicorn >= 24 opens ~/.gunicorn/gunicorn.ctl
    except ImportError:  # pragma: no cover
        pass
    return [*command, "httpbin:app"]


@pytest.fixture(scope="module")
def httpbin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Httpbin]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("httpbin") / "gunicorn.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(_gunicorn_command(port), stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_for_http_ok(f"http://127.0.0.1:{port}/get", process, log_path, within=STARTUP_TIMEOUT)
        yield Httpbin(port)
    finally:
        stop_process(process)


@pytest.fixture
async def proxy(httpbin: Httpbin, start_proxy: StartProxy) -> RunningProxy:
    return await start_proxy([loopback_policy(httpbin.url, host="httpbin.test")])


def _client() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        auto_decompress=False, trust_env=False, timeout=aiohttp.ClientTimeout(total=10)
    )


async def test_get_echoes_args_and_host(proxy: RunningProxy, httpbin: Httpbin) -> None:
    async with (
        _client() as client,
        client.get("http://httpbin.test/get?a=1&b=two%20words", proxy=proxy.url) as resp,
    ):
        assert resp.status == 200
        assert resp.headers[ATTEMPTS] == "1"
        body = await resp.json()
    assert body["args"] == {"a": "1", "b": "two words"}
    assert body["headers"]["Host"] == f"127.0.0.1:{httpbin.port}"


async def test_post_json_echo(proxy: RunningProxy) -> None:
    payload = {"id": 42, "items": ["a", "b"], "text": "naïve ✓"}
    async with (
        _client() as client,
        client.post("http://httpbin.test/post", json=payload, proxy=proxy.url) as resp,
    ):
        assert resp.status == 200
        body = await resp.json()
    assert body["json"] == payload
    assert body["headers"]["Content-Type"] == "application/json"


async def test_upstream_error_status_passes_through_unchanged(proxy: RunningProxy) -> None:
    async with _client() as client, client.get("http://httpbin.test/status/418", proxy=proxy.url) as resp:
        assert resp.status == 418
        assert resp.headers[ATTEMPTS] == "1"
        assert "x-outrigger-error" not in resp.headers
        text = await resp.text()
    assert "teapot" in text


async def test_headers_seen_by_httpbin(proxy: RunningProxy, httpbin: Httpbin) -> None:
    head = "\n".join(
        [
            "GET /headers HTTP/1.1",
            "Host: httpbin.test",
            "Connection: keep-alive, X-Drop-Me",
            "X-Drop-Me: 1",
            "Keep-Alive: timeout=5",
            "TE: trailers",
            "Proxy-Authorization: Basic dXNlcjpwYXNz",
            "Upgrade: h2c",
            "X-Outrigger-Timeout-Ms: 5000",
            "X-Keep: kept",
            "User-Agent: e2e-test/1.0",
        ]
    )
    response = await raw_exchange(proxy.port, request_bytes(head))
    assert response.status == 200
    headers: dict[str, str] = json.loads(response.body)["headers"]
    assert headers["Host"] == f"127.0.0.1:{httpbin.port}"
    assert headers["X-Keep"] == "kept"
    assert headers["User-Agent"] == "e2e-test/1.0"
    lowered = {name.lower() for name in headers}
    for dropped in ("connection", "x-drop-me", "keep-alive", "te", "proxy-authorization", "upgrade"):
        assert dropped not in lowered, dropped
    assert not {name for name in lowered if name.startswith("x-outrigger-")}
    assert not lowered & {"via", "forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto"}
    # nothing else, apart from the tracing headers SPEC 8 lets Outrigger inject
    assert lowered - {"traceparent", "tracestate", "x-request-id"} == {"host", "x-keep", "user-agent"}


async def test_gzip_stays_compressed(proxy: RunningProxy) -> None:
    async with (
        _client() as client,
        client.get("http://httpbin.test/gzip", headers={"Accept-Encoding": "gzip"}, proxy=proxy.url) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Encoding"] == "gzip"
        raw = await resp.read()
        if "Content-Length" in resp.headers:
            assert int(resp.headers["Content-Length"]) == len(raw)
    assert raw[:2] == b"\x1f\x8b"  # still the gzip bytes, not decoded JSON
    assert json.loads(gzip.decompress(raw))["gzipped"] is True


async def test_stream_bytes_identical_to_direct(proxy: RunningProxy, httpbin: Httpbin) -> None:
    path = "/stream-bytes/100000?seed=7&chunk_size=4096"  # httpbin caps this at 100 KiB
    async with _client() as client:
        async with client.get(f"{httpbin.url}{path}") as direct:
            expected = await direct.read()
        async with client.get(f"http://httpbin.test{path}", proxy=proxy.url) as resp:
            assert resp.status == 200
            received = await resp.read()
    assert len(expected) == 100000
    assert received == expected


async def test_drip_is_streamed_not_buffered(proxy: RunningProxy) -> None:
    """httpbin sends one byte every 0.2 s; they must reach the app spread out, not all at the end."""
    arrivals: list[float] = []
    data = b""
    async with (
        _client() as client,
        client.get("http://httpbin.test/drip?duration=1&numbytes=5&delay=0", proxy=proxy.url) as resp,
    ):
        assert resp.status == 200
        async for chunk in resp.content.iter_any():
            arrivals.append(time.monotonic())
            data += chunk
    assert data == b"*****"
    assert arrivals[-1] - arrivals[0] >= 0.5


async def test_response_headers_are_relayed(proxy: RunningProxy, httpbin: Httpbin) -> None:
    query = "X-Custom=one&X-Custom=two&Content-Type=text/x-test"
    async with _client() as client:
        async with client.get(f"{httpbin.url}/response-headers?{query}") as direct:
            expected = await direct.read()
            expected_types = direct.headers.getall("Content-Type")
        async with client.get(f"http://httpbin.test/response-headers?{query}", proxy=proxy.url) as resp:
            assert resp.status == 200
            assert resp.headers.getall("X-Custom") == ["one", "two"]
            # httpbin repeats Content-Type (its own JSON one, then the requested one): both relayed, in order
            assert (
                resp.headers.getall("Content-Type") == expected_types == ["application/json", "text/x-test"]
            )
            assert resp.headers[ATTEMPTS] == "1"
            assert await resp.read() == expected
