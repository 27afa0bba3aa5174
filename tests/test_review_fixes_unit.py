"""Regression tests for the review fixes of b7ca6f1, without sockets where the fix allows it.

Each test failed on the commit before the fixes. Names the fixes introduced are looked up on
their module inside the test (``exchange.buffered``, ``upstream._attempt_error``), so that on the
old code one test fails rather than the whole file failing to import.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from multidict import CIMultiDict
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from pydantic import ValidationError

from proxy import errors, exchange
from proxy.cli import main as cli_main
from proxy.clock import Clock
from proxy.config.loader import current_fingerprint, load_config
from proxy.config.model import Policy, PolicySettings, RateLimit, UpstreamTarget
from proxy.exchange import ProxyResponse
from proxy.layers.attempt import AttemptLayer
from proxy.layers.idempotency import IdempotencyLayer, ReplayCache
from proxy.layers.ratelimit import RateLimiter
from proxy.layers.retry import RetryLayer
from proxy.pipeline import Pipelines, PolicyState
from proxy.routing import Router
from proxy.transport import UpstreamClient
from tests.conftest import StartProxy, loopback_policy, write_config
from tests.fakes import FakeClock, TrackedBody, fake_upstream, make_request, read_body, settings_from

SECRET = "SECRET"


# --------------------------------------------------------------------------- 3. bodies released on failure


class BreakingBody:
    """A response body whose stream breaks off after its first chunk (like an upstream reset)."""

    def __init__(self, first: bytes = b"partial") -> None:
        self.first = first
        self.released = False

    async def chunks(self) -> AsyncIterator[bytes]:
        yield self.first
        raise errors.ConnectionReset("the upstream broke off the response body")

    def release(self) -> None:
        self.released = True


async def test_buffered_releases_the_body_when_reading_it_fails() -> None:
    body = BreakingBody()
    response = ProxyResponse(200, CIMultiDict({"Content-Length": "100"}), body)
    with pytest.raises(errors.ConnectionReset):
        await exchange.buffered(response, 1024)
    assert body.released


async def test_replay_capture_releases_the_body_when_reading_it_fails() -> None:
    settings = settings_from(idempotency={"replay": {"ttl": "1m"}})
    assert settings.idempotency is not None
    assert settings.idempotency.replay is not None
    layer = IdempotencyLayer(settings.idempotency, ReplayCache(settings.idempotency.replay, FakeClock()))
    body = BreakingBody()
    upstream_next = fake_upstream(ProxyResponse(201, CIMultiDict(), body))
    request = make_request("POST", headers={"Idempotency-Key": "k-1"}, body=b"a=1", settings=settings)
    with pytest.raises(errors.ConnectionReset):
        await layer(request, upstream_next)
    assert body.released, "a failed capture must still give the upstream connection back"


# --------------------------------------------------------------------------- 4. no URLs in error messages

URL_WITH_SECRET = "http://1.2.3.4:80/x?token=SECRET"


async def test_client_span_status_has_no_error_message(
    span_exporter: tuple[trace.Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = span_exporter
    request = make_request("GET", "/x?token=SECRET")
    layer = AttemptLayer(request.settings.headers, Path("."), tracer)
    failing = fake_upstream(
        errors.ConnectFailure(f"cannot connect: Connection timeout to host {URL_WITH_SECRET}")
    )
    with pytest.raises(errors.ConnectFailure):
        await layer(request, failing)
    (span,) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]
    assert span.status.status_code == StatusCode.ERROR
    assert not span.status.description
    assert span.attributes is not None
    assert span.attributes.get("error.type") == "connect-failure"


# --------------------------------------------------------------------------- 6. unknown hosts share no state


async def test_unknown_hosts_fallback_has_no_breaker_limiter_bulkhead_or_replay(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        [loopback_policy("http://127.0.0.1:9")],
        unknown_hosts="allow",
        defaults={
            "circuit_breaker": {"failure_threshold": 1},
            "concurrency": {"max_in_flight": 1},
            "rate_limit": {"rate": 10},
            "idempotency": {"replay": {"ttl": "1m"}},
            "retries": {"on": [503]},
        },
    )
    config = load_config(path)
    router = Router(config)
    assert router.fallback is not None
    client = UpstreamClient()
    try:
        pipelines = Pipelines(config, router, client, trace.NoOpTracer())
    finally:
        await client.close()
    fallback = pipelines.states[router.fallback.name]
    assert fallback.breaker is None
    assert fallback.limiter is None
    assert fallback.bulkhead is None
    assert fallback.replay is None
    assert fallback.budget is not None, "the retry budget stays shared"
    known = pipelines.states["upstream.test"]
    assert known.breaker is not None
    assert known.limiter is not None
    assert known.bulkhead is not None


# --------------------------------------------------------------------------- 7. TLS files watched


def _tls_config(tmp_path: Path) -> tuple[Path, Path]:
    ca_file = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    policy = loopback_policy("https://127.0.0.1:9", tls={"ca_file": str(ca_file)})
    return write_config(tmp_path, [policy]), ca_file


def test_tls_ca_file_is_watched_and_versions_the_config(tmp_path: Path) -> None:
    path, ca_file = _tls_config(tmp_path)
    config = load_config(path)
    assert ca_file.resolve() in {f.resolve() for f in config.files}
    trustme.CA().cert_pem.write_to_path(str(ca_file))  # a rotated CA
    assert current_fingerprint(config) != config.version
    assert load_config(path).version != config.version


async def test_apply_forgets_cached_tls_contexts(tmp_path: Path, start_proxy: StartProxy) -> None:
    _, ca_file = _tls_config(tmp_path)
    proxy = await start_proxy([loopback_policy("https://127.0.0.1:9", tls={"ca_file": str(ca_file)})])
    tls = proxy.config.policies[0].settings.tls
    assert tls.ca_file is not None
    before = proxy.server.upstream._ssl_context(tls)
    assert proxy.server.upstream._ssl_context(tls) is before, "cached between reloads"
    await proxy.server.apply(load_config(proxy.config.path))
    assert proxy.server.upstream._ssl_context(tls) is not before, "a reload re-reads the TLS files"


# --------------------------------------------------------------------------- 8. rate_limit.max_pause


def test_max_pause_is_a_config_key_defaulting_to_five_minutes() -> None:
    assert RateLimit().max_pause == 300.0
    settings = settings_from(rate_limit={"max_pause": "10s"})
    assert settings.rate_limit is not None
    assert settings.rate_limit.max_pause == 10.0
    with pytest.raises(ValidationError):
        settings_from(rate_limit={"max_pause": "0s"})


def test_retry_after_a_day_pauses_at_most_max_pause() -> None:
    clock = FakeClock()
    limiter = RateLimiter("api.test", RateLimit(), clock)
    limiter.observe(CIMultiDict({"Retry-After": "86400"}), 429)
    assert 0 < limiter.pause_remaining() <= 300.0
    clock.advance(300.0)
    assert limiter.pause_remaining() == 0.0


def test_explicit_max_pause_caps_the_pause() -> None:
    settings = settings_from(rate_limit={"max_pause": "10s"})
    assert settings.rate_limit is not None
    limiter = RateLimiter("api.test", settings.rate_limit, FakeClock())
    limiter.observe(CIMultiDict({"Retry-After": "86400"}), 429)
    assert limiter.pause_remaining() == pytest.approx(10.0)


# --------------------------------------------------------------------------- 11. settle before backoff


class OrderClock(FakeClock):
    """A FakeClock that notes, at each sleep, whether the discarded response was already released."""

    def __init__(self, body: TrackedBody) -> None:
        super().__init__()
        self.body = body
        self.released_at_sleep: list[bool] = []

    async def sleep(self, seconds: float) -> None:
        self.released_at_sleep.append(self.body.released)
        await super().sleep(seconds)


async def test_retry_releases_a_small_discarded_response_before_the_backoff() -> None:
    first = TrackedBody(b"busy, come back later")
    clock = OrderClock(first)
    clock_as_protocol: Clock = clock
    settings = settings_from(retries={"on": [503]})
    assert settings.retries is not None
    layer = RetryLayer(settings.retries, settings.idempotency_header, None, clock_as_protocol)
    upstream_next = fake_upstream(
        ProxyResponse(503, CIMultiDict({"Retry-After": "1", "Content-Length": "21"}), first), 200
    )
    response = await layer(make_request("GET"), upstream_next)
    assert response.status == 200
    assert clock.sleeps == [1.0]
    assert clock.released_at_sleep == [True], "the 503's connection must be freed before sleeping"


async def test_settled_response_is_returned_when_the_retry_is_refused() -> None:
    """Settling reads the body early: that copy is what the app gets when the retry is refused."""
    first = TrackedBody(b"busy, come back later")
    clock = OrderClock(first)
    settings = settings_from(retries={"on": [503]})
    assert settings.retries is not None
    layer = RetryLayer(settings.retries, settings.idempotency_header, None, clock)
    refused = errors.CircuitOpen("circuit breaker for api.test is open")
    upstream_next = fake_upstream(ProxyResponse(503, CIMultiDict({"Retry-After": "1"}), first), refused)
    response = await layer(make_request("GET"), upstream_next)
    assert clock.released_at_sleep == [True]
    assert response.status == 503
    assert await read_body(response) == b"busy, come back later"


# --------------------------------------------------------------------------- 12. breaker carry-over


def _policy(upstream_url: str, **settings: Any) -> Policy:
    scheme, _, rest = upstream_url.partition("://")
    host, _, port = rest.partition(":")
    assert scheme in ("http", "https")
    return Policy(
        hosts=("api.test",),
        upstream=UpstreamTarget(scheme="https" if scheme == "https" else "http", host=host, port=int(port)),
        listen=None,
        settings=PolicySettings.model_validate(settings),
        routes=(),
        source="test:1",
    )


def test_breaker_carries_over_only_while_upstream_and_tls_are_unchanged() -> None:
    clock = FakeClock()
    breaker = {"failure_threshold": 3}
    first = _policy("https://a.test:443", circuit_breaker=breaker)
    state = PolicyState.build(first, clock)
    assert state.breaker is not None

    same = PolicyState.build(_policy("https://a.test:443", circuit_breaker=breaker), clock, (first, state))
    assert same.breaker is state.breaker

    moved = PolicyState.build(_policy("https://b.test:443", circuit_breaker=breaker), clock, (first, state))
    assert moved.breaker is not None
    assert moved.breaker is not state.breaker

    new_tls = _policy("https://a.test:443", circuit_breaker=breaker, tls={"sni": "other.test"})
    retls = PolicyState.build(new_tls, clock, (first, state))
    assert retls.breaker is not None
    assert retls.breaker is not state.breaker


# --------------------------------------------------------------------------- 13. explain redacts


def test_explain_redacts_query_values_and_user_info(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, [loopback_policy("http://127.0.0.1:9")])
    code = cli_main(["explain", "-c", str(path), "GET", "http://user:pw@upstream.test/v1/x?token=abc&n=1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = yaml.safe_load(out)
    line = report["request"]
    assert "user" not in line
    assert "pw@" not in line
    assert "abc" not in line
    assert "token=REDACTED" in line, "the query names stay"
    assert "n=REDACTED" in line
    assert line.startswith("GET http://upstream.test/v1/x?")
    assert "user:pw" not in out
    assert "token=abc" not in out
