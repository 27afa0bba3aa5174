"""Traces end to end: a real Outrigger exporting over OTLP/HTTP to a real local collector.

Every test here decodes what actually reached `OtlpReceiver` (protobuf
``ExportTraceServiceRequest``), so span kinds, parent/child links, trace-id
continuation from the app's ``traceparent``, per-attempt context injection
and the SPEC 8 attributes and events are proven on the wire, not in memory.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from typing import Any

import aiohttp
import pytest

from tests.conftest import AccessLog, RunningProxy, StartProxy, free_port, loopback_policy
from tests.e2e.otlp_receiver import STATUS_CODE_ERROR, ExportedSpan, OtlpReceiver
from tests.fakes import AiohttpServerFactory, Gate, Reply, ScriptedUpstream, body_in_two_parts, call

HOST = "upstream.test"
FAST_BACKOFF = {"base": "10ms", "max": "10ms"}


@pytest.fixture(autouse=True)
def _fast_export(monkeypatch: pytest.MonkeyPatch) -> None:
    """Export batches every 50 ms (standard SDK variable), and start from a clean OTel environment."""
    for name in (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_SERVICE_NAME",
        "OTEL_RESOURCE_ATTRIBUTES",
        "OTEL_TRACES_SAMPLER",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")


def traced(receiver: OtlpReceiver, **extra: Any) -> dict[str, Any]:
    """Main-config overrides that export to `receiver`."""
    telemetry: dict[str, Any] = {"traces": {"endpoint": receiver.endpoint}, **extra}
    return {"telemetry": telemetry}


def new_traceparent() -> tuple[str, str, str]:
    """(traceparent, trace id, span id) of a sampled span of the app."""
    trace_id = secrets.token_hex(16)
    span_id = secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def parse_traceparent(value: str | None) -> tuple[str, str, str]:
    """(trace id, parent span id, flags) of a W3C traceparent header."""
    assert value is not None, "no traceparent was sent upstream"
    version, trace_id, span_id, flags = value.split("-")
    assert version == "00"
    assert len(trace_id) == 32
    assert len(span_id) == 16
    return trace_id, span_id, flags


async def app_get(proxy: RunningProxy, path: str = "/v1/things", **headers: str) -> Reply:
    return await call("GET", f"{proxy.url}{path}", headers={"Host": HOST, **headers})


async def trace_of(
    receiver: OtlpReceiver, trace_id: str, clients: int
) -> tuple[ExportedSpan, list[ExportedSpan]]:
    """The one SERVER span of `trace_id` and its CLIENT spans in start order, once all arrived."""

    def complete(spans: list[ExportedSpan]) -> bool:
        mine = [s for s in spans if s.trace_id == trace_id]
        return sum(s.is_server for s in mine) >= 1 and sum(s.is_client for s in mine) >= clients

    await receiver.wait_for_spans(complete)
    await asyncio.sleep(0.2)  # let any unexpected extra span of this trace arrive too
    spans = receiver.in_trace(trace_id)
    servers = [s for s in spans if s.is_server]
    assert len(servers) == 1, f"expected one SERVER span, got {servers}"
    children = sorted((s for s in spans if s.is_client), key=lambda s: s.start_ns)
    assert len(children) == clients, children
    assert len(spans) == 1 + clients, spans
    return servers[0], children


async def server_span_with(receiver: OtlpReceiver, request_id: str) -> ExportedSpan:
    """The SERVER span carrying `request_id` (for requests sent without a traceparent)."""

    def found(spans: list[ExportedSpan]) -> bool:
        return any(_request_id(s) == request_id for s in spans if s.is_server)

    spans = await receiver.wait_for_spans(found)
    return next(s for s in spans if s.is_server and _request_id(s) == request_id)


def _request_id(span: ExportedSpan) -> str | None:
    value = span.attributes.get("http.request.header.x-request-id")
    return value[0] if isinstance(value, list) and value else None


# --------------------------------------------------------------------------- structure


async def test_one_server_span_and_one_client_child_per_request(
    receiver: OtlpReceiver, aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(200).start(aiohttp_server)
    proxy = await start_proxy([loopback_policy(upstream.url)], **traced(receiver))
    traceparent, trace_id, app_span = new_traceparent()

    reply = await app_get(proxy, traceparent=traceparent)

    assert reply.status == 200
    server, (client,) = await trace_of(receiver, trace_id, clients=1)
    assert server.name == "GET"
    assert server.parent_span_id == app_span
    assert client.parent_span_id == server.span_id
    assert client.span_id not in (server.span_id, app_span)
    assert client.attributes["http.request.method"] == "GET"
    assert client.attributes["server.address"] == "127.0.0.1"
    assert upstream.server is not None
    assert client.attributes["server.port"] == upstream.server.port
    assert client.attributes["url.full"] == f"{upstream.url}/v1/things"
    assert client.attributes["http.response.status_code"] == 200
    assert "http.request.resend_count" not in client.attributes
    # the CLIENT span lies within its SERVER span
    assert server.start_ns <= client.start_ns <= client.end_ns <= server.end_ns


async def test_request_retried_twice_has_three_client_spans_with_retry_attributes(
    receiver: OtlpReceiver, aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(503, 503, 200).start(aiohttp_server)
    proxy = await start_proxy(
        [loopback_policy(upstream.url, retries={"on": [503], "backoff": FAST_BACKOFF})], **traced(receiver)
    )
    traceparent, trace_id, app_span = new_traceparent()

    reply = await app_get(proxy, "/v1/things?token=s3cr3t-value&page=2", traceparent=traceparent)

    assert reply.status == 200
    assert reply.headers["x-outrigger-attempts"] == "3"
    server, clients = await trace_of(receiver, trace_id, clients=3)

    # the app's trace is continued
    assert server.trace_id == trace_id
    assert server.parent_span_id == app_span
    assert all(c.parent_span_id == server.span_id for c in clients)
    assert len({c.span_id for c in clients}) == 3

    first, second, third = clients
    assert "http.request.resend_count" not in first.attributes
    assert "outrigger.retry.reason" not in first.attributes
    assert "outrigger.retry.backoff_ms" not in first.attributes
    assert second.attributes["http.request.resend_count"] == 1
    assert third.attributes["http.request.resend_count"] == 2
    backoffs = []
    for retry in (second, third):
        assert retry.attributes["outrigger.retry.reason"] == "503"
        backoff = retry.attributes["outrigger.retry.backoff_ms"]
        assert isinstance(backoff, float)
        assert 0.0 <= backoff <= 10.0  # full jitter under base = max = 10ms
        backoffs.append(backoff)
    assert [c.attributes["http.response.status_code"] for c in clients] == [503, 503, 200]
    assert first.attributes["error.type"] == "503"
    assert first.status_code == STATUS_CODE_ERROR
    assert "error.type" not in third.attributes

    attrs = server.attributes
    assert attrs["outrigger.attempts"] == 3
    assert attrs["outrigger.retry.reason"] == ["503", "503"]
    assert attrs["outrigger.retry.backoff_ms"] == backoffs
    assert attrs["outrigger.policy"] == HOST
    assert attrs["outrigger.config.version"] == proxy.config.version
    assert attrs["http.response.status_code"] == 200
    assert attrs["http.request.method"] == "GET"
    assert attrs["url.full"] == f"http://{HOST}/v1/things?token=REDACTED&page=REDACTED"
    assert attrs["server.address"] == HOST
    assert "error.type" not in attrs
    for client in clients:
        assert client.attributes["url.full"] == f"{upstream.url}/v1/things?token=REDACTED&page=REDACTED"
    # the query value reached the upstream, but no span kept it
    assert upstream.seen[0].path_qs == "/v1/things?token=s3cr3t-value&page=2"
    assert not any(b"s3cr3t-value" in body for body in receiver.raw_bodies)


async def test_each_attempt_injects_its_own_span_context_upstream(
    receiver: OtlpReceiver, aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(503, 503, 200).start(aiohttp_server)
    proxy = await start_proxy(
        [loopback_policy(upstream.url, retries={"on": [503], "backoff": FAST_BACKOFF})], **traced(receiver)
    )
    traceparent, trace_id, app_span = new_traceparent()

    reply = await app_get(proxy, traceparent=traceparent, tracestate="vendor=opaque-1")

    assert reply.status == 200
    _server, clients = await trace_of(receiver, trace_id, clients=3)
    assert upstream.count == 3
    assert [seen.headers.get("tracestate") for seen in upstream.seen] == ["vendor=opaque-1"] * 3
    sent = [parse_traceparent(seen.headers.get("traceparent")) for seen in upstream.seen]
    assert [trace for trace, _, _ in sent] == [trace_id] * 3
    assert [parent for _, parent, _ in sent] == [c.span_id for c in clients]
    assert app_span not in [parent for _, parent, _ in sent], "the app's traceparent was forwarded as is"
    assert all(int(flags, 16) & 0x01 for _, _, flags in sent), "sampled flag lost"
    assert all(len(seen.headers.getall("traceparent")) == 1 for seen in upstream.seen)


async def test_spans_last_until_the_response_body_is_sent(
    receiver: OtlpReceiver, aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(body_in_two_parts(b"first ", b"second", pause=0.3)).start(
        aiohttp_server
    )
    proxy = await start_proxy([loopback_policy(upstream.url)], **traced(receiver))
    traceparent, trace_id, _ = new_traceparent()

    reply = await app_get(proxy, traceparent=traceparent)

    assert reply.body == b"first second"
    server, (client,) = await trace_of(receiver, trace_id, clients=1)
    assert client.end_ns - client.start_ns >= 250_000_000  # the CLIENT span covers the body too
    assert server.end_ns - server.start_ns >= 250_000_000
    assert client.end_ns <= server.end_ns


async def test_request_without_traceparent_starts_a_new_trace(
    receiver: OtlpReceiver, aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(200).start(aiohttp_server)
    proxy = await start_proxy([loopback_policy(upstream.url)], **traced(receiver))
    request_id = str(uuid.uuid4())

    reply = await app_get(proxy, **{"x-request-id": request_id})

    assert reply.status == 200
    server = await server_span_with(receiver, request_id)
    assert server.parent_span_id is None
    trace_id, parent, _ = parse_traceparent(upstream.seen[0].headers.get("traceparent"))
    assert trace_id == server.trace_id
    spans = await receiver.wait_for_spans(lambda got: any(s.is_client and s.span_id == parent for s in got))
    client = next(s for s in spans if s.span_id == parent)
    assert client.parent_span_id == server.span_id


async def test_request_id_is_on_the_server_span(
    receiver: OtlpReceiver, aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(200).start(aiohttp_server)
    proxy = await start_proxy([loopback_policy(upstream.url)], **traced(receiver))
    traceparent, trace_id, _ = new_traceparent()

    sent = await app_get(proxy, traceparent=traceparent, **{"x-request-id": "app-req-7"})
    server, _ = await trace_of(receiver, trace_id, clients=1)
    assert sent.headers["x-request-id"] == "app-req-7"
    assert server.attributes["http.request.header.x-request-id"] == ["app-req-7"]

    traceparent, trace_id, _ = new_traceparent()
    generated = await app_get(proxy, traceparent=traceparent)
    server, _ = await trace_of(receiver, trace_id, clients=1)
    request_id = generated.headers["x-request-id"]
    assert uuid.UUID(request_id).version == 4
    assert server.attributes["http.request.header.x-request-id"] == [request_id]


async def test_locally_refused_request_has_a_server_span_and_no_client_span(
    receiver: OtlpReceiver, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy([loopback_policy("http://127.0.0.1:9")], **traced(receiver))
    traceparent, trace_id, app_span = new_traceparent()

    reply = await call(
        "GET", f"{proxy.url}/x?key=abc", headers={"Host": "not-allowed.test", "traceparent": traceparent}
    )

    assert reply.status == 403
    server, _ = await trace_of(receiver, trace_id, clients=0)
    assert server.parent_span_id == app_span
    assert server.attributes["http.response.status_code"] == 403
    assert server.attributes["error.type"] == "host_not_allowed"
    assert "host_not_allowed" in server.event_names
    assert "outrigger.policy" not in server.attributes
    assert server.attributes["url.full"] == "http://not-allowed.test/x?key=REDACTED"
    assert server.attributes["http.request.header.x-request-id"] == [reply.headers["x-request-id"]]


async def test_connect_failure_attempt_span_records_the_error(
    receiver: OtlpReceiver, start_proxy: StartProxy
) -> None:
    closed = free_port()
    proxy = await start_proxy(
        [
            loopback_policy(
                f"http://127.0.0.1:{closed}", retries={"on": ["connect-failure"], "backoff": FAST_BACKOFF}
            )
        ],
        **traced(receiver),
    )
    traceparent, trace_id, _ = new_traceparent()

    reply = await app_get(proxy, traceparent=traceparent)

    assert reply.status == 502
    server, clients = await trace_of(receiver, trace_id, clients=3)
    for client in clients:
        assert client.attributes["error.type"] == "connect-failure"
        assert client.status_code == STATUS_CODE_ERROR
        assert "http.response.status_code" not in client.attributes
    assert clients[1].attributes["outrigger.retry.reason"] == "connect-failure"
    assert server.attributes["error.type"] == "upstream_unreachable"
    assert server.attributes["outrigger.retry.reason"] == ["connect-failure", "connect-failure"]
    assert server.status_code == STATUS_CODE_ERROR


async def test_server_span_splits_host_and_port(
    receiver: OtlpReceiver, aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(200).start(aiohttp_server)
    proxy = await start_proxy([loopback_policy(upstream.url, host=f"{HOST}:8080")], **traced(receiver))
    traceparent, trace_id, _ = new_traceparent()

    reply = await app_get(proxy, traceparent=traceparent, Host=f"{HOST}:8080")

    assert reply.status == 200
    server, _ = await trace_of(receiver, trace_id, clients=1)
    assert server.attributes["server.address"] == HOST
    assert server.attributes["server.port"] == 8080


async def test_absolute_form_request_has_a_well_formed_url_full(
    receiver: OtlpReceiver, aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(200).start(aiohttp_server)
    proxy = await start_proxy([loopback_policy(upstream.url)], **traced(receiver))
    traceparent, trace_id, _ = new_traceparent()

    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client,
        client.get(
            f"http://{HOST}/v1/abs?token=abc", proxy=proxy.url, headers={"traceparent": traceparent}
        ) as response,
    ):
        assert response.status == 200

    server, _ = await trace_of(receiver, trace_id, clients=1)
    assert server.attributes["url.full"] == f"http://{HOST}/v1/abs?token=REDACTED"
    assert server.attributes["server.address"] == HOST


# ------------------------------------------------------------------------ outrigger.* attributes and events


async def test_idempotency_key_attributes(
    receiver: OtlpReceiver, aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(201).start(aiohttp_server)
    proxy = await start_proxy([loopback_policy(upstream.url, idempotency={})], **traced(receiver))

    traceparent, injected_trace, _ = new_traceparent()
    reply = await call(
        "POST", f"{proxy.url}/v1/charges", data=b"a=1", headers={"Host": HOST, "traceparent": traceparent}
    )
    assert reply.status == 201
    server, _ = await trace_of(receiver, injected_trace, clients=1)
    injected_key = upstream.seen[0].headers["Idempotency-Key"]
    assert uuid.UUID(injected_key).version == 4
    assert server.attributes["outrigger.idempotency.key"] == injected_key
    assert server.attributes["outrigger.idempotency.injected"] is True

    traceparent, app_trace, _ = new_traceparent()
    reply = await call(
        "POST",
        f"{proxy.url}/v1/charges",
        data=b"a=2",
        headers={"Host": HOST, "traceparent": traceparent, "Idempotency-Key": "app-key-42"},
    )
    assert reply.status == 201
    server, _ = await trace_of(receiver, app_trace, clients=1)
    assert server.attributes["outrigger.idempotency.key"] == "app-key-42"
    assert server.attributes["outrigger.idempotency.injected"] is False

    traceparent, get_trace, _ = new_traceparent()
    await app_get(proxy, traceparent=traceparent)
    server, _ = await trace_of(receiver, get_trace, clients=1)
    assert "outrigger.idempotency.key" not in server.attributes


async def test_breaker_state_attribute_and_circuit_open_event(
    receiver: OtlpReceiver, aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(200, 503).start(aiohttp_server)
    proxy = await start_proxy(
        [loopback_policy(upstream.url, circuit_breaker={"failure_threshold": 2, "reset_timeout": "30s"})],
        **traced(receiver),
    )
    states = []
    for expected in (200, 503, 503):
        traceparent, trace_id, _ = new_traceparent()
        assert (await app_get(proxy, traceparent=traceparent)).status == expected
        server, _ = await trace_of(receiver, trace_id, clients=1)
        states.append(server.attributes["outrigger.breaker.state"])
        assert "circuit_open" not in server.event_names
    assert states == ["closed", "closed", "open"]

    traceparent, trace_id, _ = new_traceparent()
    refused = await app_get(proxy, traceparent=traceparent)
    assert refused.status == 503
    assert refused.headers["x-outrigger-error"] == "circuit_open"
    server, _ = await trace_of(receiver, trace_id, clients=0)
    assert server.attributes["outrigger.breaker.state"] == "open"
    assert "circuit_open" in server.event_names
    assert server.attributes["error.type"] == "circuit_open"
    assert server.attributes["outrigger.attempts"] == 0
    assert upstream.count == 3


async def test_retry_budget_exhausted_event(
    receiver: OtlpReceiver, aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(503, 200).start(aiohttp_server)
    budget = {"ratio": 0.0, "min_per_second": 0.0, "window": "10s"}
    proxy = await start_proxy(
        [loopback_policy(upstream.url, retries={"on": [503], "backoff": FAST_BACKOFF, "budget": budget})],
        **traced(receiver),
    )
    traceparent, trace_id, _ = new_traceparent()

    reply = await app_get(proxy, traceparent=traceparent)

    assert reply.status == 503  # the upstream's answer: the budget refused the retry
    server, _ = await trace_of(receiver, trace_id, clients=1)
    assert "retry_budget_exhausted" in server.event_names
    assert server.attributes["outrigger.attempts"] == 1
    assert "outrigger.retry.reason" not in server.attributes


async def test_rate_limited_event_and_ratelimit_wait(
    receiver: OtlpReceiver, aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(200).start(aiohttp_server)
    waiting = loopback_policy(
        upstream.url, host="waits.test", rate_limit={"rate": 10, "per": "1s", "burst": 1, "max_wait": "2s"}
    )
    refusing = loopback_policy(
        upstream.url, host="refuses.test", rate_limit={"rate": 1, "per": "1m", "burst": 1, "max_wait": "0s"}
    )
    proxy = await start_proxy([waiting, refusing], **traced(receiver))

    traces = []
    for _ in range(2):  # back to back: the second finds the bucket empty
        traceparent, trace_id, _ = new_traceparent()
        reply = await app_get(proxy, traceparent=traceparent, Host="waits.test")
        assert reply.status == 200
        traces.append(trace_id)
    waits = []
    for trace_id in traces:
        server, _ = await trace_of(receiver, trace_id, clients=1)
        waits.append(server.attributes["outrigger.ratelimit.wait_ms"])
    assert waits[0] < 50.0
    assert waits[1] >= 50.0  # a token every 100 ms: the second request waited for one

    statuses = []
    for _ in range(2):
        traceparent, trace_id, _ = new_traceparent()
        reply = await app_get(proxy, traceparent=traceparent, Host="refuses.test")
        statuses.append(reply.status)
        server, _ = await trace_of(receiver, trace_id, clients=1 if reply.status == 200 else 0)
    assert statuses == [200, 429]
    assert "rate_limited" in server.event_names
    assert server.attributes["error.type"] == "rate_limited"


async def test_overloaded_event(
    receiver: OtlpReceiver, aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    gate = Gate(text="held", hold_limit=10)
    upstream = await ScriptedUpstream(gate).start(aiohttp_server)
    proxy = await start_proxy(
        [loopback_policy(upstream.url, concurrency={"max_in_flight": 1, "max_queued": 0})], **traced(receiver)
    )
    held = asyncio.create_task(app_get(proxy))
    try:
        await gate.wait_arrivals(1, within=5)
        traceparent, trace_id, _ = new_traceparent()
        reply = await app_get(proxy, traceparent=traceparent)
    finally:
        gate.open.set()
    assert (await held).status == 200
    assert reply.status == 503
    assert reply.headers["x-outrigger-error"] == "overloaded"
    server, _ = await trace_of(receiver, trace_id, clients=0)
    assert "overloaded" in server.event_names
    assert server.attributes["error.type"] == "overloaded"


# --------------------------------------------------------------------------- export configuration


async def test_service_name_from_config(
    receiver: OtlpReceiver, aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(200).start(aiohttp_server)
    proxy = await start_proxy(
        [loopback_policy(upstream.url)], **traced(receiver, service_name="checkout-sidecar")
    )
    traceparent, trace_id, _ = new_traceparent()
    await app_get(proxy, traceparent=traceparent)
    server, (client,) = await trace_of(receiver, trace_id, clients=1)
    assert server.resource["service.name"] == "checkout-sidecar"
    assert client.resource["service.name"] == "checkout-sidecar"


async def test_service_name_from_otel_service_name(
    receiver: OtlpReceiver,
    aiohttp_server: AiohttpServerFactory,
    start_proxy: StartProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "payments-egress")
    upstream = await ScriptedUpstream(200).start(aiohttp_server)
    proxy = await start_proxy([loopback_policy(upstream.url)], **traced(receiver))
    traceparent, trace_id, _ = new_traceparent()
    await app_get(proxy, traceparent=traceparent)
    server, _ = await trace_of(receiver, trace_id, clients=1)
    assert server.resource["service.name"] == "payments-egress"


async def test_default_service_name(
    receiver: OtlpReceiver, aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(200).start(aiohttp_server)
    proxy = await start_proxy([loopback_policy(upstream.url)], **traced(receiver))
    traceparent, trace_id, _ = new_traceparent()
    await app_get(proxy, traceparent=traceparent)
    server, _ = await trace_of(receiver, trace_id, clients=1)
    assert server.resource["service.name"] == "outrigger"


@pytest.mark.parametrize("variable", ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"])
async def test_export_turned_on_by_environment_alone(
    variable: str,
    receiver: OtlpReceiver,
    aiohttp_server: AiohttpServerFactory,
    start_proxy: StartProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The traces variable is the full URL; the generic one is a base to which /v1/traces is appended.
    value = receiver.endpoint if variable.endswith("TRACES_ENDPOINT") else f"http://127.0.0.1:{receiver.port}"
    monkeypatch.setenv(variable, value)
    upstream = await ScriptedUpstream(200).start(aiohttp_server)
    proxy = await start_proxy([loopback_policy(upstream.url)])  # no telemetry section at all
    assert proxy.config.main.telemetry.traces.endpoint is None
    traceparent, trace_id, app_span = new_traceparent()

    assert (await app_get(proxy, traceparent=traceparent)).status == 200

    server, (client,) = await trace_of(receiver, trace_id, clients=1)
    assert server.parent_span_id == app_span
    assert client.parent_span_id == server.span_id


async def test_no_export_without_endpoint_but_context_still_propagates(
    receiver: OtlpReceiver, aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(200).start(aiohttp_server)
    proxy = await start_proxy([loopback_policy(upstream.url)])
    traceparent, trace_id, app_span = new_traceparent()

    assert (await app_get(proxy, traceparent=traceparent)).status == 200

    assert not proxy.server.telemetry.tracing.exporting
    # the app's trace still reaches the provider, unbroken
    assert parse_traceparent(upstream.seen[0].headers.get("traceparent"))[:2] == (trace_id, app_span)
    await proxy.server.stop()
    assert receiver.exports == 0


async def test_sample_ratio_zero_exports_nothing_unless_the_app_sampled(
    receiver: OtlpReceiver, aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(200).start(aiohttp_server)
    proxy = await start_proxy(
        [loopback_policy(upstream.url)],
        telemetry={"traces": {"endpoint": receiver.endpoint, "sample_ratio": 0.0}},
    )
    for _ in range(5):
        assert (await app_get(proxy)).status == 200
    # not sampled: the flag sent upstream says so
    for seen in upstream.seen:
        assert int(parse_traceparent(seen.headers.get("traceparent"))[2], 16) & 0x01 == 0
    # an app that sampled its own span is still honoured (parent-based sampling): a positive control
    traceparent, trace_id, _ = new_traceparent()
    assert (await app_get(proxy, traceparent=traceparent)).status == 200

    await proxy.server.stop()  # flushes whatever was queued

    assert {s.trace_id for s in receiver.spans} == {trace_id}
    assert len(receiver.spans) == 2


async def test_collector_down_never_fails_or_slows_requests(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "1")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "10")
    closed = free_port()
    upstream = await ScriptedUpstream(200).start(aiohttp_server)
    proxy = await start_proxy(
        [loopback_policy(upstream.url)],
        telemetry={"traces": {"endpoint": f"http://127.0.0.1:{closed}/v1/traces"}},
    )
    assert proxy.server.telemetry.tracing.exporting

    durations = []
    for _ in range(30):
        started = time.perf_counter()
        reply = await app_get(proxy)
        durations.append(time.perf_counter() - started)
        assert reply.status == 200
        await asyncio.sleep(0.01)  # let the exporter thread try (and fail) in between
    assert upstream.count == 30
    assert max(durations) < 0.5, durations
    assert sorted(durations)[len(durations) // 2] < 0.1, durations


async def test_path_secrets_never_reach_spans_or_the_access_log(
    receiver: OtlpReceiver,
    aiohttp_server: AiohttpServerFactory,
    start_proxy: StartProxy,
    access_log: AccessLog,
) -> None:
    """A Slack webhook URL carries its secret in the path: redact_paths hides it everywhere."""
    upstream = await ScriptedUpstream(200).start(aiohttp_server)
    policy = loopback_policy(upstream.url, redact_paths=["/services/*/*/*"])
    proxy = await start_proxy([policy], **traced(receiver))
    traceparent, trace_id, _ = new_traceparent()
    reply = await app_get(proxy, "/services/T000/B000/XXXXSECRET?x=1", traceparent=traceparent)
    assert reply.status == 200
    server, clients = await trace_of(receiver, trace_id, clients=1)
    for span in (server, *clients):
        assert "XXXXSECRET" not in str(span.attributes["url.full"])
        assert str(span.attributes["url.full"]).endswith("/services/REDACTED/REDACTED/REDACTED?x=REDACTED")
    (line,) = [entry for entry in access_log.entries if entry["status"] == 200]
    assert line["path"] == "/services/REDACTED/REDACTED/REDACTED?x=REDACTED"
