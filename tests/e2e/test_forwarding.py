"""Forwarding semantics (SPEC 2 and 4) against real loopback upstreams.

Requests are written as exact bytes (tests.e2e.upstreams.RawConnection) so that
nothing the test client would add by itself hides what Outrigger adds; the
upstreams record requests exactly as they arrive on the wire.
"""

from __future__ import annotations

import gzip
import hashlib
import os

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from tests.conftest import StartProxy, free_port, loopback_policy
from tests.e2e.upstreams import (
    CountingUpstream,
    IncompleteBody,
    RawConnection,
    RawScript,
    RawScriptedUpstream,
    Seen,
    chunked,
    raw_exchange,
    request_bytes,
    response_bytes,
    start_recording,
)
from tests.fakes import app_get

ATTEMPTS = "x-outrigger-attempts"
PROXY_ADDED = ("via", "forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-real-ip")
TRACING = frozenset({"traceparent", "tracestate", "x-request-id"})
"""Headers Outrigger may add upstream for tracing (SPEC 8: the attempt's context is injected)."""


def _app_headers(seen: Seen) -> list[str]:
    """The header names the upstream received, minus the tracing headers Outrigger may inject."""
    return sorted(name for name in seen.header_names if name not in TRACING)


def _get(target: str, host: str = "upstream.test", extra: str = "") -> bytes:
    head = f"GET {target} HTTP/1.1\nHost: {host}"
    return request_bytes(head + (f"\n{extra}" if extra else ""))


# --------------------------------------------------------------------------- entry modes, Host, path


PATHS = [
    pytest.param("/a%2Fb?x=%20&y=1", id="encoded-slash-and-space"),
    pytest.param("/%7Euser/a%2fb;p=1?q=%2B+x&&z=&q=2", id="lowercase-escapes-params-repeats"),
    pytest.param("/caf%C3%A9/%25/a/../b//c?redirect=http%3A%2F%2Fx%2Fy%3Fz", id="utf8-dot-segments-nested"),
    pytest.param("/path?", id="empty-query"),
]


@pytest.mark.parametrize("target", PATHS)
async def test_three_entry_modes_reach_the_same_upstream_with_path_bytes_unchanged(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy, target: str
) -> None:
    upstream, recorder = await start_recording(aiohttp_server)
    dedicated = free_port()
    proxy = await start_proxy([loopback_policy(f"http://localhost:{upstream.port}", listen=dedicated)])

    via_port = await raw_exchange(dedicated, _get(target, host=f"127.0.0.1:{dedicated}"))
    via_absolute = await raw_exchange(proxy.port, _get(f"http://upstream.test{target}"))
    via_host = await raw_exchange(proxy.port, _get(target))

    for response in (via_port, via_absolute, via_host):
        assert response.status == 200
        assert response.body == b"ok"
        assert response.get(ATTEMPTS) == "1"
    assert len(recorder.seen) == 3
    for seen in recorder.seen:
        assert seen.raw_path == target
        # the upstream's own authority (the name, not the IP Outrigger connected to)
        assert seen.getall("Host") == [f"localhost:{upstream.port}"]


async def test_absolute_form_without_path_is_sent_as_slash(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy
) -> None:
    upstream, recorder = await start_recording(aiohttp_server)
    proxy = await start_proxy([loopback_policy(f"http://127.0.0.1:{upstream.port}")])
    response = await raw_exchange(proxy.port, _get("http://upstream.test?x=1"))
    assert response.status == 200
    assert recorder.last.raw_path == "/?x=1"


async def test_host_header_is_matched_case_insensitively_and_rewritten(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy
) -> None:
    """`Host: API.Upstream.test:80` selects the policy; the upstream sees its own authority instead."""
    upstream, recorder = await start_recording(aiohttp_server)
    proxy = await start_proxy(
        [loopback_policy(f"http://127.0.0.1:{upstream.port}", host="api.upstream.test")],
    )
    response = await raw_exchange(proxy.port, _get("/x", host="API.Upstream.test:80"))
    assert response.status == 200
    assert recorder.last.getall("Host") == [f"127.0.0.1:{upstream.port}"]


# --------------------------------------------------------------------------- request headers


async def test_hop_by_hop_request_headers_are_dropped_end_to_end_ones_kept(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy
) -> None:
    upstream, recorder = await start_recording(aiohttp_server)
    proxy = await start_proxy([loopback_policy(f"http://127.0.0.1:{upstream.port}")])
    extra = "\n".join(
        [
            "Connection: keep-alive, X-Drop-Me",
            "X-Drop-Me: must not arrive",
            "Keep-Alive: timeout=5, max=100",
            "TE: trailers",
            "Proxy-Authorization: Basic dXNlcjpwYXNz",
            "Proxy-Connection: keep-alive",
            "Upgrade: h2c",
            "X-Outrigger-Debug: 1",
            "x-outrigger-timeout-ms: 5000",
            "Authorization: Bearer app-token",
            "Accept: application/json",
            "Cookie: session=abc",
            "X-Multi: first",
            "X-Multi: second",
            "X-Keep: yes",
        ]
    )
    response = await raw_exchange(proxy.port, _get("/h", extra=extra))
    assert response.status == 200
    seen = recorder.last
    assert _app_headers(seen) == sorted(
        ["host", "authorization", "accept", "cookie", "x-multi", "x-multi", "x-keep"]
    )
    assert seen.get("Authorization") == "Bearer app-token"
    assert seen.get("Accept") == "application/json"
    assert seen.get("Cookie") == "session=abc"
    assert seen.getall("X-Multi") == ["first", "second"]
    assert seen.get("X-Keep") == "yes"


@pytest.mark.parametrize(
    ("request_head", "body", "expected_names"),
    [
        pytest.param("GET /bare HTTP/1.1\nHost: upstream.test", b"", ["host"], id="get"),
        pytest.param(
            "POST /bare HTTP/1.1\nHost: upstream.test\nContent-Length: 5",
            b"hello",
            ["host", "content-length"],
            id="post-length",
        ),
        pytest.param(
            "POST /bare HTTP/1.1\nHost: upstream.test\nTransfer-Encoding: chunked",
            chunked([b"hel", b"lo"]),
            ["host", "transfer-encoding"],
            id="post-chunked",
        ),
        pytest.param(
            "DELETE /bare HTTP/1.1\nHost: upstream.test\nX-Only: 1",
            b"",
            ["host", "x-only"],
            id="delete-without-body",
        ),
    ],
)
async def test_no_headers_are_invented_for_the_upstream(
    aiohttp_server: AiohttpServer,
    start_proxy: StartProxy,
    request_head: str,
    body: bytes,
    expected_names: list[str],
) -> None:
    """No User-Agent, Accept, Accept-Encoding, Content-Type, Via or X-Forwarded-* from the proxy."""
    upstream, recorder = await start_recording(aiohttp_server)
    proxy = await start_proxy([loopback_policy(f"http://127.0.0.1:{upstream.port}")])
    response = await raw_exchange(proxy.port, request_bytes(request_head, body))
    assert response.status == 200
    seen = recorder.last
    assert _app_headers(seen) == sorted(expected_names)
    assert not set(seen.header_names) & set(PROXY_ADDED)
    if body:
        assert seen.body == b"hello"


# --------------------------------------------------------------------------- response headers


async def test_hop_by_hop_response_headers_are_removed(start_proxy: StartProxy) -> None:
    head = "\n".join(
        [
            "HTTP/1.1 200 OK",
            "Connection: X-Secret-Hop",
            "X-Secret-Hop: internal",
            "Keep-Alive: timeout=5",
            "Proxy-Authenticate: Basic realm=x",
            "Proxy-Connection: keep-alive",
            "Trailer: X-Checksum",
            "Upgrade: h2c",
            "X-End-To-End: yes",
            "Cache-Control: no-store",
            "Content-Type: text/plain",
            "Content-Length: 2",
        ]
    )
    async with RawScriptedUpstream({"/hop": RawScript(response_bytes(head, b"ok"))}) as upstream:
        proxy = await start_proxy([loopback_policy(upstream.url)])
        response = await raw_exchange(proxy.port, _get("/hop"))
    assert response.status == 200
    assert response.body == b"ok"
    for name in (
        "x-secret-hop",
        "keep-alive",
        "proxy-authenticate",
        "proxy-connection",
        "trailer",
        "upgrade",
    ):
        assert name not in response.header_names, name
    assert "x-secret-hop" not in (response.get("Connection") or "").lower()
    assert response.get("X-End-To-End") == "yes"
    assert response.get("Cache-Control") == "no-store"
    assert response.get(ATTEMPTS) == "1"


async def test_status_reason_and_repeated_headers_pass_through(start_proxy: StartProxy) -> None:
    head = "\n".join(
        [
            "HTTP/1.1 299 Custom Reason",
            "Set-Cookie: a=1; Path=/",
            "Set-Cookie: b=2; Path=/",
            "Link: <https://x.test/1>; rel=next",
            "Link: <https://x.test/0>; rel=prev",
            "Content-Length: 0",
        ]
    )
    async with RawScriptedUpstream({"/r": RawScript(response_bytes(head))}) as upstream:
        proxy = await start_proxy([loopback_policy(upstream.url)])
        response = await raw_exchange(proxy.port, _get("/r"))
    assert (response.status, response.reason) == (299, "Custom Reason")
    assert response.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert response.getall("Link") == ["<https://x.test/1>; rel=next", "<https://x.test/0>; rel=prev"]


async def test_no_content_type_is_invented_for_the_app(start_proxy: StartProxy) -> None:
    head = "HTTP/1.1 200 OK\nContent-Length: 11"
    async with RawScriptedUpstream({"/untyped": RawScript(response_bytes(head, b"raw payload"))}) as upstream:
        proxy = await start_proxy([loopback_policy(upstream.url)])
        response = await raw_exchange(proxy.port, _get("/untyped"))
    assert response.body == b"raw payload"
    assert "content-type" not in response.header_names


async def test_large_request_header_reaches_the_upstream(start_proxy: StartProxy) -> None:
    """12 KiB in one header line: under Outrigger's 64 KiB limit, so it must be forwarded whole."""
    token = "t" * 12_000
    scripts = {"/big": RawScript(response_bytes("HTTP/1.1 200 OK\nContent-Length: 2", b"ok"))}
    async with RawScriptedUpstream(scripts) as upstream:
        proxy = await start_proxy([loopback_policy(upstream.url)])
        response = await raw_exchange(proxy.port, _get("/big", extra=f"X-Big-Token: {token}"))
        assert response.status == 200
        assert f"X-Big-Token: {token}\r\n".encode() in upstream.heads[-1]


async def test_large_response_header_reaches_the_app(start_proxy: StartProxy) -> None:
    policy = "default-src 'self'; " + "; ".join(f"img-src https://cdn{i}.example.com" for i in range(400))
    assert len(policy) > 12_000
    head = f"HTTP/1.1 200 OK\nContent-Security-Policy: {policy}\nContent-Length: 2"
    async with RawScriptedUpstream({"/csp": RawScript(response_bytes(head, b"ok"))}) as upstream:
        proxy = await start_proxy([loopback_policy(upstream.url)])
        response = await raw_exchange(proxy.port, _get("/csp"))
    assert response.status == 200
    assert response.get("Content-Security-Policy") == policy
    assert response.body == b"ok"


async def test_no_cookie_jar_between_apps(aiohttp_server: AiohttpServer, start_proxy: StartProxy) -> None:
    """A Set-Cookie seen on one request is never sent upstream on a later request."""

    async def respond(request: web.Request, seen: Seen) -> web.StreamResponse:
        response = web.Response(text="ok")
        if request.path == "/login":
            response.headers.add("Set-Cookie", "session=victim-secret; Path=/")
            response.headers.add("Set-Cookie", "tracking=1; Path=/; Max-Age=3600")
        return response

    upstream, recorder = await start_recording(aiohttp_server, respond)
    proxy = await start_proxy([loopback_policy(f"http://127.0.0.1:{upstream.port}")])
    first = await raw_exchange(proxy.port, _get("/login"))
    assert first.getall("Set-Cookie") == ["session=victim-secret; Path=/", "tracking=1; Path=/; Max-Age=3600"]
    for other_app in range(2):  # two later requests, each from another client connection
        await raw_exchange(proxy.port, _get(f"/other/{other_app}"))
    assert [seen.raw_path for seen in recorder.seen] == ["/login", "/other/0", "/other/1"]
    for seen in recorder.seen[1:]:
        assert seen.get("Cookie") is None


async def test_upstream_x_outrigger_headers_do_not_reach_the_app(
    counting_upstream: CountingUpstream, start_proxy: StartProxy
) -> None:
    counting_upstream.headers = {
        "x-outrigger-error": "circuit_open",
        "X-Outrigger-Replayed": "true",
        "x-custom": "kept",
    }
    proxy = await start_proxy([loopback_policy(counting_upstream.url)])
    status, headers, body = await app_get(proxy, "/v1/x")
    assert (status, body) == (200, b"ok")
    lowered = {k.lower(): v for k, v in headers.items()}
    assert lowered.get("x-custom") == "kept"
    assert "x-outrigger-error" not in lowered
    assert "x-outrigger-replayed" not in lowered
    assert lowered.get("x-outrigger-attempts") == "1"  # Outrigger's own still set


# --------------------------------------------------------------------------- body framing


async def test_head_keeps_content_length_and_sends_no_body(start_proxy: StartProxy) -> None:
    scripts = {
        "/big": RawScript(response_bytes("HTTP/1.1 200 OK\nContent-Type: text/plain\nContent-Length: 1234")),
        "/next": RawScript(response_bytes("HTTP/1.1 200 OK\nContent-Length: 4", b"next")),
    }
    async with RawScriptedUpstream(scripts) as upstream:
        proxy = await start_proxy([loopback_policy(upstream.url)])
        conn = await RawConnection.open(proxy.port)
        try:
            await conn.send(request_bytes("HEAD /big HTTP/1.1\nHost: upstream.test"))
            head = await conn.read_response("HEAD")
            # the same connection must be clean: any stray body byte would corrupt this response
            await conn.send(_get("/next"))
            after = await conn.read_response()
        finally:
            await conn.close()
    assert head.status == 200
    assert head.get("Content-Length") == "1234"
    assert head.get(ATTEMPTS) == "1"
    assert (after.status, after.body) == (200, b"next")


async def test_204_and_304_have_no_body_and_keep_their_headers(start_proxy: StartProxy) -> None:
    scripts = {
        "/204": RawScript(response_bytes("HTTP/1.1 204 No Content\nX-Deleted: 1")),
        "/304": RawScript(response_bytes('HTTP/1.1 304 Not Modified\nETag: "v7"\nCache-Control: max-age=60')),
        "/after": RawScript(response_bytes("HTTP/1.1 200 OK\nContent-Length: 5", b"after")),
    }
    async with RawScriptedUpstream(scripts) as upstream:
        proxy = await start_proxy([loopback_policy(upstream.url)])
        conn = await RawConnection.open(proxy.port)
        try:
            await conn.send(_get("/204"))
            no_content = await conn.read_response()
            await conn.send(_get("/304", extra='If-None-Match: "v7"'))
            not_modified = await conn.read_response()
            await conn.send(_get("/after"))
            after = await conn.read_response()
        finally:
            await conn.close()
        assert b'If-None-Match: "v7"' in upstream.heads[1]
    assert no_content.status == 204
    assert no_content.get("X-Deleted") == "1"
    assert "transfer-encoding" not in no_content.header_names
    assert not_modified.status == 304
    assert not_modified.get("ETag") == '"v7"'
    assert not_modified.get("Cache-Control") == "max-age=60"
    assert "transfer-encoding" not in not_modified.header_names
    assert (after.status, after.body) == (200, b"after")


async def test_chunked_length_and_close_delimited_responses(start_proxy: StartProxy) -> None:
    parts = [b"first chunk|", os.urandom(70_000), b"|last"]
    scripts = {
        "/chunked": RawScript(response_bytes("HTTP/1.1 200 OK\nTransfer-Encoding: chunked", chunked(parts))),
        "/length": RawScript(response_bytes("HTTP/1.1 200 OK\nContent-Length: 70000", parts[1])),
        "/close": RawScript(
            response_bytes("HTTP/1.1 200 OK\nConnection: close", b"until the upstream closes"), after="close"
        ),
    }
    async with RawScriptedUpstream(scripts) as upstream:
        proxy = await start_proxy([loopback_policy(upstream.url)])
        chunked_response = await raw_exchange(proxy.port, _get("/chunked"))
        length_response = await raw_exchange(proxy.port, _get("/length"))
        close_response = await raw_exchange(proxy.port, _get("/close"))
    assert chunked_response.body == b"".join(parts)
    assert chunked_response.framing == "chunked"
    assert length_response.body == parts[1]
    assert length_response.get("Content-Length") == "70000"
    assert length_response.framing == "length"
    assert close_response.body == b"until the upstream closes"


@pytest.mark.parametrize("method", ["POST", "PUT"])
@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_request_bodies_arrive_intact(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy, method: str, framing: str
) -> None:
    payload = os.urandom(300 * 1024)
    upstream, recorder = await start_recording(aiohttp_server)
    proxy = await start_proxy([loopback_policy(f"http://127.0.0.1:{upstream.port}")])
    head = f"{method} /upload HTTP/1.1\nHost: upstream.test\nContent-Type: application/octet-stream"
    if framing == "length":
        wire = request_bytes(f"{head}\nContent-Length: {len(payload)}", payload)
    else:
        pieces = [payload[i : i + 50_000] for i in range(0, len(payload), 50_000)]
        wire = request_bytes(f"{head}\nTransfer-Encoding: chunked", chunked(pieces))
    response = await raw_exchange(proxy.port, wire)
    assert response.status == 200
    seen = recorder.last
    assert seen.method == method
    assert len(seen.body) == len(payload)
    assert hashlib.sha256(seen.body).digest() == hashlib.sha256(payload).digest()
    if framing == "length":
        assert seen.get("Content-Length") == str(len(payload))
    assert seen.get("Content-Type") == "application/octet-stream"


async def test_expect_100_continue_is_answered(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy
) -> None:
    upstream, recorder = await start_recording(aiohttp_server)
    proxy = await start_proxy([loopback_policy(f"http://127.0.0.1:{upstream.port}")])
    conn = await RawConnection.open(proxy.port)
    try:
        await conn.send(
            request_bytes("POST /e HTTP/1.1\nHost: upstream.test\nContent-Length: 5\nExpect: 100-continue")
        )
        status, _, _ = await conn.read_head(wait=2.0)
        assert status == 100
        await conn.send(b"hello")
        response = await conn.read_response()
    finally:
        await conn.close()
    assert response.status == 200
    assert recorder.last.body == b"hello"


# --------------------------------------------------------------------------- gzip


async def test_gzip_response_bytes_and_header_pass_through(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy
) -> None:
    compressed = gzip.compress(b'{"message": "hello"}' * 1000, mtime=0)

    async def respond(request: web.Request, seen: Seen) -> web.StreamResponse:
        return web.Response(
            body=compressed, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
        )

    upstream, recorder = await start_recording(aiohttp_server, respond)
    proxy = await start_proxy([loopback_policy(f"http://127.0.0.1:{upstream.port}")])
    async with (
        aiohttp.ClientSession(auto_decompress=False) as client,
        client.get("http://upstream.test/data", proxy=proxy.url, headers={"Accept-Encoding": "gzip"}) as resp,
    ):
        body = await resp.read()
        assert resp.headers["Content-Encoding"] == "gzip"
        assert resp.headers["Content-Length"] == str(len(compressed))
        assert resp.headers[ATTEMPTS] == "1"
    assert body == compressed
    assert recorder.last.get("Accept-Encoding") == "gzip"


async def test_gzip_request_body_reaches_the_upstream_byte_for_byte(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy
) -> None:
    compressed = gzip.compress(os.urandom(1024) * 64, mtime=0)
    upstream, recorder = await start_recording(aiohttp_server)
    proxy = await start_proxy([loopback_policy(f"http://127.0.0.1:{upstream.port}")])
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as client,
        client.post("http://upstream.test/in", data=compressed, headers=headers, proxy=proxy.url) as resp,
    ):
        assert resp.status == 200
    seen = recorder.last
    assert seen.body == compressed
    assert seen.get("Content-Encoding") == "gzip"
    assert seen.get("Content-Length") == str(len(compressed))


# --------------------------------------------------------------------------- connections


async def test_sequential_requests_reuse_one_upstream_connection(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy
) -> None:
    upstream, recorder = await start_recording(aiohttp_server)
    proxy = await start_proxy([loopback_policy(f"http://127.0.0.1:{upstream.port}")])
    for index in range(6):  # every request on a new client connection, one after the other
        response = await raw_exchange(proxy.port, _get(f"/n/{index}"))
        assert response.status == 200
    assert len(recorder.seen) == 6
    assert len({seen.peer_port for seen in recorder.seen}) == 1


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_upstream_reset_mid_body_reaches_the_app_as_a_broken_response(
    start_proxy: StartProxy, framing: str
) -> None:
    first_part = b"x" * 1000
    if framing == "length":
        partial = response_bytes("HTTP/1.1 200 OK\nContent-Length: 100000", first_part)
    else:
        partial = response_bytes(
            "HTTP/1.1 200 OK\nTransfer-Encoding: chunked", b"3e8\r\n" + first_part + b"\r\n"
        )
    async with RawScriptedUpstream({"/reset": RawScript(partial, after="reset", pause=0.2)}) as upstream:
        proxy = await start_proxy([loopback_policy(upstream.url)])
        conn = await RawConnection.open(proxy.port)
        try:
            await conn.send(_get("/reset"))
            with pytest.raises(IncompleteBody) as broken:
                await conn.read_response()
        finally:
            await conn.close()
    assert broken.value.received == first_part  # what arrived is relayed, but never as a complete body

    # A real client sees an error too, not a clean short body.
    async with RawScriptedUpstream({"/reset": RawScript(partial, after="reset", pause=0.2)}) as upstream:
        proxy = await start_proxy([loopback_policy(upstream.url, host="again.test")])
        async with (
            aiohttp.ClientSession() as client,
            client.get("http://again.test/reset", proxy=proxy.url) as resp,
        ):
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
