"""SPEC 7 limits and SPEC 5 400/431: oversized and malformed requests, over real sockets.

Requests are written byte for byte (`raw_exchange`) so the test controls exactly what the
proxy's parser sees. After every refusal the proxy must still serve the next connection.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import RunningProxy, StartProxy, free_port, loopback_policy
from tests.e2e.procs import RawUpstream, assert_error
from tests.e2e.upstreams import RawConnection, RawResponse, raw_exchange

MAX_HEADER_BYTES = 4096
MAX_HEADERS = 10


@pytest.fixture
async def proxy(start_proxy: StartProxy, raw_upstream: RawUpstream) -> RunningProxy:
    return await start_proxy(
        [loopback_policy(f"http://{raw_upstream.authority}")],
        limits={"max_header_bytes": "4KiB", "max_headers": MAX_HEADERS},
    )


def _request(*headers: tuple[str, str], target: str = "/x") -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: upstream.test", *(f"{n}: {v}" for n, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _padding(total: int, per_header: int = 1000) -> list[tuple[str, str]]:
    """Headers whose lines (name + ': ' + value + CRLF) add up to about `total` bytes."""
    headers = []
    remaining = total
    index = 0
    while remaining > 0:
        value = "p" * max(1, min(per_header, remaining) - len(f"X-Pad-{index}: \r\n"))
        headers.append((f"X-Pad-{index}", value))
        remaining -= len(f"X-Pad-{index}: {value}\r\n")
        index += 1
    return headers


def _assert_431(response: RawResponse) -> None:
    error = assert_error(
        response.status,
        response.headers,
        response.body,
        expected_status=431,
        error_type="headers_too_large",
        host="",
    )
    assert error["message"]


async def _assert_still_serving(proxy: RunningProxy, raw_upstream: RawUpstream) -> None:
    before = len(raw_upstream.heads)
    response = await raw_exchange(proxy.port, _request(("X-Probe", "after")))
    assert (response.status, response.body) == (200, b"ok")
    assert response.headers["x-outrigger-attempts"] == "1"
    assert len(raw_upstream.heads) == before + 1
    assert b"X-Probe: after" in raw_upstream.heads[-1]


# --------------------------------------------------------------------------- 431


async def test_headers_just_under_the_limit_pass(proxy: RunningProxy, raw_upstream: RawUpstream) -> None:
    request = _request(*_padding(MAX_HEADER_BYTES - 300))
    assert MAX_HEADER_BYTES - 400 < len(request) < MAX_HEADER_BYTES
    response = await raw_exchange(proxy.port, request)
    assert (response.status, response.body) == (200, b"ok")
    assert len(raw_upstream.heads) == 1
    assert b"X-Pad-2: ppp" in raw_upstream.heads[0]


async def test_headers_over_the_total_limit_get_431(proxy: RunningProxy, raw_upstream: RawUpstream) -> None:
    """Every line is short (so the parser accepts them); only the sum is over the limit."""
    headers = _padding(MAX_HEADER_BYTES + 200, per_header=900)
    assert all(len(name) + len(value) < 1000 for name, value in headers)
    response = await raw_exchange(proxy.port, _request(*headers))
    _assert_431(response)
    assert raw_upstream.heads == []
    await _assert_still_serving(proxy, raw_upstream)


async def test_one_header_line_longer_than_the_limit_gets_431(
    proxy: RunningProxy, raw_upstream: RawUpstream
) -> None:
    response = await raw_exchange(proxy.port, _request(("X-Big", "b" * (MAX_HEADER_BYTES + 100))))
    _assert_431(response)
    assert raw_upstream.heads == []
    await _assert_still_serving(proxy, raw_upstream)


async def test_request_line_longer_than_the_limit_gets_431(
    proxy: RunningProxy, raw_upstream: RawUpstream
) -> None:
    response = await raw_exchange(proxy.port, _request(target="/" + "a" * (MAX_HEADER_BYTES + 100)))
    _assert_431(response)
    assert raw_upstream.heads == []
    await _assert_still_serving(proxy, raw_upstream)


async def test_header_count_at_the_limit_passes(proxy: RunningProxy, raw_upstream: RawUpstream) -> None:
    # Host plus MAX_HEADERS - 1 others = MAX_HEADERS header lines.
    response = await raw_exchange(proxy.port, _request(*((f"X-H{i}", "v") for i in range(MAX_HEADERS - 1))))
    assert (response.status, response.body) == (200, b"ok")
    assert len(raw_upstream.heads) == 1


async def test_more_headers_than_the_limit_get_431(proxy: RunningProxy, raw_upstream: RawUpstream) -> None:
    response = await raw_exchange(proxy.port, _request(*((f"X-H{i}", "v") for i in range(MAX_HEADERS + 5))))
    _assert_431(response)
    assert raw_upstream.heads == []
    await _assert_still_serving(proxy, raw_upstream)


async def test_default_limits_allow_ordinary_large_headers(
    start_proxy: StartProxy, raw_upstream: RawUpstream
) -> None:
    """The built-in limit (64 KiB) does not refuse a realistic 8 KiB cookie-heavy request."""
    proxy = await start_proxy([loopback_policy(f"http://{raw_upstream.authority}")])
    response = await raw_exchange(proxy.port, _request(("Cookie", "c" * 8000)))
    assert (response.status, response.body) == (200, b"ok")


# --------------------------------------------------------------------------- 408 (limits.header_timeout)

HEADER_TIMEOUT = 1.0


@pytest.fixture
async def head_deadline_proxy(start_proxy: StartProxy, raw_upstream: RawUpstream) -> RunningProxy:
    return await start_proxy(
        [loopback_policy(f"http://{raw_upstream.authority}", timeouts={"idle": "5s"})],
        limits={"header_timeout": f"{HEADER_TIMEOUT * 1000:.0f}ms"},
    )


async def _read_408(conn: RawConnection, started: float) -> float:
    """The 408 (SPEC 5 body, connection closed after it); returns when it arrived."""
    response = await conn.read_response()
    arrived = asyncio.get_running_loop().time()
    assert_error(
        response.status,
        response.headers,
        response.body,
        expected_status=408,
        error_type="request_timeout",
        host="",
    )
    assert await conn.at_eof()
    return arrived - started


async def test_a_slowloris_head_gets_408_and_its_connection_closed(
    head_deadline_proxy: RunningProxy, raw_upstream: RawUpstream
) -> None:
    """A client dribbling header bytes, each within any idle bound, still has to finish its head
    within header_timeout of connecting: the 408 comes at header_timeout, long before a silence
    of header_timeout after the last drip would end. (The drip stops just before the deadline: a
    client still sending when the connection closes may see a reset instead of the answer.)"""
    conn = await RawConnection.open(head_deadline_proxy.port)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        await conn.send(b"GET /x HTTP/1.1\r\nHost: upstream.test\r\n")
        for index in range(int(0.8 * HEADER_TIMEOUT / 0.1)):
            await asyncio.sleep(0.1)
            await conn.send(f"X-Drip-{index}: d\r\n".encode())
        last_drip = loop.time() - started
        took = await _read_408(conn, started)
    finally:
        await conn.close()
    assert HEADER_TIMEOUT <= took < last_drip + HEADER_TIMEOUT, (took, last_drip)
    assert raw_upstream.heads == []
    await _assert_still_serving(head_deadline_proxy, raw_upstream)


async def test_a_connection_that_sends_nothing_gets_408(
    head_deadline_proxy: RunningProxy, raw_upstream: RawUpstream
) -> None:
    conn = await RawConnection.open(head_deadline_proxy.port)
    try:
        took = await _read_408(conn, asyncio.get_running_loop().time())
    finally:
        await conn.close()
    assert HEADER_TIMEOUT <= took < HEADER_TIMEOUT + 1.0, took
    await _assert_still_serving(head_deadline_proxy, raw_upstream)


async def test_the_head_deadline_spares_a_timely_head_its_body_and_a_kept_alive_connection(
    head_deadline_proxy: RunningProxy, raw_upstream: RawUpstream
) -> None:
    """The deadline covers the first head only: a body slower than header_timeout (bounded by
    timeouts.idle) is fine, and a kept-alive connection may idle between requests."""
    conn = await RawConnection.open(head_deadline_proxy.port)
    try:
        await conn.send(b"POST /x HTTP/1.1\r\nHost: upstream.test\r\nContent-Length: 4\r\n\r\nab")
        await asyncio.sleep(HEADER_TIMEOUT + 0.3)
        await conn.send(b"cd")
        first = await conn.read_response()
        assert (first.status, first.body) == (200, b"ok")
        await asyncio.sleep(HEADER_TIMEOUT + 0.3)
        await conn.send(b"GET /again HTTP/1.1\r\nHost: upstream.test\r\n\r\n")
        second = await conn.read_response()
        assert (second.status, second.body) == (200, b"ok")
    finally:
        await conn.close()
    assert len(raw_upstream.heads) == 2


# --------------------------------------------------------------------------- 400


MALFORMED = {
    "garbage-request-line": b"THIS IS NOT HTTP\r\n\r\n",
    "binary-request-line": b"\x00\x01\x02 garbage\r\n\r\n",
    "invalid-header-line": b"GET /x HTTP/1.1\r\nHost: upstream.test\r\nNoColonHere\r\n\r\n",
    "space-before-colon": b"GET /x HTTP/1.1\r\nHost: upstream.test\r\nX-Bad : v\r\n\r\n",
    "obsolete-line-folding": b"GET /x HTTP/1.1\r\nHost: upstream.test\r\nX-A: a\r\n  folded\r\n\r\n",
    "nul-in-header-value": b"GET /x HTTP/1.1\r\nHost: upstream.test\r\nX-A: a\x00b\r\n\r\n",
    "non-numeric-content-length": b"POST /x HTTP/1.1\r\nHost: upstream.test\r\nContent-Length: abc\r\n\r\n",
    "negative-content-length": b"POST /x HTTP/1.1\r\nHost: upstream.test\r\nContent-Length: -1\r\n\r\n",
    "conflicting-content-lengths": (
        b"POST /x HTTP/1.1\r\nHost: upstream.test\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
    ),
    "content-length-and-chunked": (
        b"POST /x HTTP/1.1\r\nHost: upstream.test\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "absolute-form-without-host": b"GET http:///path HTTP/1.1\r\nHost: upstream.test\r\n\r\n",
    "absolute-form-broken-scheme": b"GET http:/path HTTP/1.1\r\n\r\n",
    "http11-without-host": b"GET /x HTTP/1.1\r\n\r\n",
    "http10-without-host": b"GET /x HTTP/1.0\r\n\r\n",
    "empty-host": b"GET /x HTTP/1.1\r\nHost: \r\n\r\n",
    "host-with-path": b"GET /x HTTP/1.1\r\nHost: upstream.test/evil\r\n\r\n",
    "host-with-userinfo": b"GET /x HTTP/1.1\r\nHost: user@upstream.test\r\n\r\n",
    "host-with-bad-port": b"GET /x HTTP/1.1\r\nHost: upstream.test:99999\r\n\r\n",
    "relative-target": b"GET x HTTP/1.1\r\nHost: upstream.test\r\n\r\n",
}


@pytest.mark.parametrize("request_bytes", list(MALFORMED.values()), ids=list(MALFORMED))
async def test_malformed_request_gets_400_json(
    proxy: RunningProxy, raw_upstream: RawUpstream, request_bytes: bytes
) -> None:
    response = await raw_exchange(proxy.port, request_bytes)
    error = assert_error(
        response.status,
        response.headers,
        response.body,
        expected_status=400,
        error_type="bad_request",
    )
    assert error["host"] in ("", "upstream.test")
    assert raw_upstream.heads == [], "a malformed request must never reach the upstream"
    await _assert_still_serving(proxy, raw_upstream)


@pytest.mark.parametrize(
    "request_bytes",
    [b"GET /x\r\nHost: upstream.test\r\n\r\n", b"GET /x HTTP/2.0\r\nHost: upstream.test\r\n\r\n"],
    ids=["http09-style", "http2-version"],
)
async def test_request_without_http1_version_gets_400(
    proxy: RunningProxy, raw_upstream: RawUpstream, request_bytes: bytes
) -> None:
    response = await raw_exchange(proxy.port, request_bytes)
    assert_error(
        response.status, response.headers, response.body, expected_status=400, error_type="bad_request"
    )
    assert response.version in ("HTTP/1.0", "HTTP/1.1"), "Outrigger speaks HTTP/1.x only"
    assert raw_upstream.heads == []


async def test_parser_errors_close_the_connection(proxy: RunningProxy, raw_upstream: RawUpstream) -> None:
    """After a framing error the byte stream cannot be trusted: the proxy must not keep reading it."""
    response = await raw_exchange(
        proxy.port,
        b"POST /x HTTP/1.1\r\nHost: upstream.test\r\nContent-Length: abc\r\n\r\n"
        b"GET /smuggled HTTP/1.1\r\nHost: upstream.test\r\n\r\n",
        check_closed=True,
    )
    assert response.status == 400
    assert response.closed
    assert raw_upstream.heads == []


async def test_missing_host_is_fine_on_a_dedicated_port(
    start_proxy: StartProxy, raw_upstream: RawUpstream
) -> None:
    """The dedicated port names its policy, so an HTTP/1.0 request without Host is served there."""
    port = free_port()
    await start_proxy([loopback_policy(f"http://{raw_upstream.authority}", listen=port)])
    response = await raw_exchange(port, b"GET /x HTTP/1.0\r\n\r\n")
    assert (response.status, response.body) == (200, b"ok")
    assert f"\r\nHost: {raw_upstream.authority}\r\n".encode() in raw_upstream.heads[0]
