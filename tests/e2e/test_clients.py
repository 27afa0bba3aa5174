"""Real HTTP clients through Outrigger: requests, httpx (sync and async) and curl.

Outrigger runs in this test's event loop, so blocking clients run in a worker
thread (`asyncio.to_thread`) and curl in a subprocess; every call has a timeout.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from aiohttp import web
from multidict import CIMultiDict
from pytest_aiohttp import AiohttpServer

from tests.conftest import RunningProxy, StartProxy, free_port, loopback_policy
from tests.e2e.upstreams import Recorder, Seen, start_recording

CLIENT_TIMEOUT = 5.0
ATTEMPTS = "x-outrigger-attempts"


@dataclass
class Setup:
    proxy: RunningProxy
    recorder: Recorder
    upstream_port: int
    dedicated: int

    @property
    def dedicated_url(self) -> str:
        return f"http://127.0.0.1:{self.dedicated}"


async def _respond(request: web.Request, seen: Seen) -> web.StreamResponse:
    """Echo what arrived: method, target, a few headers, and the body's length and hash."""
    data = {
        "method": seen.method,
        "path": seen.raw_path,
        "host": seen.get("Host"),
        "user_agent": seen.get("User-Agent"),
        "length": len(seen.body),
        "sha256": hashlib.sha256(seen.body).hexdigest(),
        "json": json.loads(seen.body) if seen.get("Content-Type") == "application/json" else None,
    }
    status = 201 if seen.method == "POST" else 200
    return web.json_response(data, status=status, headers={"X-Upstream": "yes", "ETag": '"e1"'})


@pytest.fixture
async def setup(aiohttp_server: AiohttpServer, start_proxy: StartProxy) -> Setup:
    upstream, recorder = await start_recording(aiohttp_server, _respond)
    assert upstream.port is not None
    dedicated = free_port()
    proxy = await start_proxy([loopback_policy(f"http://127.0.0.1:{upstream.port}", listen=dedicated)])
    return Setup(proxy, recorder, upstream.port, dedicated)


def _check_get(status: int, headers: Any, body: dict[str, Any], setup: Setup, user_agent: str) -> None:
    assert status == 200
    assert headers["X-Upstream"] == "yes"
    assert headers["ETag"] == '"e1"'
    assert headers[ATTEMPTS] == "1"
    assert headers["Content-Type"].startswith("application/json")
    assert body["method"] == "GET"
    assert body["path"] == "/v1/items?q=a%20b&n=1"
    assert body["host"] == f"127.0.0.1:{setup.upstream_port}"
    assert body["user_agent"].startswith(user_agent)  # the client's own, never replaced


def _check_post(status: int, headers: Any, body: dict[str, Any], payload: dict[str, Any]) -> None:
    assert status == 201
    assert headers[ATTEMPTS] == "1"
    assert body["method"] == "POST"
    assert body["json"] == payload


PAYLOAD = {"amount": 1099, "currency": "eur", "note": "ünïcode ✓"}


# --------------------------------------------------------------------------- requests


async def test_requests_through_http_proxy(setup: Setup) -> None:
    def run() -> tuple[requests.Response, requests.Response]:
        with requests.Session() as session:
            session.trust_env = False
            proxies = {"http": setup.proxy.url}
            got = session.get(
                "http://upstream.test/v1/items?q=a%20b&n=1", proxies=proxies, timeout=CLIENT_TIMEOUT
            )
            posted = session.post(
                "http://upstream.test/v1/charges", json=PAYLOAD, proxies=proxies, timeout=CLIENT_TIMEOUT
            )
            return got, posted

    got, posted = await asyncio.to_thread(run)
    _check_get(got.status_code, got.headers, got.json(), setup, "python-requests/")
    _check_post(posted.status_code, posted.headers, posted.json(), PAYLOAD)


async def test_requests_with_a_dedicated_port_base_url(setup: Setup) -> None:
    upload = os.urandom(512 * 1024)

    def run() -> tuple[requests.Response, requests.Response]:
        with requests.Session() as session:
            session.trust_env = False
            got = session.get(f"{setup.dedicated_url}/v1/items?q=a%20b&n=1", timeout=CLIENT_TIMEOUT)
            # a generator body: requests sends it with Transfer-Encoding: chunked
            chunks = (upload[i : i + 65536] for i in range(0, len(upload), 65536))
            put = session.put(f"{setup.dedicated_url}/v1/blob", data=chunks, timeout=CLIENT_TIMEOUT)
            return got, put

    got, put = await asyncio.to_thread(run)
    _check_get(got.status_code, got.headers, got.json(), setup, "python-requests/")
    assert put.status_code == 200
    assert put.json()["length"] == len(upload)
    assert put.json()["sha256"] == hashlib.sha256(upload).hexdigest()
    assert setup.recorder.last.get("Transfer-Encoding") == "chunked"


# --------------------------------------------------------------------------- httpx


async def test_httpx_sync_with_proxy(setup: Setup) -> None:
    def run() -> tuple[httpx.Response, httpx.Response]:
        with httpx.Client(proxy=setup.proxy.url, trust_env=False, timeout=CLIENT_TIMEOUT) as client:
            got = client.get("http://upstream.test/v1/items?q=a%20b&n=1")
            posted = client.post("http://upstream.test/v1/charges", json=PAYLOAD)
            return got, posted

    got, posted = await asyncio.to_thread(run)
    _check_get(got.status_code, got.headers, got.json(), setup, "python-httpx/")
    _check_post(posted.status_code, posted.headers, posted.json(), PAYLOAD)


async def test_httpx_async_with_proxy_and_dedicated_port(setup: Setup) -> None:
    async with httpx.AsyncClient(proxy=setup.proxy.url, trust_env=False, timeout=CLIENT_TIMEOUT) as client:
        got = await client.get("http://upstream.test/v1/items?q=a%20b&n=1")
        posted = await client.post("http://upstream.test/v1/charges", json=PAYLOAD)
        head = await client.head("http://upstream.test/v1/items?q=a%20b&n=1")
    _check_get(got.status_code, got.headers, got.json(), setup, "python-httpx/")
    _check_post(posted.status_code, posted.headers, posted.json(), PAYLOAD)
    assert head.status_code == 200
    assert head.content == b""
    # the upstream's HEAD answer describes the same JSON, with "HEAD" where the GET had "GET"
    assert int(head.headers["Content-Length"]) == len(got.content) + len("HEAD") - len("GET")

    async with httpx.AsyncClient(
        base_url=setup.dedicated_url, trust_env=False, timeout=CLIENT_TIMEOUT
    ) as client:
        direct = await client.get("/v1/items?q=a%20b&n=1")
    _check_get(direct.status_code, direct.headers, direct.json(), setup, "python-httpx/")


# --------------------------------------------------------------------------- curl


@dataclass
class CurlResult:
    status: int
    headers: CIMultiDict[str]
    body: bytes
    stderr: str


def _clean_env() -> dict[str, str]:
    """The environment without proxy variables, so only the command line decides routing."""
    return {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
    }


async def _curl(*args: str) -> CurlResult:
    process = await asyncio.create_subprocess_exec(
        "curl", "--silent", "--show-error", "--verbose", "--max-time", "5", "--include", *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_clean_env(),
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout=10)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, err.decode(errors="replace")
    head, _, body = out.partition(b"\r\n\r\n")
    while head.startswith(b"HTTP/1.1 100"):  # interim response before the real one
        head, _, body = body.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = CIMultiDict(
        (name.strip(), value.strip()) for name, _, value in (ln.partition(":") for ln in lines[1:])
    )
    return CurlResult(int(lines[0].split(" ")[1]), headers, body, err.decode(errors="replace"))


needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


@needs_curl
async def test_curl_via_proxy_direct_port_and_host_header(setup: Setup) -> None:
    url_path = "/v1/items?q=a%20b&n=1"
    results = [
        await _curl("-x", setup.proxy.url, f"http://upstream.test{url_path}"),
        await _curl("--noproxy", "*", f"{setup.dedicated_url}{url_path}"),
        await _curl("--noproxy", "*", "-H", "Host: upstream.test", f"{setup.proxy.url}{url_path}"),
    ]
    for result in results:
        _check_get(result.status, result.headers, json.loads(result.body), setup, "curl/")
    assert len(setup.recorder.seen) == 3


@needs_curl
async def test_curl_posts_json_and_sees_upstream_status(setup: Setup) -> None:
    result = await _curl(
        "-x", setup.proxy.url, "-H", "Content-Type: application/json",
        "--data-binary", json.dumps(PAYLOAD), "http://upstream.test/v1/charges",
    )  # fmt: skip
    assert result.status == 201
    assert result.headers[ATTEMPTS] == "1"
    assert json.loads(result.body)["json"] == PAYLOAD


@needs_curl
async def test_curl_large_upload_does_not_stall_on_expect_100_continue(setup: Setup, tmp_path: Path) -> None:
    upload = tmp_path / "upload.bin"
    upload.write_bytes(os.urandom(2 * 1024 * 1024))
    result = await _curl(
        "-x", setup.proxy.url, "--data-binary", f"@{upload}", "http://upstream.test/v1/files"
    )
    assert result.status == 201
    assert json.loads(result.body)["sha256"] == hashlib.sha256(upload.read_bytes()).hexdigest()
    assert "Expect: 100-continue" in result.stderr  # the condition this test is about
    assert "Done waiting for 100-continue" not in result.stderr
