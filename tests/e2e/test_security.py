"""SPEC 7 end to end: egress allowlist, SSRF guard, CONNECT refusal, TLS verification.

Upstreams count TCP connections (`RawUpstream`), so "refused" also proves the proxy never
connected. Every generated error is checked against SPEC 5 (status, JSON body, header).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict
from pytest_aiohttp import AiohttpServer

from proxy.config.loader import ConfigError, load_config
from tests.conftest import Launch, RunningProxy, StartProxy, free_port, loopback_policy, write_config
from tests.e2e.procs import RawUpstream, assert_error, assert_error_response, config_ports
from tests.e2e.upstreams import (
    CountingUpstream,
    RawScript,
    RawScriptedUpstream,
    raw_exchange,
    request_bytes,
    response_bytes,
)
from tests.fakes import CALL_TIMEOUT

HOST = "upstream.test"


async def _get(
    proxy: RunningProxy, mode: str, host: str, path: str = "/v1/x"
) -> tuple[int, CIMultiDict[str], bytes]:
    """GET `host``path` through the main listener, by absolute-form target or Host header."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as client:
        if mode == "absolute-form":
            request = client.get(f"http://{host}{path}", proxy=proxy.url)
        else:
            request = client.get(f"{proxy.url}{path}", headers={"Host": host})
        async with request as response:
            return response.status, CIMultiDict(response.headers), await response.read()


def _ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------- allowlist


@pytest.mark.parametrize("mode", ["absolute-form", "host-header"])
@pytest.mark.parametrize("main", [{}, {"unknown_hosts": "deny"}], ids=["default", "explicit-deny"])
@pytest.mark.parametrize(
    ("requested", "reported"),
    [
        ("unknown.example", "unknown.example"),
        ("Unknown.Example:8443", "unknown.example"),
        ("sub.upstream.test", "sub.upstream.test"),  # an exact policy does not cover subdomains
    ],
)
async def test_unknown_host_is_refused_without_connecting(
    start_proxy: StartProxy,
    raw_upstream: RawUpstream,
    mode: str,
    main: dict[str, Any],
    requested: str,
    reported: str,
) -> None:
    proxy = await start_proxy([loopback_policy(f"http://{raw_upstream.authority}")], **main)
    status, headers, body = await _get(proxy, mode, requested)
    error = assert_error(
        status, headers, body, expected_status=403, error_type="host_not_allowed", host=reported
    )
    assert "unknown_hosts" in error["message"]
    assert raw_upstream.connections == 0
    # The allowed host still works on the same proxy: the refusal was about the host.
    status, _, body = await _get(proxy, mode, "upstream.test")
    assert (status, body) == (200, b"ok")
    assert raw_upstream.connections == 1


@pytest.mark.parametrize(
    ("requested", "allowed"),
    [
        ("a.svc.test", True),
        ("deep.a.svc.test", True),
        ("svc.test", False),  # "*.svc.test" does not claim the bare domain
        ("evilsvc.test", False),  # suffix match must be on a label boundary
        ("svc.test.evil.example", False),
    ],
)
async def test_wildcard_allowlist_matches_on_label_boundaries(
    start_proxy: StartProxy, raw_upstream: RawUpstream, requested: str, allowed: bool
) -> None:
    proxy = await start_proxy([loopback_policy(f"http://{raw_upstream.authority}", host="*.svc.test")])
    status, headers, body = await _get(proxy, "host-header", requested)
    if allowed:
        assert (status, body) == (200, b"ok")
        assert raw_upstream.connections == 1
    else:
        assert_error(
            status, headers, body, expected_status=403, error_type="host_not_allowed", host=requested
        )
        assert raw_upstream.connections == 0


@pytest.mark.parametrize(
    "connection",
    ["keep-alive, Content-Length", "Content-Length", "close, content-length"],
)
async def test_connection_tokens_cannot_strip_the_framing_and_smuggle_a_request(
    start_proxy: StartProxy, connection: str
) -> None:
    """`Connection: Content-Length` must not drop the body's framing: the upstream would read the
    body as a second request that no policy ever saw (headers rules, limits, logs bypassed)."""
    ok = RawScript(response_bytes("HTTP/1.1 200 OK\nContent-Length: 2", b"ok"))
    async with RawScriptedUpstream({"/x": ok, "/smuggled": ok}) as upstream:
        proxy = await start_proxy([loopback_policy(upstream.url, headers={"remove": ["X-Internal-Debug"]})])
        smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\nX-Internal-Debug: 1\r\n\r\n"
        head = f"POST /x HTTP/1.1\nHost: upstream.test\nConnection: {connection}"
        head += f"\nContent-Length: {len(smuggled)}"
        response = await raw_exchange(proxy.port, request_bytes(head, smuggled))
        assert response.status == 200
        for _ in range(50):  # a smuggled request would arrive right behind the first
            await asyncio.sleep(0.01)
        heads = list(upstream.heads)
    assert len(heads) == 1, heads
    assert f"\r\nContent-Length: {len(smuggled)}\r\n".encode() in heads[0]


@pytest.mark.parametrize("name", ["Content-Length", "Transfer-Encoding", "Host"])
def test_header_rules_cannot_touch_the_framing(tmp_path: Path, name: str) -> None:
    for rules in ({"set": {name: "1"}}, {"remove": [name]}):
        with pytest.raises(ConfigError, match=f"{name} is written by Outrigger"):
            load_config(write_config(tmp_path, [loopback_policy("http://127.0.0.1:9", headers=rules)]))


async def test_absolute_target_decides_the_policy_not_the_host_header(
    start_proxy: StartProxy, raw_upstream: RawUpstream
) -> None:
    """A Host header naming an allowed host must not smuggle an absolute-form request elsewhere."""
    proxy = await start_proxy([loopback_policy(f"http://{raw_upstream.authority}")])
    async with aiohttp.ClientSession() as client:
        async with client.get(
            "http://unknown.example/x", proxy=proxy.url, headers={"Host": "upstream.test"}
        ) as response:
            await assert_error_response(
                response, status=403, error_type="host_not_allowed", host="unknown.example"
            )
        assert raw_upstream.connections == 0
        async with client.get(
            "http://upstream.test/x", proxy=proxy.url, headers={"Host": "unknown.example"}
        ) as response:
            assert response.status == 200
    assert raw_upstream.heads[0].startswith(b"GET /x HTTP/1.1\r\n")
    assert f"\r\nHost: {raw_upstream.authority}\r\n".encode() in raw_upstream.heads[0]


async def test_dedicated_port_only_reaches_its_own_upstream(
    start_proxy: StartProxy, raw_upstream: RawUpstream
) -> None:
    """On a policy's own port the request target's host cannot pick another upstream."""
    port = free_port()
    await start_proxy([loopback_policy(f"http://{raw_upstream.authority}", listen=port)])
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"http://localhost:{port}/y", proxy=f"http://127.0.0.1:{port}") as response,
    ):
        assert response.status == 200
        assert await response.read() == b"ok"
    assert raw_upstream.connections == 1
    assert raw_upstream.heads[0].startswith(b"GET /y HTTP/1.1\r\n")
    assert f"\r\nHost: {raw_upstream.authority}\r\n".encode() in raw_upstream.heads[0]


@pytest.mark.parametrize(
    ("host", "status"),
    [
        pytest.param("localhost", 200, id="localhost"),
        pytest.param("127.0.0.1:{port}", 200, id="loopback-v4"),
        pytest.param("[::1]:{port}", 200, id="loopback-v6"),
        pytest.param("upstream.test", 200, id="the-policys-own-host"),
        pytest.param("evil.example", 403, id="rebinding"),
        pytest.param("other.test", 403, id="another-policys-host"),
    ],
)
async def test_a_dedicated_port_refuses_a_foreign_host(
    start_proxy: StartProxy, raw_upstream: RawUpstream, host: str, status: int
) -> None:
    """DNS rebinding: a page served from evil.example that resolves to 127.0.0.1 must not borrow the
    credentials the dedicated port injects (SPEC 2)."""
    port = free_port()
    await start_proxy(
        [
            loopback_policy(f"http://{raw_upstream.authority}", listen=port),
            loopback_policy(f"http://{raw_upstream.authority}", host="other.test"),
        ]
    )
    head = f"GET /y HTTP/1.1\nHost: {host.format(port=port)}"
    response = await raw_exchange(port, request_bytes(head))
    assert response.status == status
    if status == 403:
        assert response.get("x-outrigger-error") == "host_not_allowed"
        assert raw_upstream.connections == 0


@pytest.mark.parametrize(
    ("hosts", "authority", "status"),
    [
        pytest.param(["upstream.test"], "upstream.test", 200, id="no-port"),
        pytest.param(["upstream.test"], "upstream.test:80", 200, id="http-default"),
        pytest.param(["upstream.test"], "upstream.test:443", 200, id="https-default"),
        pytest.param(["upstream.test"], "upstream.test:8443", 403, id="unclaimed-port"),
        pytest.param(["upstream.test:8443"], "upstream.test:8443", 200, id="claimed-port"),
        pytest.param(["upstream.test:8443"], "upstream.test", 403, id="only-that-port"),
        pytest.param(["*.upstream.test"], "api.upstream.test:8443", 403, id="wildcard-unclaimed-port"),
        pytest.param(["*.upstream.test:8443"], "api.upstream.test:8443", 200, id="wildcard-claimed-port"),
    ],
)
async def test_a_host_claims_its_default_ports_only(
    start_proxy: StartProxy, raw_upstream: RawUpstream, hosts: list[str], authority: str, status: int
) -> None:
    policy = loopback_policy(f"http://{raw_upstream.authority}")
    proxy = await start_proxy([{**policy, "hosts": hosts}])
    response = await raw_exchange(proxy.port, request_bytes(f"GET /y HTTP/1.1\nHost: {authority}"))
    assert response.status == status
    if status == 403:
        assert response.get("x-outrigger-error") == "host_not_allowed"


# --------------------------------------------------------------------------- unknown_hosts: allow


@pytest.fixture
def tls_upstream_files(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return context, ca_file


async def _tls_echo(
    aiohttp_server: AiohttpServer, context: ssl.SSLContext, seen: list[web.Request]
) -> TestServer:
    async def echo(request: web.Request) -> web.Response:
        seen.append(request)
        return web.json_response({"host": request.headers.get("Host"), "secure": request.secure})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return await aiohttp_server(app, ssl=context)


@pytest.mark.parametrize("mode", ["absolute-form", "host-header"])
async def test_unknown_hosts_allow_originates_https_to_the_requested_host(
    aiohttp_server: AiohttpServer,
    start_proxy: StartProxy,
    tls_upstream_files: tuple[ssl.SSLContext, Path],
    mode: str,
) -> None:
    context, ca_file = tls_upstream_files
    seen: list[web.Request] = []
    server = await _tls_echo(aiohttp_server, context, seen)
    proxy = await start_proxy(
        [loopback_policy("http://127.0.0.1:9", host="other.test")],
        unknown_hosts="allow",
        defaults={"allow_private_addresses": True, "tls": {"ca_file": str(ca_file)}},
    )
    status, headers, body = await _get(proxy, mode, f"localhost:{server.port}", "/v1/charges?a=1")
    assert status == 200, body
    assert headers["x-outrigger-attempts"] == "1"
    assert len(seen) == 1
    assert seen[0].path_qs == "/v1/charges?a=1"
    assert seen[0].secure, "the fallback policy must originate TLS (https to the requested host)"
    assert seen[0].headers["Host"] == f"localhost:{server.port}"


async def test_unknown_hosts_allow_still_verifies_tls_certificates(
    aiohttp_server: AiohttpServer,
    start_proxy: StartProxy,
    tls_upstream_files: tuple[ssl.SSLContext, Path],
) -> None:
    """SPEC 7: TLS to upstreams verifies certificates by default (the test CA is not trusted here)."""
    context, _ = tls_upstream_files
    seen: list[web.Request] = []
    server = await _tls_echo(aiohttp_server, context, seen)
    proxy = await start_proxy(
        [loopback_policy("http://127.0.0.1:9", host="other.test")],
        unknown_hosts="allow",
        defaults={"allow_private_addresses": True},
    )
    status, headers, body = await _get(proxy, "host-header", f"localhost:{server.port}")
    error = assert_error(
        status, headers, body, expected_status=502, error_type="upstream_unreachable", host="localhost"
    )
    assert "certificate" in error["message"].lower()
    assert seen == []


@pytest.mark.parametrize(
    ("requested", "reported"),
    [
        ("127.0.0.1:{port}", "127.0.0.1"),
        ("localhost:{port}", "localhost"),
        ("0.0.0.0:{port}", "0.0.0.0"),
        ("[::ffff:127.0.0.1]:{port}", {"::ffff:127.0.0.1", "::ffff:7f00:1"}),
        ("169.254.169.254", "169.254.169.254"),  # cloud metadata
        ("10.1.2.3", "10.1.2.3"),
        ("192.168.0.1", "192.168.0.1"),
        ("100.64.0.1", "100.64.0.1"),  # carrier-grade NAT
        ("[fd00::1]", "fd00::1"),  # unique local
    ],
)
async def test_unknown_hosts_allow_still_applies_the_ssrf_guard(
    start_proxy: StartProxy, raw_upstream: RawUpstream, requested: str, reported: str | set[str]
) -> None:
    """The fallback policy for unknown hosts does not opt out of the SSRF guard."""
    proxy = await start_proxy(
        [loopback_policy("http://127.0.0.1:9", host="other.test")], unknown_hosts="allow"
    )
    host = requested.format(port=raw_upstream.port)
    status, headers, body = await _get(proxy, "host-header", host)
    error = assert_error(
        status, headers, body, expected_status=403, error_type="address_not_allowed", host=reported
    )
    assert "allow_private_addresses" in error["message"]
    assert raw_upstream.connections == 0


# --------------------------------------------------------------------------- SSRF guard on policies


@pytest.mark.parametrize(
    "upstream_host",
    ["127.0.0.1", "localhost", "0.0.0.0", "[::ffff:127.0.0.1]", "2130706433", "127.1.2.3"],
    ids=["ipv4-loopback", "localhost-name", "unspecified", "ipv4-mapped", "decimal-ip", "loopback-net"],
)
@pytest.mark.parametrize("mode", ["absolute-form", "host-header", "dedicated-port"])
async def test_private_upstream_refused_without_opt_in(
    start_proxy: StartProxy, raw_upstream: RawUpstream, upstream_host: str, mode: str
) -> None:
    port = free_port()
    policy = {
        "hosts": ["upstream.test"],
        "upstream": f"http://{upstream_host}:{raw_upstream.port}",
        "listen": port,
    }
    proxy = await start_proxy([policy])
    if mode == "dedicated-port":
        async with aiohttp.ClientSession() as client, client.get(f"http://127.0.0.1:{port}/x") as response:
            status, headers, body = response.status, CIMultiDict(response.headers), await response.read()
    else:
        status, headers, body = await _get(proxy, mode, "upstream.test")
    error = assert_error(
        status, headers, body, expected_status=403, error_type="address_not_allowed", host="upstream.test"
    )
    assert "allow_private_addresses" in error["message"]
    assert raw_upstream.connections == 0
    assert raw_upstream.heads == []


@pytest.mark.parametrize("upstream_host", ["127.0.0.1", "localhost"])
async def test_private_upstream_allowed_with_opt_in(
    start_proxy: StartProxy, raw_upstream: RawUpstream, upstream_host: str
) -> None:
    proxy = await start_proxy([loopback_policy(f"http://{upstream_host}:{raw_upstream.port}")])
    status, headers, body = await _get(proxy, "host-header", "upstream.test")
    assert (status, body) == (200, b"ok")
    assert headers["x-outrigger-attempts"] == "1"
    assert raw_upstream.connections == 1


@pytest.mark.skipif(not _ipv6_loopback_available(), reason="no IPv6 loopback here")
async def test_ipv6_loopback_upstream_refused_without_opt_in_and_allowed_with_it(
    start_proxy: StartProxy,
) -> None:
    upstream = await RawUpstream(host="::1").start()
    try:
        guarded = {"hosts": ["guarded.test"], "upstream": f"http://[::1]:{upstream.port}"}
        opened = {**loopback_policy(f"http://[::1]:{upstream.port}", host="open.test")}
        proxy = await start_proxy([guarded, opened])
        status, headers, body = await _get(proxy, "host-header", "guarded.test")
        assert_error(
            status,
            headers,
            body,
            expected_status=403,
            error_type="address_not_allowed",
            host="guarded.test",
        )
        assert upstream.connections == 0
        status, _, body = await _get(proxy, "host-header", "open.test")
        assert (status, body) == (200, b"ok")
        assert upstream.connections == 1
    finally:
        await upstream.close()


# --------------------------------------------------------------------------- CONNECT


@pytest.mark.parametrize(
    ("target", "status", "error_type"),
    [
        pytest.param("upstream.test:443", 405, "connect_not_supported", id="allowed-host"),
        pytest.param("{authority}", 403, "host_not_allowed", id="raw-address"),
    ],
)
async def test_connect_is_refused_without_connect_tunnel(
    start_proxy: StartProxy, raw_upstream: RawUpstream, target: str, status: int, error_type: str
) -> None:
    """A claimed host whose policy does not tunnel: 405 with advice; an unclaimed one: the allowlist."""
    proxy = await start_proxy([loopback_policy(f"http://{raw_upstream.authority}")])
    authority = target.format(authority=raw_upstream.authority)
    response = await raw_exchange(
        proxy.port, f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
    )
    error = assert_error(
        response.status,
        response.headers,
        response.body,
        expected_status=status,
        error_type=error_type,
    )
    if status == 405:
        assert "http://" in error["message"], "the message must tell the app to send http:// URLs"
    assert raw_upstream.connections == 0


async def test_connect_refused_on_dedicated_port_too(
    start_proxy: StartProxy, raw_upstream: RawUpstream
) -> None:
    port = free_port()
    await start_proxy([loopback_policy(f"http://{raw_upstream.authority}", listen=port)])
    response = await raw_exchange(
        port, b"CONNECT upstream.test:443 HTTP/1.1\r\nHost: upstream.test:443\r\n\r\n"
    )
    assert_error(
        response.status,
        response.headers,
        response.body,
        expected_status=405,
        error_type="connect_not_supported",
    )
    assert raw_upstream.connections == 0


async def test_connect_error_names_the_requested_host(
    start_proxy: StartProxy, raw_upstream: RawUpstream
) -> None:
    proxy = await start_proxy([loopback_policy(f"http://{raw_upstream.authority}")])
    response = await raw_exchange(
        proxy.port, b"CONNECT upstream.test:443 HTTP/1.1\r\nHost: upstream.test:443\r\n\r\n"
    )
    assert_error(
        response.status,
        response.headers,
        response.body,
        expected_status=405,
        error_type="connect_not_supported",
        host="upstream.test",
    )


async def test_connect_error_points_at_the_real_listener(
    start_proxy: StartProxy, raw_upstream: RawUpstream
) -> None:
    proxy = await start_proxy([loopback_policy(f"http://{raw_upstream.authority}")])
    assert proxy.port != 15001
    response = await raw_exchange(
        proxy.port, b"CONNECT upstream.test:443 HTTP/1.1\r\nHost: upstream.test:443\r\n\r\n"
    )
    error = assert_error(
        response.status,
        response.headers,
        response.body,
        expected_status=405,
        error_type="connect_not_supported",
    )
    assert f"HTTP_PROXY=http://127.0.0.1:{proxy.port})" in error["message"]
    assert "15001" not in error["message"]


# --------------------------------------------------------------------------- Host header validity


async def test_invalid_host_header_is_a_bad_request(
    start_proxy: StartProxy, raw_upstream: RawUpstream
) -> None:
    proxy = await start_proxy([loopback_policy(f"http://{raw_upstream.authority}")])
    response = await raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: exa mple.test\r\n\r\n")
    assert_error(
        response.status, response.headers, response.body, expected_status=400, error_type="bad_request"
    )
    assert raw_upstream.connections == 0


async def test_duplicate_host_headers_are_a_bad_request(
    start_proxy: StartProxy, raw_upstream: RawUpstream
) -> None:
    """RFC 9112 3.2: more than one Host is a 400, never "use the first one"."""
    proxy = await start_proxy([loopback_policy(f"http://{raw_upstream.authority}")])
    response = await raw_exchange(
        proxy.port, b"GET / HTTP/1.1\r\nHost: upstream.test\r\nHost: unknown.example\r\n\r\n"
    )
    assert_error(
        response.status, response.headers, response.body, expected_status=400, error_type="bad_request"
    )
    assert raw_upstream.connections == 0


# --------------------------------------------------------------------------- request target and host forms


async def test_options_asterisk_is_a_bad_request(
    counting_upstream: CountingUpstream, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy([loopback_policy(counting_upstream.url)])
    reply = await raw_exchange(proxy.port, f"OPTIONS * HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    assert_error(reply.status, reply.headers, reply.body, expected_status=400, error_type="bad_request")
    assert sum(counting_upstream.hits.values()) == 0


async def test_host_with_a_trailing_dot_routes_like_the_host(
    counting_upstream: CountingUpstream, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy([loopback_policy(counting_upstream.url)])
    reply = await raw_exchange(
        proxy.port, b"GET /v1/x HTTP/1.1\r\nHost: upstream.test.\r\nConnection: close\r\n\r\n"
    )
    assert reply.status == 200, reply.body
    assert reply.body == b"ok"
    assert counting_upstream.hits == {"/v1/x": 1}


async def test_absolute_target_with_an_invalid_host_is_a_bad_request(
    counting_upstream: CountingUpstream, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy([loopback_policy(counting_upstream.url)])
    reply = await raw_exchange(
        proxy.port, b"GET http://%75p.test/ HTTP/1.1\r\nHost: upstream.test\r\nConnection: close\r\n\r\n"
    )
    assert_error(reply.status, reply.headers, reply.body, expected_status=400, error_type="bad_request")
    assert sum(counting_upstream.hits.values()) == 0


# --------------------------------------------------------------------------- malformed authorities

BAD_PORTS = ["api.x:0", "upstream.test:0", "[::1]:0", "upstream.test:+80", "upstream.test:99999", "api.x:8o"]
BAD_HOST_HEADERS = ["h?x", "upstream.test?x=1", "h#x", "upstream.test/x", *BAD_PORTS]
"""In an absolute-form target ``?`` and ``#`` end the authority, so only the port cases apply."""


async def test_a_malformed_authority_is_a_bad_request_from_a_real_outrigger(
    raw_upstream: RawUpstream, launch: Launch, tmp_path: Path
) -> None:
    """Port 0, a query or fragment in Host, a signed port: 400 bad_request, never a 500."""
    config = write_config(
        tmp_path, [loopback_policy(f"http://{raw_upstream.authority}")], unknown_hosts="allow"
    )
    main_port, _ = config_ports(config)
    process = launch(config)
    await process.wait_ready()
    targets = [("/v1/x", host) for host in BAD_HOST_HEADERS]
    targets += [(f"http://{authority}/v1/x", "upstream.test") for authority in BAD_PORTS]
    for target, host in targets:
        request = f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        reply = await raw_exchange(main_port, request.encode())
        assert reply.status == 400, (target, host, reply.body)
        assert_error(reply.status, reply.headers, reply.body, expected_status=400, error_type="bad_request")
    assert raw_upstream.connections == 0
    assert "Traceback" not in process.output


# --------------------------------------------------------------------------- error messages without the URL


async def test_reset_during_upload_does_not_echo_the_url_with_its_query(start_proxy: StartProxy) -> None:
    """The upload-write failure: aiohttp's "Can not write request body for <url>" must not reach the app."""
    resetting = await RawUpstream("reset").start()  # reads the head, then RST while we upload
    try:
        proxy = await start_proxy([loopback_policy(f"http://127.0.0.1:{resetting.port}")])
        async with aiohttp.ClientSession(timeout=CALL_TIMEOUT) as client:
            for _ in range(3):
                async with client.post(
                    f"{proxy.url}/v1/x?token=SECRET", data=b"x" * 4_000_000, headers={"Host": HOST}
                ) as response:
                    text = await response.text()
                    assert response.status == 502, text
                    assert "SECRET" not in text
    finally:
        await resetting.close()
