"""SPEC 4 timeouts and SPEC 5 502/504 against misbehaving upstreams on 127.0.0.1.

Elapsed times are asserted on both sides: an error that comes too late means a timeout
did not fire; one that comes too early means the wrong (shorter) timeout did.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from tests.conftest import RunningProxy, StartProxy, free_port, loopback_policy
from tests.e2e.procs import RawUpstream, assert_error, wait_until
from tests.e2e.upstreams import CountingUpstream
from tests.fakes import app_get

HOST = "upstream.test"
SLACK = 0.5
"""How late a timeout may fire on a loaded CI machine."""


@dataclass
class SlowUpstream:
    """/hang never answers; /drip sends the head at once, then one byte every `gap` s (0.1);
    /status/N answers N itself."""

    server: TestServer
    requests: list[web.Request] = field(default_factory=list)
    abandoned: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"


@pytest.fixture
async def slow(aiohttp_server: AiohttpServer) -> SlowUpstream:
    holder: list[SlowUpstream] = []

    async def hang(request: web.Request) -> web.Response:
        holder[0].requests.append(request)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            holder[0].abandoned.set()  # the proxy dropped the connection
            raise
        return web.Response(text="too late")

    async def drip(request: web.Request) -> web.StreamResponse:
        holder[0].requests.append(request)
        count = int(request.query.get("bytes", "30"))
        response = web.StreamResponse()
        if request.query.get("framing") == "length":
            response.content_length = count
        await response.prepare(request)
        gap = float(request.query.get("gap", "0.1"))
        for _ in range(count):
            await response.write(b"x")
            await asyncio.sleep(gap)
        await response.write_eof()
        return response

    async def own_error(request: web.Request) -> web.Response:
        holder[0].requests.append(request)
        status = int(request.match_info["status"])
        return web.Response(status=status, text=f"upstream says {status}", headers={"X-From": "upstream"})

    app = web.Application()
    app.router.add_get("/hang", hang)
    app.router.add_get("/drip", drip)
    app.router.add_get("/status/{status}", own_error)
    holder.append(SlowUpstream(await aiohttp_server(app)))
    return holder[0]


async def _proxy(start_proxy: StartProxy, upstream: str, **timeouts: str) -> RunningProxy:
    """A policy for `upstream` with these timeouts (connect 200ms unless given: it may not exceed per_try)."""
    return await start_proxy([loopback_policy(upstream, timeouts={"connect": "200ms", **timeouts})])


async def _timed_get(
    proxy: RunningProxy, path: str, headers: dict[str, str] | None = None
) -> tuple[aiohttp.ClientResponse, bytes, float]:
    started = time.monotonic()
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client,
        client.get(f"{proxy.url}{path}", headers={"Host": "upstream.test", **(headers or {})}) as response,
    ):
        body = await response.read()
    return response, body, time.monotonic() - started


def _check_error(
    response: aiohttp.ClientResponse, body: bytes, status: int, error_type: str, host: str | set[str]
) -> dict[str, Any]:
    return assert_error(
        response.status, response.headers, body, expected_status=status, error_type=error_type, host=host
    )


# --------------------------------------------------------------------------- 504


def _assert_504(response: aiohttp.ClientResponse, body: bytes) -> None:
    _check_error(response, body, 504, "timeout", "upstream.test")
    assert response.headers["x-outrigger-attempts"] == "1"


async def test_per_try_fires_on_a_hung_upstream(start_proxy: StartProxy, slow: SlowUpstream) -> None:
    proxy = await _proxy(start_proxy, slow.url, per_try="300ms", total="1s")
    response, body, elapsed = await _timed_get(proxy, "/hang")
    _assert_504(response, body)
    assert 0.25 <= elapsed < 0.3 + SLACK, elapsed
    assert len(slow.requests) == 1
    # The attempt is abandoned, not left hanging on the upstream connection.
    async with asyncio.timeout(2):
        await slow.abandoned.wait()


async def test_total_fires_when_it_equals_per_try(start_proxy: StartProxy, slow: SlowUpstream) -> None:
    proxy = await _proxy(start_proxy, slow.url, per_try="500ms", total="500ms")
    response, body, elapsed = await _timed_get(proxy, "/hang")
    _assert_504(response, body)
    assert 0.45 <= elapsed < 0.5 + SLACK, elapsed


async def test_timeout_header_lowers_total(start_proxy: StartProxy, slow: SlowUpstream) -> None:
    proxy = await _proxy(start_proxy, slow.url, per_try="2s", total="3s")
    response, body, elapsed = await _timed_get(proxy, "/hang", {"x-outrigger-timeout-ms": "200"})
    _assert_504(response, body)
    assert 0.15 <= elapsed < 0.2 + SLACK, elapsed
    assert "x-outrigger-timeout-ms" not in slow.requests[0].headers, "control headers stay local"


async def _read_all(response: aiohttp.ClientResponse, into: bytearray | None = None) -> bytes:
    """The body chunk by chunk; `into` keeps what arrived when reading fails midway."""
    received = bytearray() if into is None else into
    for _ in range(1000):
        chunk = await response.content.readany()
        if not chunk:
            break
        received += chunk
    return bytes(received)


async def test_total_ends_at_the_response_head(start_proxy: StartProxy, slow: SlowUpstream) -> None:
    """A body that drips for ~2 s outlives `total: 1s`: total bounds only the wait for the head."""
    proxy = await _proxy(start_proxy, slow.url, per_try="500ms", total="1s")
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client,
        client.get(f"{proxy.url}/drip?bytes=20", headers={"Host": "upstream.test"}) as response,
    ):
        assert response.status == 200
        assert await _read_all(response) == b"x" * 20


async def test_stream_caps_the_whole_body(start_proxy: StartProxy, slow: SlowUpstream) -> None:
    proxy = await start_proxy(
        [loopback_policy(slow.url, timeouts={"per_try": "500ms", "total": "5s", "stream": "1s"})]
    )
    received = bytearray()
    started = time.monotonic()
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client,
        client.get(f"{proxy.url}/drip?bytes=30", headers={"Host": "upstream.test"}) as response,
    ):
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await _read_all(response, received)
    elapsed = time.monotonic() - started
    assert 0.95 <= elapsed < 1.0 + SLACK, elapsed
    assert 0 < len(received) < 30, "streamed while it lasted, then cut short (not a clean ending)"


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_idle_cuts_a_silent_body_and_never_as_a_clean_completion(
    start_proxy: StartProxy, slow: SlowUpstream, framing: str
) -> None:
    """Both with Content-Length and chunked, a body cut by `idle` must be visibly incomplete."""
    proxy = await start_proxy(
        [loopback_policy(slow.url, timeouts={"per_try": "500ms", "total": "5s", "idle": "300ms"})]
    )
    started = time.monotonic()
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client,
        client.get(
            f"{proxy.url}/drip?bytes=5&gap=1&framing={framing}", headers={"Host": "upstream.test"}
        ) as response,
    ):
        assert response.status == 200
        if framing == "length":
            assert response.headers["Content-Length"] == "5"
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 0.3 + SLACK, elapsed


@pytest.mark.parametrize("value", ["abc", "0", "-5", "1.5", "", "9" * 400])
async def test_invalid_timeout_header_is_a_bad_request(
    start_proxy: StartProxy, slow: SlowUpstream, value: str
) -> None:
    proxy = await _proxy(start_proxy, slow.url, per_try="300ms", total="1s")
    response, body, _ = await _timed_get(proxy, "/hang", {"x-outrigger-timeout-ms": value})
    error = _check_error(response, body, 400, "bad_request", {"", "upstream.test"})
    assert "x-outrigger-timeout-ms" in error["message"]
    assert slow.requests == []


async def test_short_per_try_without_connect_is_accepted(start_proxy: StartProxy, slow: SlowUpstream) -> None:
    proxy = await start_proxy([loopback_policy(slow.url, timeouts={"per_try": "300ms", "total": "1s"})])
    response, body, elapsed = await _timed_get(proxy, "/hang")
    _assert_504(response, body)
    assert elapsed < 0.3 + SLACK


# --------------------------------------------------------------------------- 502


@contextlib.contextmanager
def _full_backlog() -> Iterator[int]:
    """A listening port whose accept queue is full, so new connects hang (no SYN-ACK)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port: int = listener.getsockname()[1]
        fillers: list[socket.socket] = []
        try:
            for _ in range(8):  # the kernel may allow backlog + 1 (or a little more)
                sock = socket.socket()
                sock.settimeout(0.2)
                fillers.append(sock)
                try:
                    sock.connect(("127.0.0.1", port))
                except TimeoutError:
                    break  # connects hang now
            else:
                pytest.skip("connects to a full backlog do not hang here")
            yield port
        finally:
            for sock in fillers:
                sock.close()


async def test_connect_timeout(start_proxy: StartProxy) -> None:
    with _full_backlog() as port:
        proxy = await _proxy(
            start_proxy, f"http://127.0.0.1:{port}", connect="200ms", per_try="2s", total="3s"
        )
        response, body, elapsed = await _timed_get(proxy, "/x")
    _check_error(response, body, 502, "upstream_unreachable", "upstream.test")
    assert 0.15 <= elapsed < 0.2 + SLACK, elapsed


async def test_connection_refused_is_502(start_proxy: StartProxy) -> None:
    proxy = await _proxy(start_proxy, f"http://127.0.0.1:{free_port()}")
    response, body, elapsed = await _timed_get(proxy, "/x")
    _check_error(response, body, 502, "upstream_unreachable", "upstream.test")
    assert elapsed < 1.0


@pytest.fixture
async def misbehaving(request: pytest.FixtureRequest) -> AsyncIterator[RawUpstream]:
    server = await RawUpstream(behaviour=request.param).start()
    yield server
    await server.close()


@pytest.mark.parametrize("misbehaving", ["close", "reset", "garbage"], indirect=True)
async def test_upstream_that_does_not_answer_properly_is_502(
    start_proxy: StartProxy, misbehaving: RawUpstream
) -> None:
    proxy = await _proxy(start_proxy, f"http://{misbehaving.authority}")
    response, body, elapsed = await _timed_get(proxy, "/x")
    _check_error(response, body, 502, "upstream_unreachable", "upstream.test")
    assert len(misbehaving.heads) >= 1, "the request did reach the upstream"
    assert elapsed < 2.0


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_upstream_own_error_passes_through_unchanged(
    start_proxy: StartProxy, slow: SlowUpstream, status: int
) -> None:
    """SPEC 5: an upstream's error response is never replaced by one of Outrigger's."""
    proxy = await _proxy(start_proxy, slow.url)
    response, body, _ = await _timed_get(proxy, f"/status/{status}")
    assert response.status == status
    assert body == f"upstream says {status}".encode()
    assert response.headers["X-From"] == "upstream"
    assert "x-outrigger-error" not in response.headers
    assert response.headers["x-outrigger-attempts"] == "1"


# ------------------------------------------------------------------ the total deadline runs from arrival


async def test_total_deadline_counts_time_queued_in_the_bulkhead(
    counting_upstream: CountingUpstream, start_proxy: StartProxy
) -> None:
    counting_upstream.status, counting_upstream.delay = 200, 0.4
    proxy = await start_proxy(
        [
            loopback_policy(
                counting_upstream.url,
                concurrency={"max_in_flight": 1, "max_queued": 5, "queue_timeout": "2s"},
            )
        ]
    )
    first = asyncio.create_task(app_get(proxy, "/slow"))
    assert await wait_until(lambda: counting_upstream.hits.get("/slow", 0) == 1, within=2.0), (
        "A never reached the upstream"
    )
    started = time.monotonic()
    status, headers, body = await app_get(proxy, "/slow", **{"x-outrigger-timeout-ms": "500"})
    elapsed = time.monotonic() - started
    assert_error(status, headers, body, expected_status=504, error_type="timeout", host=HOST)
    assert elapsed < 0.75, f"B's 500 ms budget started at arrival, yet it took {elapsed:.2f}s"
    assert (await first)[0] == 200


# --------------------------------------------------------------------------- an upstream that stops reading


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


async def test_an_sse_stream_outlives_total_event_by_event(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy
) -> None:
    """40 events a second apart through total 5s: total ends at the head, idle (1m) bounds gaps.

    Each event must reach the app as it is sent (an LLM client renders tokens as they come),
    so the arrival times are checked against the send times, not only the final body."""
    sent: list[float] = []
    loop = asyncio.get_running_loop()

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for n in range(40):
            sent.append(loop.time())
            await response.write(f"data: event {n}\n\n".encode())
            await asyncio.sleep(1.0)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/v1/stream", events)
    upstream = await aiohttp_server(app)
    proxy = await start_proxy(
        [loopback_policy(f"http://127.0.0.1:{upstream.port}", timeouts={"per_try": "5s", "total": "5s"})]
    )
    arrived: list[tuple[float, bytes]] = []
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as client,
        client.get(f"{proxy.url}/v1/stream", headers={"Host": "upstream.test"}) as response,
    ):
        assert response.status == 200
        for _ in range(100):
            line = await response.content.readuntil(b"\n\n")
            if not line:
                break
            arrived.append((loop.time(), line))
    assert [body for _, body in arrived] == [f"data: event {n}\n\n".encode() for n in range(40)]
    lags = [at - sent[n] for n, (at, _) in enumerate(arrived)]
    assert max(lags) < 0.5, f"an event was held back: lags {lags}"
