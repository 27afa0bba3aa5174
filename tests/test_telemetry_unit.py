"""Unit tests for the proxy/telemetry package and the attempt layer's CLIENT span, without sockets.

Spans go to the SDK's in-memory exporter (through the same `Telemetry` and
`AttemptLayer` code the server uses); metrics are read back from the
Prometheus registry; the access log is read from an in-memory stream given to its writer.
"""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from proxy import errors
from proxy.config.model import Telemetry as TelemetrySettings
from proxy.config.model import TracesSettings
from proxy.exchange import RetryRecord
from proxy.layers.attempt import AttemptLayer
from proxy.target import parse_target
from proxy.telemetry import (
    ATTR_ATTEMPTS,
    ATTR_BREAKER_STATE,
    ATTR_CONFIG_VERSION,
    ATTR_IDEMPOTENCY_INJECTED,
    ATTR_IDEMPOTENCY_KEY,
    ATTR_POLICY,
    ATTR_RATELIMIT_WAIT_MS,
    ATTR_REQUEST_ID,
    ATTR_RETRY_BACKOFF_MS,
    ATTR_RETRY_REASON,
    REDACTED_VALUE,
    UNKNOWN_HOST_LABEL,
    Metrics,
    Telemetry,
    Tracing,
    method_label,
    outcome_label,
    redact_query,
)
from tests.fakes import fake_upstream, make_request, read_body

APP_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
APP_SPAN = "00f067aa0ba902b7"
APP_TRACEPARENT = f"00-{APP_TRACE}-{APP_SPAN}-01"
OTEL_VARIABLES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
)


@pytest.fixture(autouse=True)
def _clean_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def headers(**values: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({k.replace("_", "-"): v for k, v in values.items()}))


def start(
    telemetry: Telemetry, method: str, headers: CIMultiDictProxy[str], host: str, raw_target: str
) -> Any:
    """`Telemetry.start` for a request line target and Host header, parsed as the server does."""
    return telemetry.start(method, headers, parse_target(raw_target, host))


def telemetry_with(tracer: trace.Tracer, **settings: Any) -> Telemetry:
    telemetry = Telemetry(TelemetrySettings.model_validate(settings), dict)
    telemetry.tracing.tracer = tracer
    return telemetry


# --------------------------------------------------------------------------- redaction and labels


@pytest.mark.parametrize(
    ("path_qs", "expected"),
    [
        ("/v1/things", "/v1/things"),
        ("/v1/things?", "/v1/things?"),
        ("/v1/x?token=abc", f"/v1/x?token={REDACTED_VALUE}"),
        ("/v1/x?a=1&b=two&a=3", "/v1/x?a=REDACTED&b=REDACTED&a=REDACTED"),
        ("/v1/x?flag&empty=", "/v1/x?REDACTED&empty=REDACTED"),  # a bare token may itself be a secret
        ("/hook?sk_live_51Hx9SECRET", "/hook?REDACTED"),
        ("/v1/x?a%3Dsecret", "/v1/x?REDACTED"),  # names are never decoded into a value
        ("/v1/x?email=a%40b.test&card=4242+4242", "/v1/x?email=REDACTED&card=REDACTED"),
        ("/search?q=a=b=c", "/search?q=REDACTED"),
    ],
)
def test_redact_query_keeps_names_and_drops_values(path_qs: str, expected: str) -> None:
    assert redact_query(path_qs) == expected


@pytest.mark.parametrize("secret", ["sk_live_abc123", "a%40b.test", "4242+4242"])
def test_redacted_query_never_contains_the_value(secret: str) -> None:
    assert secret not in redact_query(f"/v1/x?a=1&key={secret}&b=2")


def test_method_label_is_bounded() -> None:
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        assert method_label(method) == method
    assert method_label("PURGE") == "OTHER"
    assert method_label("X" * 100) == "OTHER"
    assert method_label("get") == "OTHER"


@pytest.mark.parametrize(
    ("status", "error", "label"),
    [
        (200, None, "2xx"),
        (204, None, "2xx"),
        (301, None, "3xx"),
        (429, None, "4xx"),
        (503, None, "5xx"),
        (None, "connect-failure", "connect-failure"),
        (None, "timeout", "timeout"),
        (None, None, "error"),
    ],
)
def test_outcome_label(status: int | None, error: str | None, label: str) -> None:
    assert outcome_label(status, error) == label


# --------------------------------------------------------------------------- export configuration


def _resource_service_name(tracing: Tracing) -> str:
    tracer = tracing.tracer
    assert isinstance(tracer, SdkTracer)
    name = tracer.resource.attributes["service.name"]
    assert isinstance(name, str)
    return name


def test_no_endpoint_and_no_environment_means_no_export() -> None:
    tracing = Tracing(TelemetrySettings())
    assert not tracing.exporting
    assert isinstance(tracing.tracer, trace.NoOpTracer)
    tracing.shutdown()  # harmless without a provider


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:9/v1/traces"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9"),
    ],
)
def test_standard_environment_turns_export_on(
    variable: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, value)
    tracing = Tracing(TelemetrySettings())
    try:
        assert tracing.exporting
    finally:
        tracing.shutdown()


def test_service_name_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    traced = {"traces": {"endpoint": "http://127.0.0.1:9/v1/traces"}}
    tracings = [Tracing(TelemetrySettings.model_validate(traced))]
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    tracings.append(Tracing(TelemetrySettings.model_validate(traced)))
    tracings.append(Tracing(TelemetrySettings.model_validate({**traced, "service_name": "from-config"})))
    try:
        assert [_resource_service_name(t) for t in tracings] == ["outrigger", "from-env", "from-config"]
    finally:
        for tracing in tracings:
            tracing.shutdown()


@pytest.mark.parametrize("endpoint", ["collector:4318", "grpc://collector:4317", "/v1/traces"])
def test_traces_endpoint_must_be_an_http_url(endpoint: str) -> None:
    with pytest.raises(ValidationError, match="endpoint"):
        TracesSettings(endpoint=endpoint)


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_sample_ratio_is_a_probability(ratio: float) -> None:
    with pytest.raises(ValidationError):
        TracesSettings(sample_ratio=ratio)


def test_telemetry_defaults() -> None:
    settings = TelemetrySettings()
    assert settings.service_name == "outrigger"
    assert settings.traces.endpoint is None
    assert settings.traces.sample_ratio == 1.0
    assert settings.access_log is True


# --------------------------------------------------------------------------- request ids and context


def test_request_id_is_kept_or_generated() -> None:
    telemetry = Telemetry(TelemetrySettings(), dict)
    kept = start(telemetry, "GET", headers(x_request_id="abc-123"), "api.test", "/")
    generated = [start(telemetry, "GET", headers(), "api.test", "/").request_id for _ in range(3)]
    assert kept.request_id == "abc-123"
    assert all(uuid.UUID(value).version == 4 for value in generated)
    assert len(set(generated)) == 3


@pytest.mark.parametrize("host", ["api.test:99999", "api.test:abc"])
def test_start_survives_a_malformed_host(host: str) -> None:
    telemetry = Telemetry(TelemetrySettings(), dict)
    observation = start(telemetry, "GET", headers(), host, "/x?token=abc")
    assert observation.request_id


def test_start_splits_host_and_port_and_reads_absolute_form(
    span_exporter: tuple[trace.Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = span_exporter
    telemetry = telemetry_with(tracer)
    for host, target in (("api.test:8443", "/v1?x=1"), ("ignored.test", "http://api.test:8443/v1?x=1")):
        observation = start(telemetry, "GET", headers(), host, target)
        assert (observation.host, observation.path_qs) == ("api.test", "/v1?x=1")
        observation.span.end()
    for span in exporter.get_finished_spans():
        attributes = dict(span.attributes or {})
        assert attributes["server.address"] == "api.test"
        assert attributes["server.port"] == 8443
        assert attributes["url.full"] == "http://api.test:8443/v1?x=REDACTED"


def test_without_export_the_apps_trace_context_is_still_continued() -> None:
    telemetry = Telemetry(TelemetrySettings(), dict)
    observation = start(telemetry, "GET", headers(traceparent=APP_TRACEPARENT), "api.test", "/")
    context = observation.span.get_span_context()
    assert format(context.trace_id, "032x") == APP_TRACE
    assert format(context.span_id, "016x") == APP_SPAN
    # nothing records: no context for attempt spans, and the app's own traceparent goes upstream
    assert observation.context is None
    assert observation.traceparent is None


def test_server_span_continues_the_apps_trace(
    span_exporter: tuple[trace.Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = span_exporter
    telemetry = telemetry_with(tracer)
    observation = start(
        telemetry,
        "POST",
        headers(traceparent=APP_TRACEPARENT, x_request_id="r-1"),
        "api.test",
        "/v1/pay?card=4242",
    )
    telemetry.finish(
        observation,
        status=201,
        error_type=None,
        policy="api.test",
        request=None,
        state=None,
        config_version="v1",
    )
    (span,) = exporter.get_finished_spans()
    assert span.kind == SpanKind.SERVER
    assert span.name == "POST"
    assert span.parent is not None
    assert format(span.parent.span_id, "016x") == APP_SPAN
    assert format(span.context.trace_id, "032x") == APP_TRACE
    attributes = dict(span.attributes or {})
    assert attributes["url.full"] == "http://api.test/v1/pay?card=REDACTED"
    assert attributes["http.request.method"] == "POST"
    assert attributes["server.address"] == "api.test"
    assert attributes[ATTR_REQUEST_ID] == ("r-1",)
    assert attributes["http.response.status_code"] == 201
    assert attributes[ATTR_POLICY] == "api.test"
    assert attributes[ATTR_CONFIG_VERSION] == "v1"
    assert span.status.status_code != StatusCode.ERROR


def test_finish_records_every_outrigger_attribute_and_event(
    span_exporter: tuple[trace.Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = span_exporter
    telemetry = telemetry_with(tracer)
    request = make_request("POST")
    request.attempts = 3
    request.retries = [RetryRecord("503", 0.0125), RetryRecord("connect-failure", 0.25)]
    request.attempt_outcomes = ["5xx", "connect-failure", "5xx"]
    request.idempotency_key = "key-1"
    request.idempotency_key_injected = True
    request.ratelimit_wait = 0.0421
    request.events = ["retry_budget_exhausted"]
    observation = start(telemetry, "POST", headers(), "api.test", "/v1")

    telemetry.finish(
        observation,
        status=503,
        error_type=None,
        policy="api.test",
        request=request,
        state=None,
        config_version="v9",
    )

    (span,) = exporter.get_finished_spans()
    attributes = dict(span.attributes or {})
    assert attributes[ATTR_ATTEMPTS] == 3
    assert attributes[ATTR_RETRY_REASON] == ("503", "connect-failure")
    assert attributes[ATTR_RETRY_BACKOFF_MS] == (12.5, 250.0)
    assert attributes[ATTR_IDEMPOTENCY_KEY] == "key-1"
    assert attributes[ATTR_IDEMPOTENCY_INJECTED] is True
    assert attributes[ATTR_RATELIMIT_WAIT_MS] == pytest.approx(42.1)
    assert attributes["error.type"] == "503"
    assert ATTR_BREAKER_STATE not in attributes
    assert [event.name for event in span.events] == ["retry_budget_exhausted"]
    assert span.status.status_code == StatusCode.ERROR


def test_local_error_is_an_event_and_error_type(
    span_exporter: tuple[trace.Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = span_exporter
    telemetry = telemetry_with(tracer)
    observation = start(telemetry, "GET", headers(), "nobody.test", "/")
    telemetry.finish(
        observation,
        status=403,
        error_type="host_not_allowed",
        policy=None,
        request=None,
        state=None,
        config_version="v1",
    )
    (span,) = exporter.get_finished_spans()
    attributes = dict(span.attributes or {})
    assert attributes["error.type"] == "host_not_allowed"
    assert ATTR_POLICY not in attributes
    assert ATTR_ATTEMPTS not in attributes
    assert [event.name for event in span.events] == ["host_not_allowed"]


# --------------------------------------------------------------------------- metrics


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.exposition().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_registry_is_private_and_named_per_spec() -> None:
    metrics = Metrics(dict)
    text = metrics.exposition().decode()
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {
        "outrigger_requests",
        "outrigger_request_duration_seconds",
        "outrigger_attempts",
        "outrigger_retries",
        "outrigger_circuit_state",
        "outrigger_rejections",
        "outrigger_ratelimit_wait_seconds",
        "outrigger_idempotency_keys_injected",
        "outrigger_config_reloads",
    } <= names
    assert all(name.startswith("outrigger_") for name in names)  # no process_/python_ collectors
    assert Metrics(dict).registry is not metrics.registry


def test_finish_moves_the_counters() -> None:
    telemetry = Telemetry(TelemetrySettings(access_log=False), dict)
    request = make_request()
    request.attempts = 2
    request.attempt_outcomes = ["5xx", "2xx"]
    request.retries = [RetryRecord("503", 0.01)]
    request.idempotency_key_injected = True
    request.events = ["circuit_open"]

    telemetry.finish(
        start(telemetry, "GET", headers(), "api.test", "/"),
        status=200,
        error_type=None,
        policy="api.test",
        request=request,
        state=None,
        config_version="v",
    )
    for error_type, status in (("host_not_allowed", 403), ("upstream_unreachable", 502), ("timeout", 504)):
        telemetry.finish(
            start(telemetry, "PURGE", headers(), "raw.host.test", "/"),
            status=status,
            error_type=error_type,
            policy=None,
            request=None,
            state=None,
            config_version="v",
        )

    samples = _samples(telemetry.metrics)
    host = (("host", "api.test"),)
    assert (
        samples[("outrigger_requests_total", (("code", "200"), ("host", "api.test"), ("method", "GET")))] == 1
    )
    assert samples[("outrigger_attempts_total", (("host", "api.test"), ("outcome", "5xx")))] == 1
    assert samples[("outrigger_attempts_total", (("host", "api.test"), ("outcome", "2xx")))] == 1
    assert samples[("outrigger_retries_total", (("host", "api.test"), ("reason", "503")))] == 1
    assert samples[("outrigger_rejections_total", (("host", "api.test"), ("type", "circuit_open")))] == 1
    assert samples[("outrigger_idempotency_keys_injected_total", host)] == 1
    assert samples[("outrigger_request_duration_seconds_count", host)] == 1
    none = ("host", UNKNOWN_HOST_LABEL)
    assert samples[("outrigger_rejections_total", (none, ("type", "host_not_allowed")))] == 1
    assert ("outrigger_rejections_total", (none, ("type", "upstream_unreachable"))) not in samples
    assert ("outrigger_rejections_total", (none, ("type", "timeout"))) not in samples
    assert samples[("outrigger_requests_total", (("code", "502"), none, ("method", "OTHER")))] == 1
    assert not any("raw.host.test" in str(key) for key in samples)


# --------------------------------------------------------------------------- access log


def _lines(telemetry: Telemetry, stream: io.BytesIO) -> list[dict[str, Any]]:
    telemetry.access_log.flush()
    return [json.loads(line) for line in stream.getvalue().decode().splitlines()]


def test_access_log_line() -> None:
    stream = io.BytesIO()
    telemetry = Telemetry(TelemetrySettings(), dict, stream)
    request = make_request(path_qs="/v1/x?token=abc")
    request.attempts = 2
    request.retries = [RetryRecord("reset", 0.01)]
    observation = start(
        telemetry,
        "GET",
        headers(traceparent=APP_TRACEPARENT, x_request_id="rid"),
        "api.test",
        "/v1/x?token=abc",
    )

    telemetry.finish(
        observation,
        status=200,
        error_type=None,
        policy="api.test",
        request=request,
        state=None,
        config_version="v3",
    )

    (line,) = _lines(telemetry, stream)
    assert line["trace_id"] == APP_TRACE
    assert line["request_id"] == "rid"
    assert line["method"] == "GET"
    assert line["host"] == "api.test"
    assert line["path"] == "/v1/x?token=REDACTED"
    assert line["status"] == 200
    assert line["attempts"] == 2
    assert line["retry_reasons"] == ["reset"]
    assert line["duration_ms"] >= 0
    assert line["policy"] == "api.test"
    assert line["error_type"] is None
    assert line["config_version"] == "v3"
    assert b"abc" not in stream.getvalue()


def test_access_log_off() -> None:
    stream = io.BytesIO()
    telemetry = Telemetry(TelemetrySettings(access_log=False), dict, stream)
    telemetry.finish(
        start(telemetry, "GET", headers(), "api.test", "/"),
        status=200,
        error_type=None,
        policy=None,
        request=None,
        state=None,
        config_version="v",
    )
    assert _lines(telemetry, stream) == []


# --------------------------------------------------------------------------- the attempt layer's CLIENT span


async def test_each_attempt_span_is_a_child_and_replaces_the_apps_traceparent(
    span_exporter: tuple[trace.Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = span_exporter
    server = tracer.start_span("GET", kind=SpanKind.SERVER)
    request = make_request(path_qs="/v1/x?token=abc", headers={"traceparent": APP_TRACEPARENT})
    request.trace_context = trace.set_span_in_context(server)
    layer = AttemptLayer(request.settings.headers, Path("."), tracer)
    upstream = fake_upstream(503, 200)

    first = await layer(request, upstream)
    await read_body(first)
    first.body.release()
    request.retries.append(RetryRecord("503", 0.02))
    second = await layer(request, upstream)
    second.body.release()
    server.end()

    clients: list[ReadableSpan] = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]
    assert len(clients) == 2
    sent = [attempt.headers.getall("traceparent") for attempt in upstream.attempts]
    for client, traceparents in zip(clients, sent, strict=True):
        assert client.parent is not None
        assert client.parent.span_id == server.get_span_context().span_id
        (value,) = traceparents
        assert value.split("-")[2] == format(client.context.span_id, "016x")
        assert APP_SPAN not in value
    attributes = [dict(c.attributes or {}) for c in clients]
    assert attributes[0]["url.full"] == "http://api.test/v1/x?token=REDACTED"
    assert attributes[0]["server.address"] == "api.test"
    assert attributes[0]["server.port"] == 80
    assert "http.request.resend_count" not in attributes[0]
    assert attributes[1]["http.request.resend_count"] == 1
    assert attributes[1][ATTR_RETRY_REASON] == "503"
    assert attributes[1][ATTR_RETRY_BACKOFF_MS] == 20.0
    assert clients[0].status.status_code == StatusCode.ERROR
    assert request.attempt_outcomes == ["5xx", "2xx"]


async def test_failed_attempt_span_has_the_error_condition(
    span_exporter: tuple[trace.Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = span_exporter
    request = make_request()
    layer = AttemptLayer(request.settings.headers, Path("."), tracer)

    with pytest.raises(errors.ConnectFailure):
        await layer(request, fake_upstream(errors.ConnectFailure))

    (span,) = exporter.get_finished_spans()
    assert span.kind == SpanKind.CLIENT
    assert dict(span.attributes or {})["error.type"] == "connect-failure"
    assert span.status.status_code == StatusCode.ERROR
    assert request.attempt_outcomes == ["connect-failure"]


# --------------------------------------------------------------------------- no URLs or user info in spans


async def test_client_span_status_has_no_error_message(
    span_exporter: tuple[trace.Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = span_exporter
    request = make_request("GET", "/x?token=SECRET")
    layer = AttemptLayer(request.settings.headers, Path("."), tracer)
    url_with_secret = "http://1.2.3.4:80/x?token=SECRET"
    failing = fake_upstream(
        errors.ConnectFailure(f"cannot connect: Connection timeout to host {url_with_secret}")
    )
    with pytest.raises(errors.ConnectFailure):
        await layer(request, failing)
    (span,) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]
    assert span.status.status_code == StatusCode.ERROR
    assert not span.status.description
    assert span.attributes is not None
    assert span.attributes.get("error.type") == "connect-failure"


def test_server_span_url_never_carries_user_info(
    span_exporter: tuple[trace.Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = span_exporter
    telemetry = Telemetry(TelemetrySettings(), dict)
    telemetry.tracing.tracer = tracer
    target = parse_target("http://alice:s3cretpw@a.example/v1?token=x", "a.example")
    observation = telemetry.start("GET", CIMultiDictProxy(CIMultiDict()), target)
    telemetry.finish(
        observation, status=200, error_type=None, policy=None, request=None, state=None, config_version="v"
    )
    (span,) = exporter.get_finished_spans()
    url = str((span.attributes or {})["url.full"])
    assert "s3cretpw" not in url
    assert "alice" not in url
    assert url == "http://a.example/v1?token=REDACTED"
