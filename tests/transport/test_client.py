"""The upstream transport against real loopback servers that answer with exact bytes.

Each test sends one or more attempts through `UpstreamClient.send`, the way
the pipeline's last layer does, and reads the streamed body to its end.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy import errors
from proxy.config.model import UpstreamTarget
from proxy.exchange import ProxyRequest, ProxyResponse, RequestBody
from proxy.transport import UpstreamClient
from proxy.transport.resolver import CheckedResolver
from tests.e2e.procs import RawUpstream
from tests.e2e.upstreams import RawScript, RawScriptedUpstream, TlsMaterial, response_bytes
from tests.fakes import make_request, settings_from


@pytest.fixture
async def transport() -> AsyncIterator[UpstreamClient]:
    client = UpstreamClient()
    yield client
    await client.close()


def to(port: int, request: ProxyRequest, scheme: str = "http", host: str = "127.0.0.1") -> ProxyRequest:
    request.target = UpstreamTarget(scheme=scheme, host=host, port=port)
    request.settings = request.settings.model_copy(update={"allow_private_addresses": True})
    return request


def get(port: int, path: str = "/x", method: str = "GET", **kwargs: object) -> ProxyRequest:
    return to(port, make_request(method, path, **kwargs))  # type: ignore[arg-type]


async def read_all(response: ProxyResponse) -> bytes:
    try:
        return b"".join([chunk async for chunk in response.body.chunks()])
    finally:
        response.body.release()


async def exchange(client: UpstreamClient, request: ProxyRequest) -> tuple[ProxyResponse, bytes]:
    response = await client.send(request)
    return response, await read_all(response)


# --------------------------------------------------------------------------- framing


async def test_content_length_chunked_and_close_delimited_bodies(transport: UpstreamClient) -> None:
    scripts = {
        "/length": RawScript(response_bytes("HTTP/1.1 200 OK\nContent-Length: 5", b"hello")),
        "/chunked": RawScript(
            response_bytes("HTTP/1.1 200 OK\nTransfer-Encoding: chunked", b"3\r\nhel\r\n2\r\nlo\r\n0\r\n")
            + b"X-Trailer: dropped\r\n\r\n"
        ),
        "/close": RawScript(response_bytes("HTTP/1.0 200 OK\nX-Kind: eof", b"until the end"), after="close"),
    }
    async with RawScriptedUpstream(scripts) as upstream:
        response, body = await exchange(transport, get(upstream.port, "/length"))
        assert (response.status, body) == (200, b"hello")
        response, body = await exchange(transport, get(upstream.port, "/chunked"))
        assert body == b"hello"
        assert "Transfer-Encoding" not in response.headers, "framing is hop-by-hop"
        assert "X-Trailer" not in response.headers, "trailers are dropped"
        response, body = await exchange(transport, get(upstream.port, "/close"))
        assert (response.headers["X-Kind"], body) == ("eof", b"until the end")


async def test_head_204_and_304_carry_no_body_and_keep_the_connection(transport: UpstreamClient) -> None:
    upstream = await RawUpstream("ok").start()
    try:
        head = await transport.send(get(upstream.port, method="HEAD"))
        assert head.headers["Content-Length"] == "2"
        assert await read_all(head) == b""
        response, body = await exchange(transport, get(upstream.port))
        assert body == b"ok", "the HEAD response's Content-Length was not taken as a body"
    finally:
        await upstream.close()
    scripts = {
        "/204": RawScript(response_bytes("HTTP/1.1 204 No Content\nX-A: 1")),
        "/304": RawScript(response_bytes('HTTP/1.1 304 Not Modified\nETag: "v1"\nContent-Length: 10')),
        "/ok": RawScript(response_bytes("HTTP/1.1 200 OK\nContent-Length: 2", b"ok")),
    }
    async with RawScriptedUpstream(scripts) as scripted:
        for path, status in (("/204", 204), ("/304", 304)):
            response, body = await exchange(transport, get(scripted.port, path))
            assert (response.status, body) == (status, b"")
        response, body = await exchange(transport, get(scripted.port, "/ok"))
        assert body == b"ok"
        assert len(scripted.heads) == 3


async def test_interim_responses_are_skipped(transport: UpstreamClient) -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
    final = response_bytes("HTTP/1.1 201 Created\nContent-Length: 4", b"made")
    async with RawScriptedUpstream({"/x": RawScript(interim + final)}) as upstream:
        response, body = await exchange(transport, get(upstream.port))
    assert (response.status, response.reason, body) == (201, "Created", b"made")
    assert "Link" not in response.headers


async def test_status_reason_header_order_and_repeats_are_kept(transport: UpstreamClient) -> None:
    head = "HTTP/1.1 299 Very Custom\nX-B: 1\nSet-Cookie: a=1\nX-A: 2\nSet-Cookie: b=2\nContent-Length: 0"
    async with RawScriptedUpstream({"/x": RawScript(response_bytes(head))}) as upstream:
        response, _ = await exchange(transport, get(upstream.port))
    assert (response.status, response.reason) == (299, "Very Custom")
    assert list(response.headers.items()) == [
        ("X-B", "1"),
        ("Set-Cookie", "a=1"),
        ("X-A", "2"),
        ("Set-Cookie", "b=2"),
        ("Content-Length", "0"),
    ]


# --------------------------------------------------------------------------- what goes upstream


async def test_request_is_written_exactly_as_the_app_sent_it(transport: UpstreamClient) -> None:
    async with RawScriptedUpstream(
        {"/p": RawScript(response_bytes("HTTP/1.1 200 OK\nContent-Length: 0"))}
    ) as up:
        request = get(up.port, "/p?", method="DELETE")
        for name, value in [("X-Z", "1"), ("Accept", "a"), ("X-Z", "2")]:
            request.headers.add(name, value)
        await exchange(transport, request)
        expected = (
            b"DELETE /p? HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nX-Z: 1\r\nAccept: a\r\nX-Z: 2\r\n\r\n" % up.port
        )
    assert up.heads == [expected]


async def test_a_streamed_body_of_unknown_length_goes_chunked(transport: UpstreamClient) -> None:
    received: list[tuple[str | None, bytes]] = []

    async def echo(request: web.Request) -> web.Response:
        received.append((request.headers.get("Transfer-Encoding"), await request.read()))
        return web.Response(body=b"done")

    server = TestServer(web.Application(), host="127.0.0.1")
    server.app.router.add_post("/up", echo)
    await server.start_server()
    try:
        request = get(server.port or 0, "/up", method="POST", body=b"a" * 200_000, chunk_size=7_000)
        request.body.length = None
        _, body = await exchange(transport, request)
    finally:
        await server.close()
    assert body == b"done"
    assert received == [("chunked", b"a" * 200_000)]


async def test_an_answer_before_the_whole_body_was_read_is_returned(transport: UpstreamClient) -> None:
    """The upstream refuses a large upload after its head and closes: the app gets that answer."""
    refusal = response_bytes("HTTP/1.1 413 Payload Too Large\nConnection: close\nContent-Length: 3", b"big")

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(refusal)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        request = get(port, "/up", method="PUT", body=b"x" * (8 << 20), chunk_size=64 * 1024)
        response, body = await exchange(transport, request)
    finally:
        server.close()
    assert (response.status, body) == (413, b"big")
    await asyncio.sleep(0.01)
    assert transport.pool.open_connections == 0, "a half-sent request's connection is not reused"


# --------------------------------------------------------------------------- failures


async def test_a_truncated_body_is_a_reset_never_a_short_body(transport: UpstreamClient) -> None:
    scripts = {
        "/length": RawScript(
            response_bytes("HTTP/1.1 200 OK\nContent-Length: 100", b"only this"), after="close"
        ),
        "/chunked": RawScript(
            response_bytes("HTTP/1.1 200 OK\nTransfer-Encoding: chunked", b"5\r\nhello\r\n"), after="reset"
        ),
    }
    async with RawScriptedUpstream(scripts) as upstream:
        for path in scripts:
            response = await transport.send(get(upstream.port, path))
            with pytest.raises(errors.ConnectionReset, match="broke off the response body"):
                await read_all(response)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        pytest.param(b"SPDY/9 200 OK\r\n\r\n", "invalid HTTP response", id="bad-status-line"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nok",
            "invalid HTTP response",
            id="duplicate-content-length",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n",
            "response head larger than 65536 bytes",
            id="oversized-head",
        ),
        pytest.param(b"HTTP/1.1 000 X\r\nContent-Length: 0\r\n\r\n", "status 0 is not HTTP's", id="status-0"),
    ],
)
async def test_malformed_response_heads_are_upstream_unreachable(
    transport: UpstreamClient, answer: bytes, message: str
) -> None:
    async with RawScriptedUpstream({"/x": RawScript(answer, after="close")}) as upstream:
        with pytest.raises(errors.UpstreamUnreachable, match=message) as raised:
            await transport.send(get(upstream.port))
    assert raised.value.condition is None, "not a retry condition: the upstream is broken, not flaky"
    assert raised.value.status == 502


async def test_bad_chunking_ends_the_body_with_an_error(transport: UpstreamClient) -> None:
    answer = response_bytes("HTTP/1.1 200 OK\nTransfer-Encoding: chunked", b"zz\r\nnot hex\r\n")
    async with RawScriptedUpstream({"/x": RawScript(answer, pause=1.0)}) as upstream:
        response = await transport.send(get(upstream.port))
        with pytest.raises(errors.UpstreamUnreachable, match="invalid HTTP response"):
            await read_all(response)


async def test_nothing_is_ever_resent_by_the_transport(transport: UpstreamClient) -> None:
    upstream = await RawUpstream("close").start()
    try:
        with pytest.raises(errors.ConnectionReset, match="closed before a response"):
            await transport.send(get(upstream.port))
        await asyncio.sleep(0.1)
        assert len(upstream.heads) == 1
    finally:
        await upstream.close()


async def test_a_refused_connection_is_a_connect_failure(transport: UpstreamClient) -> None:
    upstream = await RawUpstream("ok").start()
    port = upstream.port
    await upstream.close()
    with pytest.raises(
        errors.ConnectFailure, match=f"cannot connect to 127.0.0.1:{port}: Connection refused"
    ):
        await transport.send(get(port, "/x?token=SECRET"))


async def test_a_silent_body_times_out_after_idle(transport: UpstreamClient) -> None:
    answer = response_bytes("HTTP/1.1 200 OK\nContent-Length: 10", b"half")
    async with RawScriptedUpstream({"/x": RawScript(answer, pause=5.0)}) as upstream:
        response = await transport.send(_with_timeouts(get(upstream.port), idle="200ms"))
        with pytest.raises(errors.AttemptTimeout, match="stopped sending the response body"):
            await read_all(response)


# --------------------------------------------------------------------------- the pool


async def test_keep_alive_connections_are_reused(transport: UpstreamClient) -> None:
    upstream = await RawUpstream("ok").start()
    try:
        for _ in range(5):
            _, body = await exchange(transport, get(upstream.port))
            assert body == b"ok"
        assert upstream.connections == 1
        assert transport.pool.open_connections == 1
    finally:
        await upstream.close()


async def test_connection_close_and_http_1_0_are_not_reused(transport: UpstreamClient) -> None:
    scripts = {
        "/close": RawScript(response_bytes("HTTP/1.1 200 OK\nConnection: close\nContent-Length: 2", b"ok")),
        "/old": RawScript(response_bytes("HTTP/1.0 200 OK\nContent-Length: 2", b"ok")),
    }
    async with RawScriptedUpstream(scripts) as upstream:
        for path in ("/close", "/old", "/close"):
            _, body = await exchange(transport, get(upstream.port, path))
            assert body == b"ok"
            await asyncio.sleep(0)
            assert transport.pool.open_connections == 0


async def test_a_connection_the_upstream_closed_while_idle_is_never_handed_out(
    transport: UpstreamClient,
) -> None:
    """The upstream closes each connection after its answer, without saying so beforehand."""
    answer = response_bytes("HTTP/1.1 200 OK\nContent-Length: 2", b"ok")
    async with RawScriptedUpstream({"/x": RawScript(answer, after="close")}) as upstream:
        for _ in range(3):
            _, body = await exchange(transport, get(upstream.port))
            assert body == b"ok"
            await asyncio.sleep(0.05)  # the FIN arrives while the connection is idle
            assert transport.pool.open_connections == 0
        assert len(upstream.heads) == 3


async def test_idle_connections_expire() -> None:
    client = UpstreamClient(keepalive=0.2)
    upstream = await RawUpstream("ok").start()
    try:
        await exchange(client, get(upstream.port))
        assert client.pool.open_connections == 1
        await asyncio.sleep(0.5)
        assert client.pool.open_connections == 0
        await exchange(client, get(upstream.port))
        assert upstream.connections == 2
    finally:
        await upstream.close()
        await client.close()


async def test_a_body_left_unread_closes_its_connection(transport: UpstreamClient) -> None:
    """Released before its body fully arrived: the rest would be read as the next response."""
    answer = response_bytes("HTTP/1.1 200 OK\nContent-Length: 100", b"part")
    async with RawScriptedUpstream({"/x": RawScript(answer, pause=1.0)}) as upstream:
        response = await transport.send(get(upstream.port))
        response.body.release()
        await asyncio.sleep(0.05)
        assert transport.pool.open_connections == 0


async def test_the_per_upstream_cap_makes_requests_wait_within_connect() -> None:
    client = UpstreamClient(max_connections_per_upstream=1)
    upstream = await RawUpstream("ok").start()
    try:
        held = await client.send(get(upstream.port))
        waiting = asyncio.ensure_future(exchange(client, get(upstream.port)))
        await asyncio.sleep(0.1)
        assert not waiting.done(), "the only connection is busy"
        assert await read_all(held) == b"ok"
        _, body = await asyncio.wait_for(waiting, 2)
        assert body == b"ok"
        assert upstream.connections == 1
        held = await client.send(get(upstream.port))
        request = _with_timeouts(get(upstream.port), connect="100ms", per_try="1s")
        with pytest.raises(errors.ConnectFailure, match=r"no connection to .* within connect 100ms"):
            await client.send(request)
        held.body.release()
    finally:
        await upstream.close()
        await client.close()


# --------------------------------------------------------------------------- addresses and TLS


async def test_the_connection_goes_to_the_checked_address() -> None:
    """DNS changing between the check and the connect cannot redirect the connection."""
    upstream = await RawUpstream("ok").start()
    answers = [("127.0.0.1",), ("127.0.0.2",)]
    calls: list[str] = []

    async def changing(host: str, port: int) -> tuple[str, ...]:
        calls.append(host)
        return answers[min(len(calls) - 1, 1)]

    client = UpstreamClient(resolver=CheckedResolver(changing))
    try:
        _, body = await exchange(client, to(upstream.port, make_request(), host="rebind.test"))
        assert body == b"ok"
        assert calls == ["rebind.test"], "resolved once: the checked answer is the one connected to"
    finally:
        await upstream.close()
        await client.close()


async def test_private_answers_are_refused_without_a_connection() -> None:
    async def private(host: str, port: int) -> tuple[str, ...]:
        return ("10.0.0.7", "169.254.169.254")

    client = UpstreamClient(resolver=CheckedResolver(private))
    request = make_request()
    request.target = UpstreamTarget(scheme="http", host="internal.test", port=80)
    with pytest.raises(errors.AddressNotAllowed, match=r"resolves to 10\.0\.0\.7 \(private\)"):
        await client.send(request)
    assert client.pool.open_connections == 0
    await client.close()


async def test_two_names_on_one_address_never_share_a_tls_connection(tmp_path: Path) -> None:
    tls = TlsMaterial.create(tmp_path, server_name="a.test")
    tls.server = tls.ca.issue_cert("a.test", "b.test")
    sni_seen: list[str] = []
    peers: list[int] = []

    async def who(request: web.Request) -> web.Response:
        peername = request.transport.get_extra_info("peername") if request.transport else None
        peers.append(peername[1] if peername else 0)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/v1/things", who)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.server_context(sni_seen=sni_seen))
    await site.start()
    port = runner.addresses[0][1]

    async def loopback(host: str, port: int) -> tuple[str, ...]:
        return ("127.0.0.1",)

    client = UpstreamClient(resolver=CheckedResolver(loopback))
    try:
        for host in ("a.test", "b.test", "a.test", "b.test"):
            request = to(port, make_request(), scheme="https", host=host)
            request.settings = request.settings.model_copy(
                update={"tls": settings_from(tls={"ca_file": str(tls.ca_file)}).tls}
            )
            _, body = await exchange(client, request)
            assert body == b"ok"
    finally:
        await client.close()
        await runner.cleanup()
    assert sni_seen == ["a.test", "b.test"]
    assert peers[0] == peers[2] != peers[1] == peers[3]


async def test_a_rejected_certificate_is_a_connect_failure(tmp_path: Path) -> None:
    tls = TlsMaterial.create(tmp_path)
    context = tls.server_context()
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    client = UpstreamClient()
    try:
        request = to(port, make_request(), scheme="https", host="127.0.0.1")
        with pytest.raises(errors.ConnectFailure, match=r"TLS certificate of 127\.0\.0\.1:\d+ rejected"):
            await client.send(request)
    finally:
        server.close()
        await client.close()


# --------------------------------------------------------------------------- SPEC 4 timeouts


def _with_timeouts(request: ProxyRequest, **timeouts: str) -> ProxyRequest:
    request.settings = request.settings.model_copy(
        update={"timeouts": settings_from(timeouts=timeouts).timeouts}
    )
    return request


async def _slow_parts(parts: int, gap: float) -> AsyncIterator[bytes]:
    for _ in range(parts):
        await asyncio.sleep(gap)
        yield b"p" * 1000


async def test_per_try_starts_once_the_upload_is_written(transport: UpstreamClient) -> None:
    """A 1 s upload under per_try 300ms succeeds: idle, not per_try, bounds the upload."""
    received: list[int] = []

    async def count(request: web.Request) -> web.Response:
        received.append(len(await request.read()))
        return web.Response(text="stored")

    server = TestServer(web.Application(), host="127.0.0.1")
    server.app.router.add_post("/up", count)
    await server.start_server()
    try:
        request = _with_timeouts(get(server.port or 0, "/up", method="POST"), per_try="300ms", idle="1s")
        request.body = RequestBody(_slow_parts(5, 0.2), 5000)
        request.headers["Content-Length"] = "5000"
        _, body = await exchange(transport, request)
    finally:
        await server.close()
    assert (body, received) == (b"stored", [5000])


async def test_an_app_upload_silent_for_idle_is_the_apps_timeout(transport: UpstreamClient) -> None:
    upstream = await RawUpstream("hang").start()
    try:
        request = _with_timeouts(get(upstream.port, "/up", method="POST"), per_try="5s", idle="200ms")
        request.body = RequestBody(_slow_parts(2, 1.0), 2000)
        with pytest.raises(errors.Timeout, match="request body stalled") as raised:
            await transport.send(request)
        assert raised.value.condition is None, "not the upstream's fault: never retried, breaker-neutral"
    finally:
        await upstream.close()


async def test_no_head_within_per_try_is_an_attempt_timeout(transport: UpstreamClient) -> None:
    upstream = await RawUpstream("hang").start()
    try:
        request = _with_timeouts(get(upstream.port), per_try="200ms")
        started = asyncio.get_running_loop().time()
        with pytest.raises(errors.AttemptTimeout, match="no response head within per_try 200ms"):
            await transport.send(request)
        assert asyncio.get_running_loop().time() - started < 1.0
    finally:
        await upstream.close()


async def test_a_turn_handed_to_a_waiter_that_gives_up_passes_to_the_next() -> None:
    """Cap 1: the connection comes back just as waiter A is cancelled; B must get it, not starve."""
    client = UpstreamClient(max_connections_per_upstream=1)
    upstream = await RawUpstream("ok").start()
    try:
        held = await client.send(get(upstream.port))
        a = asyncio.ensure_future(exchange(client, get(upstream.port)))
        b = asyncio.ensure_future(exchange(client, get(upstream.port)))
        await asyncio.sleep(0.05)
        assert await read_all(held) == b"ok"  # gives the connection back: A's turn...
        a.cancel()  # ...which A gives up in the same pass
        _, body = await asyncio.wait_for(b, 2)
        assert body == b"ok"
        assert a.cancelled()
    finally:
        await upstream.close()
        await client.close()
