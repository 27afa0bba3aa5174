"""Credentials end to end (SPEC 10): a real token endpoint and upstreams on loopback, a real Outrigger.

OAuth2: one token call for 200 concurrent first requests; a 401 makes one
refresh and one re-send; a failing endpoint is ``502 credentials_unavailable``;
a planted client secret and token appear in no log line, span, /config,
/state or explain. Key pool: a 429 on key A sends the retry and the next
requests to key B at once, and A comes back when its Retry-After has passed.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.explain import explain
from proxy.telemetry.otlp_decode import SPAN_KIND_CLIENT
from tests.conftest import AccessLog, StartProxy, free_port, loopback_policy
from tests.e2e.otlp_receiver import OtlpReceiver
from tests.e2e.procs import assert_error, wait_until
from tests.e2e.test_tracing import traced
from tests.fakes import AiohttpServerFactory, ScriptedUpstream, TokenEndpoint, admin_state, app_request, call

HOST = "upstream.test"
PLANTED_SECRET = "planted-client-secret-7f3a"


def _oauth2(token_url: str, secret_file: Path, **extra: Any) -> dict[str, Any]:
    secret_file.write_text(PLANTED_SECRET + "\n")
    return {
        "oauth2": {
            "token_url": f"{token_url}/oauth/token",
            "client_id": "outrigger-test",
            "client_secret": f"${{file:{secret_file}}}",
            **extra,
        }
    }


async def _token_endpoint(aiohttp_server: AiohttpServerFactory, issuer: TokenEndpoint) -> ScriptedUpstream:
    return await ScriptedUpstream(issuer).start(aiohttp_server)


async def test_200_concurrent_first_requests_make_one_token_call(
    aiohttp_server: AiohttpServerFactory,
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    tokens = await _token_endpoint(aiohttp_server, TokenEndpoint(delay=0.3))
    upstream = await ScriptedUpstream(200).start(aiohttp_server)
    proxy = await start_proxy(
        [loopback_policy(upstream.url, credentials=_oauth2(tokens.url, tmp_path / "secret"))]
    )

    async def one() -> int:
        async with client.get(f"{proxy.url}/v1/things", headers={"Host": HOST}) as response:
            await response.read()
            return response.status

    statuses = await asyncio.gather(*(one() for _ in range(200)))

    assert statuses == [200] * 200
    assert tokens.count == 1
    assert upstream.count == 200
    assert {seen.headers.get("Authorization") for seen in upstream.seen} == {"Bearer token-1"}


async def test_a_401_makes_one_refresh_and_one_resend(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy, tmp_path: Path
) -> None:
    tokens = await _token_endpoint(aiohttp_server, TokenEndpoint())
    upstream = await ScriptedUpstream(401, 200, 401, 401).start(aiohttp_server)
    proxy = await start_proxy(
        [loopback_policy(upstream.url, credentials=_oauth2(tokens.url, tmp_path / "secret"))]
    )

    reply = await app_request(proxy, "POST", "/v1/charges", data=b"amount=100")  # POST, no retries section

    assert reply.status == 200
    assert reply.headers["x-outrigger-attempts"] == "2"
    assert tokens.count == 2
    assert [s.headers["Authorization"] for s in upstream.seen] == ["Bearer token-1", "Bearer token-2"]
    assert [s.body for s in upstream.seen] == [b"amount=100", b"amount=100"]

    again = await app_request(proxy, "GET")  # 401 once more, and for the fresh token too: passed on
    assert again.status == 401
    assert again.headers["x-outrigger-attempts"] == "2"
    assert tokens.count == 3
    assert upstream.count == 4


@pytest.mark.parametrize("endpoint", ["refuses", "answers 400"])
async def test_a_failing_token_endpoint_is_502_credentials_unavailable(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy, tmp_path: Path, endpoint: str
) -> None:
    if endpoint == "refuses":
        token_url = f"http://127.0.0.1:{free_port()}"
    else:
        failing = TokenEndpoint()
        failing.failure = (400, '{"error": "invalid_client", "error_description": "LEAKY-detail"}')
        token_url = (await _token_endpoint(aiohttp_server, failing)).url
    upstream = await ScriptedUpstream(200).start(aiohttp_server)
    proxy = await start_proxy([loopback_policy(upstream.url, credentials=_oauth2(token_url, tmp_path / "s"))])

    reply = await app_request(proxy)

    error = assert_error(
        reply.status,
        reply.headers,
        reply.body,
        expected_status=502,
        error_type="credentials_unavailable",
        host=HOST,
    )
    assert f"{token_url}/oauth/token" in error["message"]
    assert "LEAKY" not in reply.body.decode()
    assert PLANTED_SECRET not in reply.body.decode()
    assert upstream.count == 0


async def test_planted_secret_and_token_appear_nowhere(
    receiver: OtlpReceiver,
    aiohttp_server: AiohttpServerFactory,
    start_proxy: StartProxy,
    access_log: AccessLog,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    issuer = TokenEndpoint(prefix="planted-token-9c1e")
    tokens = await _token_endpoint(aiohttp_server, issuer)
    upstream = await ScriptedUpstream(401, 200).start(aiohttp_server)  # a refresh: two tokens issued
    credentials = _oauth2(tokens.url, tmp_path / "secret", scope="read")
    proxy = await start_proxy([loopback_policy(upstream.url, credentials=credentials)], **traced(receiver))

    assert (await app_request(proxy)).status == 200
    assert (await app_request(proxy, path="/v1/other?token=x")).status == 200
    assert issuer.issued == ["planted-token-9c1e-1", "planted-token-9c1e-2"]

    fetches = await receiver.wait_for_spans(
        lambda spans: sum(1 for s in spans if "outrigger.credentials.token_fetch" in s.attributes) >= 2
    )
    fetch = next(s for s in fetches if "outrigger.credentials.token_fetch" in s.attributes)
    assert fetch.kind == SPAN_KIND_CLIENT
    assert fetch.name == "POST"
    assert fetch.attributes["url.full"] == f"{tokens.url}/oauth/token"

    state = await admin_state(proxy)
    assert state[HOST]["credentials"]["oauth2"]["token"] == "valid"
    shown = {
        "access log": "\n".join(access_log.raw),
        "spans": b"".join(receiver.raw_bodies).decode("latin-1"),
        "/config": (await call("GET", f"http://127.0.0.1:{proxy.admin_port}/config")).body.decode(),
        "/state": json.dumps(state),
        "explain": explain(proxy.config, "GET", f"http://{HOST}/v1/things"),
    }
    assert f"${{file:{tmp_path / 'secret'}}}" in shown["/config"]  # the reference is shown, not the secret
    for where, text in shown.items():
        assert PLANTED_SECRET not in text, where
        assert "planted-token-9c1e" not in text, where


async def test_a_429_on_key_a_moves_to_key_b_until_a_has_rested(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy, tmp_path: Path
) -> None:
    refused: list[str] = []

    async def provider(request: web.Request) -> web.Response:
        key = request.headers.get("X-Api-Key", "")
        if key == "key-A" and not refused:
            refused.append(key)
            return web.Response(status=429, headers={"Retry-After": "2"}, text="slow down")
        return web.Response(text=f"served by {key}")

    upstream = await ScriptedUpstream(provider).start(aiohttp_server)
    (tmp_path / "key-a").write_text("key-A\n")
    (tmp_path / "key-b").write_text("key-B\n")
    keys = {
        "header": "X-Api-Key",
        "format": "{key}",
        "values": [f"${{file:{tmp_path / 'key-a'}}}", f"${{file:{tmp_path / 'key-b'}}}"],
    }
    proxy = await start_proxy(
        [loopback_policy(upstream.url, credentials={"keys": keys}, retries={"on": [429]})]
    )

    started = time.monotonic()
    first = await app_request(proxy)
    assert first.status == 200
    assert first.body == b"served by key-B"
    assert first.headers["x-outrigger-attempts"] == "2"
    assert time.monotonic() - started < 1.0, "the retry with key B waited for key A's Retry-After"

    following = [(await app_request(proxy)).body for _ in range(4)]
    assert following == [b"served by key-B"] * 4

    state = (await admin_state(proxy))[HOST]["credentials"]["keys"]
    assert [(k["index"], k["state"]) for k in state] == [(0, "resting"), (1, "ready")]
    assert "key-A" not in json.dumps(state)
    metrics = (await call("GET", f"http://127.0.0.1:{proxy.admin_port}/metrics")).body.decode()
    assert f'outrigger_credential_keys{{host="{HOST}",state="resting"}} 1.0' in metrics
    assert f'outrigger_credential_keys{{host="{HOST}",state="ready"}} 1.0' in metrics

    async def a_is_back() -> bool:
        keys_state = (await admin_state(proxy))[HOST]["credentials"]["keys"]
        return bool(keys_state[0]["state"] == "ready")

    assert await wait_until(a_is_back, within=4)
    assert time.monotonic() - started >= 1.9
    later = {(await app_request(proxy)).body for _ in range(4)}
    assert later == {b"served by key-A", b"served by key-B"}


async def test_every_key_resting_is_429_rate_limited_with_the_earliest_retry_after(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream((429, {"Retry-After": "30"}, b"")).start(aiohttp_server)
    proxy = await start_proxy(
        [loopback_policy(upstream.url, credentials={"keys": {"values": ["k1", "k2"]}}, retries={"on": [429]})]
    )
    assert (await app_request(proxy)).status == 429  # both keys tried at once, both now rest
    assert upstream.count == 2

    reply = await app_request(proxy)
    assert_error(
        reply.status, reply.headers, reply.body, expected_status=429, error_type="rate_limited", host=HOST
    )
    assert 29 <= int(reply.headers["Retry-After"]) <= 30
    assert upstream.count == 2
    assert b"k1" not in reply.body
    assert b"k2" not in reply.body
