"""TLS origination (SPEC 3 `tls`, SPEC 7): verification, CA files, SNI, client certificates.

The upstream is a real HTTPS aiohttp server on 127.0.0.1 with a trustme
certificate for ``localhost``; policies name it ``https://localhost:PORT`` so
Outrigger connects to the checked IP and must use ``localhost`` for SNI and
the certificate check.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from tests.conftest import StartProxy, loopback_policy
from tests.e2e.upstreams import RawResponse, TlsMaterial, peer_subject_cn, raw_exchange, request_bytes


@dataclass
class TlsUpstream:
    server: TestServer
    sni: list[str] = field(default_factory=list)
    """SNI names offered by each TLS handshake the upstream accepted or refused."""
    requests: list[dict[str, Any]] = field(default_factory=list)

    def url(self, name: str = "localhost") -> str:
        return f"https://{name}:{self.server.port}"


@pytest.fixture
def tls(tmp_path: Path) -> TlsMaterial:
    directory = tmp_path / "tls"
    directory.mkdir()
    return TlsMaterial.create(directory)


async def _start_upstream(
    aiohttp_server: AiohttpServer, tls: TlsMaterial, *, require_client_cert: bool = False
) -> TlsUpstream:
    sni: list[str] = []
    requests: list[dict[str, Any]] = []

    async def handle(request: web.Request) -> web.Response:
        seen = {"host": request.headers.get("Host"), "client_cn": peer_subject_cn(request)}
        requests.append(seen)
        return web.json_response(seen)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    context = tls.server_context(require_client_cert=require_client_cert, sni_seen=sni)
    server = await aiohttp_server(app, ssl=context)
    return TlsUpstream(server, sni, requests)


async def _call(port: int, host: str, path: str = "/tls") -> RawResponse:
    return await raw_exchange(port, request_bytes(f"GET {path} HTTP/1.1\nHost: {host}"))


def _error(response: RawResponse) -> dict[str, str]:
    body: dict[str, dict[str, str]] = json.loads(response.body)
    return body["error"]


async def test_ca_file_verifies_the_upstream_by_host_name(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy, tls: TlsMaterial
) -> None:
    upstream = await _start_upstream(aiohttp_server, tls)
    proxy = await start_proxy([loopback_policy(upstream.url(), tls={"ca_file": str(tls.ca_file)})])
    response = await _call(proxy.port, "upstream.test")
    assert response.status == 200
    assert json.loads(response.body) == {"host": f"localhost:{upstream.server.port}", "client_cn": None}
    assert response.get("x-outrigger-attempts") == "1"
    assert upstream.sni == ["localhost"]  # the name, although the connection went to 127.0.0.1


async def test_default_verification_rejects_an_unknown_ca(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy, tls: TlsMaterial
) -> None:
    upstream = await _start_upstream(aiohttp_server, tls)
    proxy = await start_proxy([loopback_policy(upstream.url())])
    response = await _call(proxy.port, "upstream.test")
    assert response.status == 502
    assert response.get("x-outrigger-error") == "upstream_unreachable"
    error = _error(response)
    assert error["type"] == "upstream_unreachable"
    assert "certificate" in error["message"].lower()
    assert upstream.requests == []


async def test_verify_false_accepts_the_untrusted_certificate(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy, tls: TlsMaterial
) -> None:
    upstream = await _start_upstream(aiohttp_server, tls)
    proxy = await start_proxy([loopback_policy(upstream.url(), tls={"verify": False})])
    response = await _call(proxy.port, "upstream.test")
    assert response.status == 200
    assert json.loads(response.body)["host"] == f"localhost:{upstream.server.port}"


async def test_sni_override_is_sent_and_used_for_the_hostname_check(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy, tls: TlsMaterial
) -> None:
    upstream = await _start_upstream(aiohttp_server, tls)
    proxy = await start_proxy(
        [
            loopback_policy(
                upstream.url(), host="checked.test", tls={"ca_file": str(tls.ca_file), "sni": "other.name"}
            ),
            loopback_policy(
                upstream.url(), host="unchecked.test", tls={"verify": False, "sni": "other.name"}
            ),
        ]
    )
    checked = await _call(proxy.port, "checked.test")
    assert checked.status == 502
    assert checked.get("x-outrigger-error") == "upstream_unreachable"
    message = _error(checked)["message"].lower()
    assert "certificate" in message
    assert "other.name" in message or "hostname" in message
    assert upstream.requests == []

    unchecked = await _call(proxy.port, "unchecked.test")
    assert unchecked.status == 200
    assert upstream.sni == ["other.name", "other.name"]
    # Host still names the upstream; only SNI is overridden
    assert json.loads(unchecked.body)["host"] == f"localhost:{upstream.server.port}"


async def test_pooled_connections_are_not_shared_across_tls_settings(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy, tls: TlsMaterial
) -> None:
    """A verified (or unverified) pooled connection must not serve a policy whose check would fail."""
    upstream = await _start_upstream(aiohttp_server, tls)
    proxy = await start_proxy(
        [
            loopback_policy(upstream.url(), host="trusting.test", tls={"ca_file": str(tls.ca_file)}),
            loopback_policy(upstream.url(), host="lax.test", tls={"verify": False}),
            loopback_policy(upstream.url(), host="strict.test"),
            loopback_policy(
                upstream.url(), host="wrong-sni.test", tls={"ca_file": str(tls.ca_file), "sni": "other.name"}
            ),
        ]
    )
    for _ in range(2):
        assert (await _call(proxy.port, "trusting.test")).status == 200
        assert (await _call(proxy.port, "lax.test")).status == 200
        assert (await _call(proxy.port, "strict.test")).status == 502
        assert (await _call(proxy.port, "wrong-sni.test")).status == 502
    assert len(upstream.requests) == 4


async def test_mtls_client_certificate(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy, tls: TlsMaterial
) -> None:
    upstream = await _start_upstream(aiohttp_server, tls, require_client_cert=True)
    proxy = await start_proxy(
        [
            loopback_policy(upstream.url(), host="anonymous.test", tls={"ca_file": str(tls.ca_file)}),
            loopback_policy(
                upstream.url(),
                host="mtls.test",
                tls={
                    "ca_file": str(tls.ca_file),
                    "client_cert": str(tls.client_cert),
                    "client_key": str(tls.client_key),
                },
            ),
        ]
    )
    anonymous = await _call(proxy.port, "anonymous.test")
    assert anonymous.status == 502
    assert anonymous.get("x-outrigger-error") == "upstream_unreachable"
    assert upstream.requests == []

    authenticated = await _call(proxy.port, "mtls.test")
    assert authenticated.status == 200
    assert json.loads(authenticated.body) == {
        "host": f"localhost:{upstream.server.port}",
        "client_cn": tls.client_name,
    }
