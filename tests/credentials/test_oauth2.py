"""TokenSource against a real token endpoint on loopback: one shared fetch, background refresh,
client authentication, failures without echo, retries, 401 invalidation, its CLIENT span.

Token lifetimes run on a FakeClock (instant, exact); the endpoint's own delay is real and short.
"""

from __future__ import annotations

import asyncio
import base64
import time
from urllib.parse import parse_qsl

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from proxy import errors
from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.config import defaults
from proxy.config.model import OAuth2Settings
from proxy.credentials import SpanParent, TokenSource
from proxy.credentials.oauth2 import ATTR_TOKEN_FETCH
from tests.conftest import free_port
from tests.e2e.procs import wait_until
from tests.fakes import AiohttpServerFactory, FakeClock, ScriptedUpstream, Step, TokenEndpoint

SECRET = "s3cr3t/with:odd chars"
NO_SPAN = SpanParent()


def _source(url: str, clock: Clock, **settings: object) -> TokenSource:
    oauth2 = OAuth2Settings.model_validate(
        {"token_url": f"{url}/oauth/token", "client_id": "client-1", "client_secret": "-", **settings}
    )
    return TokenSource("api.test", oauth2, "client-1", SECRET, clock, uniform=lambda lo, hi: 0.0)


async def _endpoint(aiohttp_server: AiohttpServerFactory, *steps: Step) -> ScriptedUpstream:
    return await ScriptedUpstream(*steps).start(aiohttp_server)


async def test_concurrent_first_requests_share_one_fetch(aiohttp_server: AiohttpServerFactory) -> None:
    issuer = TokenEndpoint(delay=0.2)
    endpoint = await _endpoint(aiohttp_server, issuer)
    source = _source(endpoint.url, FakeClock())

    tokens = await asyncio.gather(*(source.token(NO_SPAN) for _ in range(200)))

    assert set(tokens) == {"token-1"}
    assert endpoint.count == 1
    assert await source.token(NO_SPAN) == "token-1"  # cached
    assert endpoint.count == 1


async def test_token_is_refreshed_in_the_background_while_the_old_one_serves(
    aiohttp_server: AiohttpServerFactory,
) -> None:
    issuer = TokenEndpoint(expires_in=120, delay=0.3)
    endpoint = await _endpoint(aiohttp_server, issuer)
    clock = FakeClock()
    source = _source(endpoint.url, clock, refresh_before="60s")
    assert await source.token(NO_SPAN) == "token-1"

    clock.advance(59)  # not yet due
    assert await source.token(NO_SPAN) == "token-1"
    assert endpoint.count == 1

    clock.advance(2)  # inside refresh_before: due, still valid
    started = time.monotonic()
    during = await asyncio.gather(*(source.token(NO_SPAN) for _ in range(50)))
    waited = time.monotonic() - started
    assert set(during) == {"token-1"}
    assert waited < 0.2, f"requests waited {waited:.3f}s for a refresh (endpoint takes 0.3s)"
    assert source.snapshot()["refreshing"] is True

    assert await wait_until(lambda: len(issuer.issued) == 2, within=5)
    assert await wait_until(lambda: source.snapshot()["refreshing"] is False, within=5)
    assert await source.token(NO_SPAN) == "token-2"
    assert endpoint.count == 2  # one refresh for all 50


async def test_an_expired_token_is_not_sent_requests_wait_for_the_new_one(
    aiohttp_server: AiohttpServerFactory,
) -> None:
    endpoint = await _endpoint(aiohttp_server, TokenEndpoint(expires_in=100))
    clock = FakeClock()
    source = _source(endpoint.url, clock, refresh_before="10s")
    assert await source.token(NO_SPAN) == "token-1"
    clock.advance(100)
    assert await source.token(NO_SPAN) == "token-2"


async def test_token_without_expires_in_lives_the_default_lifetime(
    aiohttp_server: AiohttpServerFactory,
) -> None:
    endpoint = await _endpoint(aiohttp_server, TokenEndpoint(expires_in=None))
    clock = FakeClock()
    source = _source(endpoint.url, clock, refresh_before="0s")
    assert await source.token(NO_SPAN) == "token-1"
    assert source.snapshot()["expires_in_seconds"] == defaults.OAUTH2_DEFAULT_LIFETIME_S


async def test_basic_auth_sends_the_form_encoded_client_pair(aiohttp_server: AiohttpServerFactory) -> None:
    endpoint = await _endpoint(aiohttp_server, TokenEndpoint())
    source = _source(endpoint.url, FakeClock(), scope="payments:write read", audience="https://api.test")
    await source.token(NO_SPAN)

    seen = endpoint.seen[0]
    assert seen.method == "POST"
    assert seen.path_qs == "/oauth/token"
    scheme, _, encoded = (seen.headers.get("Authorization") or "").partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(encoded).decode() == "client-1:s3cr3t%2Fwith%3Aodd%20chars"  # RFC 6749 2.3.1
    assert seen.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert dict(parse_qsl(seen.body.decode())) == {
        "grant_type": "client_credentials",
        "scope": "payments:write read",
        "audience": "https://api.test",
    }


async def test_body_auth_sends_the_client_in_form_fields(aiohttp_server: AiohttpServerFactory) -> None:
    endpoint = await _endpoint(aiohttp_server, TokenEndpoint())
    source = _source(endpoint.url, FakeClock(), auth="body")
    await source.token(NO_SPAN)

    seen = endpoint.seen[0]
    assert "Authorization" not in seen.headers
    assert dict(parse_qsl(seen.body.decode())) == {
        "grant_type": "client_credentials",
        "client_id": "client-1",
        "client_secret": SECRET,
    }


@pytest.mark.parametrize(
    ("step", "named"),
    [
        (
            (400, {}, b'{"error": "invalid_client", "error_description": "LEAKY detail"}'),
            "error invalid_client",
        ),
        ((401, {}, b'{"error": "x-vendor-LEAKY"}'), "an error response"),
        ((200, {}, b"<html>LEAKY login page</html>"), "no access_token"),
        ((200, {"Content-Type": "application/json"}, b'["LEAKY"]'), "malformed"),
        ((200, {}, b'{"access_token": "", "token_type": "Bearer"}'), "malformed access_token"),
        ((200, {}, b'{"access_token": "LEAKY", "expires_in": "soon"}'), "malformed"),
        ((403, {}, b'{"access_token": "LEAKY"}'), "not status 200"),
    ],
)
async def test_a_bad_token_response_is_credentials_unavailable_without_its_body(
    aiohttp_server: AiohttpServerFactory, step: Step, named: str
) -> None:
    endpoint = await _endpoint(aiohttp_server, step)
    source = _source(endpoint.url, FakeClock())

    with pytest.raises(errors.CredentialsUnavailable) as raised:
        await source.token(NO_SPAN)

    message = raised.value.message
    assert named in message
    assert f"{endpoint.url}/oauth/token" in message
    assert "LEAKY" not in message
    assert "LEAKY" not in str(source.snapshot())
    assert endpoint.count == 1  # a 4xx or a malformed answer is not tried again
    assert raised.value.status == 502
    assert raised.value.error_type == "credentials_unavailable"


async def test_5xx_is_tried_again_then_gives_up(aiohttp_server: AiohttpServerFactory) -> None:
    endpoint = await _endpoint(aiohttp_server, 503)
    clock = FakeClock()
    source = _source(endpoint.url, clock)

    with pytest.raises(errors.CredentialsUnavailable, match="failed 3 times"):
        await source.token(NO_SPAN)
    assert endpoint.count == defaults.OAUTH2_ATTEMPTS
    assert source.snapshot()["last_error"] is not None


async def test_a_retry_after_a_5xx_can_succeed(aiohttp_server: AiohttpServerFactory) -> None:
    endpoint = await _endpoint(aiohttp_server, 502, TokenEndpoint())
    source = _source(endpoint.url, FakeClock())
    assert await source.token(NO_SPAN) == "token-1"
    assert endpoint.count == 2


async def test_an_endpoint_that_is_down_is_credentials_unavailable() -> None:
    source = _source(f"http://127.0.0.1:{free_port()}", SYSTEM_CLOCK)
    with pytest.raises(errors.CredentialsUnavailable, match="cannot connect"):
        await source.token(NO_SPAN)


async def test_after_a_failure_the_next_request_fetches_again(aiohttp_server: AiohttpServerFactory) -> None:
    issuer = TokenEndpoint()
    issuer.failure = (400, '{"error": "invalid_client"}')
    endpoint = await _endpoint(aiohttp_server, issuer)
    source = _source(endpoint.url, FakeClock())
    with pytest.raises(errors.CredentialsUnavailable):
        await source.token(NO_SPAN)
    issuer.failure = None
    assert await source.token(NO_SPAN) == "token-1"


async def test_a_failed_background_refresh_keeps_the_old_token_and_backs_off(
    aiohttp_server: AiohttpServerFactory,
) -> None:
    issuer = TokenEndpoint(expires_in=120)
    endpoint = await _endpoint(aiohttp_server, issuer)
    clock = FakeClock()
    source = _source(endpoint.url, clock, refresh_before="60s")
    await source.token(NO_SPAN)
    issuer.failure = (400, '{"error": "invalid_grant"}')
    clock.advance(70)

    assert await source.token(NO_SPAN) == "token-1"
    assert await wait_until(lambda: source.snapshot()["last_error"] is not None, within=5)
    calls = endpoint.count
    assert await source.token(NO_SPAN) == "token-1"  # no new refresh right away
    assert endpoint.count == calls
    clock.advance(defaults.OAUTH2_REFRESH_RETRY_S)
    issuer.failure = None
    assert await source.token(NO_SPAN) == "token-1"
    assert await wait_until(lambda: len(issuer.issued) == 2, within=5)


async def test_a_rejected_token_is_replaced_but_a_newer_one_is_kept(
    aiohttp_server: AiohttpServerFactory,
) -> None:
    endpoint = await _endpoint(aiohttp_server, TokenEndpoint())
    source = _source(endpoint.url, FakeClock())
    assert await source.token(NO_SPAN) == "token-1"
    source.rejected("token-1")
    assert await source.token(NO_SPAN) == "token-2"
    source.rejected("token-1")  # a late 401 for the old token
    assert await source.token(NO_SPAN) == "token-2"
    assert endpoint.count == 2


async def test_each_call_has_a_client_span_without_secret_or_token(
    aiohttp_server: AiohttpServerFactory, span_exporter: tuple[trace.Tracer, InMemorySpanExporter]
) -> None:
    tracer, exporter = span_exporter
    endpoint = await _endpoint(aiohttp_server, 503, TokenEndpoint())
    source = _source(endpoint.url, FakeClock())
    await source.token(SpanParent(tracer, None))

    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["POST", "POST"]
    assert all(s.kind == SpanKind.CLIENT for s in spans)
    first, second = (dict(s.attributes or {}) for s in spans)
    assert first["url.full"] == f"{endpoint.url}/oauth/token"
    assert first[ATTR_TOKEN_FETCH] == "first"
    assert first["http.response.status_code"] == 503
    assert first["error.type"] == "token_endpoint_failed"
    assert second["http.request.resend_count"] == 1
    assert second["http.response.status_code"] == 200
    text = repr([s.to_json() for s in spans])
    assert "token-1" not in text
    assert "s3cr3t" not in text
