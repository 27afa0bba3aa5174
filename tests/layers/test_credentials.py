"""The credentials layers: what each attempt carries, the 401 re-send's limits, failover attempts,
and the key pool's verdict for the retry layer (``credential_key``, ``retry_at_once``)."""

from __future__ import annotations

from multidict import CIMultiDict

from proxy.config.model import KeyPoolSettings, OAuth2Settings, UpstreamTarget
from proxy.credentials import KeyPool, TokenSource
from proxy.exchange import FailoverState, ProxyRequest
from proxy.layers.credentials import KeyPoolLayer, OAuth2Layer
from tests.fakes import (
    AiohttpServerFactory,
    FakeClock,
    ScriptedUpstream,
    TokenEndpoint,
    fake_upstream,
    make_request,
)


async def _oauth2_layer(aiohttp_server: AiohttpServerFactory, replay_limit: int = 1024) -> OAuth2Layer:
    endpoint = await ScriptedUpstream(TokenEndpoint()).start(aiohttp_server)
    settings = OAuth2Settings(token_url=f"{endpoint.url}/token", client_id="c", client_secret="-")
    return OAuth2Layer(TokenSource("api.test", settings, "c", "s", FakeClock()), replay_limit)


async def test_a_401_to_a_body_too_large_to_keep_is_passed_on_and_the_token_dropped(
    aiohttp_server: AiohttpServerFactory,
) -> None:
    layer = await _oauth2_layer(aiohttp_server, replay_limit=4)
    upstream = fake_upstream(401, 200)
    request = make_request("POST", body=b"more than four bytes", chunk_size=5)

    response = await layer(request, upstream)

    assert response.status == 401
    assert upstream.calls == 1
    assert upstream.attempts[0].body == b"more than four bytes"  # streamed through, unharmed
    follow_up = make_request("GET")
    await layer(follow_up, upstream)
    assert upstream.attempts[1].headers["Authorization"] == "Bearer token-2"


async def test_a_small_body_is_kept_for_the_resend(aiohttp_server: AiohttpServerFactory) -> None:
    layer = await _oauth2_layer(aiohttp_server)
    upstream = fake_upstream(401, 200)
    response = await layer(make_request("POST", body=b"a=1", chunk_size=1), upstream)
    assert response.status == 200
    assert [a.body for a in upstream.attempts] == [b"a=1", b"a=1"]
    assert [a.headers["Authorization"] for a in upstream.attempts] == ["Bearer token-1", "Bearer token-2"]


def _to_failover_upstream(request: ProxyRequest) -> None:
    """As the failover layer leaves a request whose attempt goes to its first failover upstream."""
    primary = UpstreamTarget(scheme="http", host="api.test", port=80)
    request.failover = FailoverState(
        primary=primary, settings=request.settings, headers=CIMultiDict(), index=1
    )


async def test_attempts_to_a_failover_upstream_carry_no_pooled_key() -> None:
    settings = KeyPoolSettings(values=("k1", "k2"))
    layer = KeyPoolLayer(KeyPool("api.test", settings, ["k1", "k2"], FakeClock()), 0.5, 300.0)
    upstream = fake_upstream(200)
    request = make_request("GET")
    _to_failover_upstream(request)

    await layer(request, upstream)

    assert "Authorization" not in upstream.attempts[0].headers
    assert request.credential_key is None


async def test_the_key_layer_tells_the_retry_layer_whether_another_key_is_ready() -> None:
    clock = FakeClock()
    settings = KeyPoolSettings(values=("k1", "k2"))
    layer = KeyPoolLayer(KeyPool("api.test", settings, ["k1", "k2"], clock), 0.5, 300.0)
    upstream = fake_upstream((429, {"Retry-After": "5"}), (429, {"Retry-After": "5"}))
    request = make_request("GET")

    await layer(request, upstream)
    assert (request.credential_key, request.retry_at_once) == (0, True)
    assert upstream.attempts[0].headers["Authorization"] == "Bearer k1"

    request.retry_at_once = False
    await layer(request, upstream)
    assert (request.credential_key, request.retry_at_once) == (1, False)  # no key left to take over
    assert upstream.attempts[1].headers["Authorization"] == "Bearer k2"
