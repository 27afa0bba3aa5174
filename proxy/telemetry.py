"""Traces, metrics and the access log: every name SREs rely on (SPEC 8) is written here.

Spans are made by hand (ARCHITECTURE.md): one SERVER span per inbound request
continuing the app's W3C ``traceparent``, and one CLIENT span per attempt (in
the attempt layer) whose context is injected upstream. Export is batched on
the SDK's own thread, so a slow or absent collector never blocks a request.
Layers only record facts on the `ProxyRequest`; this module turns them into
span attributes, metric samples and one JSON log line when the request ends.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from multidict import MultiMapping
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from yarl import URL

from proxy.config.model import Telemetry as TelemetrySettings
from proxy.errors import LOCAL_REFUSALS

if TYPE_CHECKING:
    from proxy.exchange import ProxyRequest
    from proxy.pipeline import PolicyState

access_log = logging.getLogger("outrigger.access")

REQUEST_ID_HEADER = "x-request-id"
REDACTED_VALUE = "REDACTED"
UNKNOWN_HOST_LABEL = "(none)"
"""`host` label for requests that matched no policy: raw requested hosts would be unbounded."""
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})

# Span attribute names beyond the HTTP semantic conventions (SPEC 8).
ATTR_POLICY = "outrigger.policy"
ATTR_ATTEMPTS = "outrigger.attempts"
ATTR_RETRY_REASON = "outrigger.retry.reason"
ATTR_RETRY_BACKOFF_MS = "outrigger.retry.backoff_ms"
ATTR_BREAKER_STATE = "outrigger.breaker.state"
ATTR_RATELIMIT_WAIT_MS = "outrigger.ratelimit.wait_ms"
ATTR_IDEMPOTENCY_KEY = "outrigger.idempotency.key"
ATTR_IDEMPOTENCY_INJECTED = "outrigger.idempotency.injected"
ATTR_CONFIG_VERSION = "outrigger.config.version"
ATTR_REPLAYED = "outrigger.replayed"
ATTR_REQUEST_ID = "http.request.header.x-request-id"

_W3C = TraceContextTextMapPropagator()
disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series next to every counter


def redact_query(path_qs: str) -> str:
    """Keep query names, drop their values: they often carry tokens, emails or card data."""
    path, sep, query = path_qs.partition("?")
    if not sep:
        return path
    parts = (part.partition("=") for part in query.split("&") if part)
    return (
        path + "?" + "&".join(f"{name}={REDACTED_VALUE}" if eq else REDACTED_VALUE for name, eq, _ in parts)
    )


def _requested_url(host: str, raw_target: str) -> URL | None:
    """The URL the app asked for, or None when it is malformed (the request is refused anyway)."""
    try:
        if raw_target.lower().startswith(("http://", "https://")):
            url = URL(raw_target, encoded=True)
        elif not raw_target.startswith("/"):  # authority-form (CONNECT host:port)
            url = URL(f"http://{raw_target}", encoded=True)
        elif host:
            url = URL(f"http://{host}{raw_target}", encoded=True)
        else:
            return None
        _ = url.host, url.port  # yarl validates the authority lazily
    except ValueError:
        return None
    return url


def method_label(method: str) -> str:
    return method if method in _KNOWN_METHODS else "OTHER"


def outcome_label(status: int | None, error_type: str | None) -> str:
    """`outrigger_attempts_total` outcome: a status class, or the failure kind."""
    return f"{status // 100}xx" if status is not None else (error_type or "error")


class _StateCollector(Collector):
    """Gauges read at scrape time from the live per-policy state (no bookkeeping on the hot path)."""

    def __init__(self, states: Callable[[], Mapping[str, PolicyState]]) -> None:
        self._states = states

    def collect(self) -> Iterable[GaugeMetricFamily]:
        from proxy.layers.breaker import STATE_VALUES

        circuit = GaugeMetricFamily(
            "outrigger_circuit_state",
            "Circuit breaker state (0 closed, 1 half-open, 2 open)",
            labels=["host"],
        )
        remaining = GaugeMetricFamily(
            "outrigger_upstream_ratelimit_remaining",
            "Requests left in the provider's quota, as last reported by its RateLimit headers",
            labels=["host"],
        )
        limit = GaugeMetricFamily(
            "outrigger_upstream_ratelimit_limit",
            "The provider's quota size, as last reported by its RateLimit headers",
            labels=["host"],
        )
        for name, state in self._states().items():
            if state.breaker is not None:
                circuit.add_metric([name], STATE_VALUES[state.breaker.state])
            quota = state.limiter.quota if state.limiter is not None else None
            if quota is not None and quota.remaining is not None:
                remaining.add_metric([name], quota.remaining)
            if quota is not None and quota.limit is not None:
                limit.add_metric([name], quota.limit)
        yield from (circuit, remaining, limit)


class Metrics:
    """The SPEC 8 Prometheus metrics, on a registry of our own (one per process)."""

    def __init__(self, states: Callable[[], Mapping[str, PolicyState]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "outrigger_requests", "Requests answered", ["host", "method", "code"], registry=r
        )
        self.duration = Histogram(
            "outrigger_request_duration_seconds",
            "Time to answer a request, body included",
            ["host"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
            registry=r,
        )
        self.attempts = Counter("outrigger_attempts", "Upstream attempts", ["host", "outcome"], registry=r)
        self.retries = Counter(
            "outrigger_retries", "Retries, by the condition that caused them", ["host", "reason"], registry=r
        )
        self.rejections = Counter(
            "outrigger_rejections", "Requests or retries refused locally", ["host", "type"], registry=r
        )
        self.ratelimit_wait = Histogram(
            "outrigger_ratelimit_wait_seconds",
            "Time spent waiting for rate-limit tokens per request",
            ["host"],
            buckets=(0.0, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )
        self.keys_injected = Counter(
            "outrigger_idempotency_keys_injected", "Idempotency keys added by Outrigger", ["host"], registry=r
        )
        self.reloads = Counter("outrigger_config_reloads", "Config reloads", ["result"], registry=r)
        r.register(_StateCollector(states))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _exporter(settings: TelemetrySettings) -> OTLPSpanExporter | None:
    if settings.traces.endpoint:
        return OTLPSpanExporter(endpoint=settings.traces.endpoint)
    if os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return OTLPSpanExporter()
    return None


def _service_name(settings: TelemetrySettings) -> str:
    if "service_name" in settings.model_fields_set:
        return settings.service_name
    return os.environ.get("OTEL_SERVICE_NAME") or settings.service_name


class Tracing:
    """The tracer: a real SDK provider when an exporter is configured, else a no-op one that still
    continues the app's trace context (so logs carry its trace id)."""

    def __init__(self, settings: TelemetrySettings) -> None:
        exporter = _exporter(settings)
        self._provider: TracerProvider | None = None
        if exporter is None:
            self.tracer: trace.Tracer = trace.NoOpTracer()
            return
        self._provider = TracerProvider(
            resource=Resource.create({SERVICE_NAME: _service_name(settings)}),
            sampler=ParentBased(TraceIdRatioBased(settings.traces.sample_ratio)),
        )
        self._provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self._provider.get_tracer("outrigger")

    @property
    def exporting(self) -> bool:
        return self._provider is not None

    def shutdown(self) -> None:
        """Flush and stop the exporter thread (blocking: call from a worker thread)."""
        if self._provider is not None:
            self._provider.shutdown()


def inject_context(headers: MultiMapping[str] | Any, context: Context) -> None:
    _W3C.inject(headers, context=context)


@dataclass
class RequestObservation:
    """One inbound request as telemetry sees it, from arrival to the last body byte."""

    method: str
    host: str
    path_qs: str
    request_id: str
    span: trace.Span
    context: Context
    started: float = field(default_factory=time.perf_counter)


class Telemetry:
    def __init__(self, settings: TelemetrySettings, states: Callable[[], Mapping[str, PolicyState]]) -> None:
        self.settings = settings
        self.tracing = Tracing(settings)
        self.metrics = Metrics(states)

    @property
    def tracer(self) -> trace.Tracer:
        return self.tracing.tracer

    def start(
        self, method: str, headers: MultiMapping[str], host: str, raw_target: str
    ) -> RequestObservation:
        """Open the SERVER span for what the app asked: `raw_target` is origin- or absolute-form."""
        parent = _W3C.extract(headers)
        request_id = headers.get(REQUEST_ID_HEADER) or str(uuid.uuid4())
        url = _requested_url(host, raw_target)
        attributes: dict[str, Any] = {"http.request.method": method, ATTR_REQUEST_ID: [request_id]}
        if url is not None and url.host:
            host, path_qs = url.host, url.raw_path_qs
            authority = url.with_user(None).raw_authority  # never user:password@
            attributes["url.full"] = f"{url.scheme}://{authority}{redact_query(path_qs)}"
            attributes["server.address"] = url.host
            if url.port is not None:
                attributes["server.port"] = url.port
        else:
            path_qs = raw_target
        span = self.tracer.start_span(method, context=parent, kind=SpanKind.SERVER, attributes=attributes)
        return RequestObservation(
            method, host, path_qs, request_id, span, trace.set_span_in_context(span, parent)
        )

    def finish(
        self,
        observation: RequestObservation,
        *,
        status: int,
        error_type: str | None,
        policy: str | None,
        request: ProxyRequest | None,
        state: PolicyState | None,
        config_version: str,
    ) -> None:
        """Close the request: metrics, SERVER span attributes and events, one access log line."""
        outcome = _Outcome(
            observation, status, error_type, policy, request, state, config_version,
            time.perf_counter() - observation.started,
        )  # fmt: skip
        self._record_metrics(outcome)
        span = observation.span
        span.set_attributes(_attributes(outcome))
        for event in request.events if request is not None else ():
            span.add_event(event)
        if error_type is not None:
            span.add_event(error_type)
        if status >= 500:
            span.set_status(StatusCode.ERROR)
        span.end()
        if self.settings.access_log:
            access_log.info(json.dumps(_log_entry(outcome), separators=(",", ":")))

    def _record_metrics(self, outcome: _Outcome) -> None:
        m, label, request = self.metrics, outcome.label, outcome.request
        m.requests.labels(label, method_label(outcome.observation.method), str(outcome.status)).inc()
        m.duration.labels(label).observe(outcome.elapsed)
        if outcome.error_type in LOCAL_REFUSALS:
            m.rejections.labels(label, outcome.error_type).inc()
        if request is None:
            return
        for attempt in request.attempt_outcomes:
            m.attempts.labels(label, attempt).inc()
        for retry in request.retries:
            m.retries.labels(label, retry.reason).inc()
        for event in request.events:
            m.rejections.labels(label, event).inc()
        if request.idempotency_key_injected:
            m.keys_injected.labels(label).inc()
        if outcome.state is not None and outcome.state.limiter is not None:
            m.ratelimit_wait.labels(label).observe(request.ratelimit_wait)


@dataclass(frozen=True)
class _Outcome:
    """Everything known about a finished request, read by metrics, the span and the log."""

    observation: RequestObservation
    status: int
    error_type: str | None
    policy: str | None
    request: ProxyRequest | None
    state: PolicyState | None
    config_version: str
    elapsed: float

    @property
    def label(self) -> str:
        return self.policy or UNKNOWN_HOST_LABEL


def _attributes(outcome: _Outcome) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "http.response.status_code": outcome.status,
        ATTR_CONFIG_VERSION: outcome.config_version,
    }
    if outcome.error_type is not None:
        attributes["error.type"] = outcome.error_type
    elif outcome.status >= 500:
        attributes["error.type"] = str(outcome.status)
    if outcome.policy is not None:
        attributes[ATTR_POLICY] = outcome.policy
    if outcome.state is not None and outcome.state.breaker is not None:
        attributes[ATTR_BREAKER_STATE] = outcome.state.breaker.state
    request = outcome.request
    if request is None:
        return attributes
    attributes[ATTR_ATTEMPTS] = request.attempts
    if request.retries:
        attributes[ATTR_RETRY_REASON] = [r.reason for r in request.retries]
        attributes[ATTR_RETRY_BACKOFF_MS] = [round(r.delay * 1000, 3) for r in request.retries]
    attributes[ATTR_RATELIMIT_WAIT_MS] = round(request.ratelimit_wait * 1000, 3)
    if request.idempotency_key is not None:
        attributes[ATTR_IDEMPOTENCY_KEY] = request.idempotency_key
        attributes[ATTR_IDEMPOTENCY_INJECTED] = request.idempotency_key_injected
    if request.replayed:
        attributes[ATTR_REPLAYED] = True
    return attributes


def _log_entry(outcome: _Outcome) -> dict[str, Any]:
    observation, request = outcome.observation, outcome.request
    span_context = observation.span.get_span_context()
    return {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "trace_id": format(span_context.trace_id, "032x") if span_context.is_valid else None,
        "request_id": observation.request_id,
        "method": observation.method,
        "host": observation.host,
        "path": redact_query(observation.path_qs),
        "status": outcome.status,
        "attempts": request.attempts if request is not None else 0,
        "retry_reasons": [r.reason for r in request.retries] if request is not None else [],
        "duration_ms": round(outcome.elapsed * 1000, 3),
        "policy": outcome.policy,
        "upstream": str(request.target) if request is not None else None,
        "error_type": outcome.error_type,
        "replayed": request.replayed if request is not None else False,
        "config_version": outcome.config_version,
    }
