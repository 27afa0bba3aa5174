"""Traces, metrics and the access log (SPEC 8): names, tracing, metrics and the log writer.

Layers only record facts on the `ProxyRequest`; `Telemetry.finish` turns them into metric
samples, span attributes and one JSON log line when the request ends. Nothing here imports the
pipeline: it reads live policy state through the `LiveState` protocol the pipeline satisfies.
Work nobody will read is skipped: a span that does not record gets no attributes, and metric
children are bound once per policy (`PolicyMetrics`), not looked up per request.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, BinaryIO

from multidict import MultiMapping
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, StatusCode

from proxy.config.model import Telemetry as TelemetrySettings
from proxy.errors import LOCAL_REFUSALS
from proxy.target import RequestTarget
from proxy.telemetry.access_log import AccessLogWriter, encode_line
from proxy.telemetry.metrics import LiveState, Metrics, PolicyMetrics, States
from proxy.telemetry.names import (
    ATTR_ATTEMPTS,
    ATTR_BREAKER_STATE,
    ATTR_CACHE,
    ATTR_CACHE_MASKED_ERROR,
    ATTR_CONFIG_VERSION,
    ATTR_DELIVERY_ID,
    ATTR_FALLBACK,
    ATTR_FAULT,
    ATTR_IDEMPOTENCY_INJECTED,
    ATTR_IDEMPOTENCY_KEY,
    ATTR_POLICY,
    ATTR_RATELIMIT_WAIT_MS,
    ATTR_REPLAYED,
    ATTR_REQUEST_ID,
    ATTR_RETRY_BACKOFF_MS,
    ATTR_RETRY_REASON,
    ATTR_UPSTREAM,
    REDACTED_VALUE,
    REQUEST_ID_HEADER,
    TRACEPARENT_HEADER,
    UNKNOWN_HOST_LABEL,
    method_label,
    outcome_label,
    redact_query,
)
from proxy.telemetry.tracing import (
    Tracing,
    extract_context,
    full_url,
    inject_context,
    server_attributes,
    unrecorded_traceparent,
)

if TYPE_CHECKING:
    from proxy.exchange import ProxyRequest

__all__ = [
    "ATTR_ATTEMPTS",
    "ATTR_BREAKER_STATE",
    "ATTR_CACHE",
    "ATTR_CACHE_MASKED_ERROR",
    "ATTR_CONFIG_VERSION",
    "ATTR_FALLBACK",
    "ATTR_FAULT",
    "ATTR_IDEMPOTENCY_INJECTED",
    "ATTR_IDEMPOTENCY_KEY",
    "ATTR_POLICY",
    "ATTR_RATELIMIT_WAIT_MS",
    "ATTR_REPLAYED",
    "ATTR_REQUEST_ID",
    "ATTR_RETRY_BACKOFF_MS",
    "ATTR_RETRY_REASON",
    "REDACTED_VALUE",
    "REQUEST_ID_HEADER",
    "TRACEPARENT_HEADER",
    "UNKNOWN_HOST_LABEL",
    "AccessLogWriter",
    "LiveState",
    "Metrics",
    "PolicyMetrics",
    "RequestObservation",
    "Telemetry",
    "Tracing",
    "inject_context",
    "method_label",
    "outcome_label",
    "redact_query",
]


@dataclass
class RequestObservation:
    """One inbound request as telemetry sees it, from arrival to the last body byte."""

    method: str
    host: str
    path_qs: str
    request_id: str
    span: trace.Span
    context: Context | None
    """The SERVER span's context when it records (attempts make CLIENT children), else None."""
    traceparent: str | None = None
    """When the span does not record: our ``traceparent`` for every attempt (None: the app's)."""
    target: RequestTarget | None = None
    started: float = field(default_factory=time.perf_counter)


def new_request_id() -> str:
    """A version-4 UUID string for correlation. Not a secret, so the fast PRNG serves (uuid4 makes a
    getrandom syscall per request)."""
    digits = f"{random.getrandbits(128):032x}"
    variant = "89ab"[int(digits[16], 16) & 3]
    return f"{digits[:8]}-{digits[8:12]}-4{digits[13:16]}-{variant}{digits[17:20]}-{digits[20:]}"


class Telemetry:
    def __init__(
        self, settings: TelemetrySettings, states: States, access_stream: BinaryIO | None = None
    ) -> None:
        self.settings = settings
        self.tracing = Tracing(settings)
        self.metrics = Metrics(states)
        self.access_log = AccessLogWriter(access_stream, on_drop=self.metrics.access_log_dropped.inc)
        self._policies: dict[str, PolicyMetrics] = {}

    @property
    def tracer(self) -> trace.Tracer:
        return self.tracing.tracer

    def policy_metrics(self, policy: str | None) -> PolicyMetrics:
        """The pre-bound children for a policy (`UNKNOWN_HOST_LABEL` when none matched); made once
        per policy name and kept, as policy names are few."""
        label = policy or UNKNOWN_HOST_LABEL
        bound = self._policies.get(label)
        if bound is None:
            bound = self._policies[label] = PolicyMetrics(self.metrics, label)
        return bound

    def start(self, method: str, headers: MultiMapping[str], target: RequestTarget) -> RequestObservation:
        """Open the SERVER span; its attributes are only computed when it records."""
        parent = extract_context(headers)
        request_id = headers.get(REQUEST_ID_HEADER) or new_request_id()
        span = self.tracer.start_span(method, context=parent, kind=SpanKind.SERVER)
        if span.is_recording():
            span.set_attributes(server_attributes(method, request_id, target))
            context: Context | None = trace.set_span_in_context(span, parent)
            traceparent = None
        else:
            context, traceparent = None, unrecorded_traceparent(span, parent)
        return RequestObservation(
            method, target.host, target.path_qs, request_id, span, context, traceparent, target
        )

    def finish(
        self,
        observation: RequestObservation,
        *,
        status: int,
        error_type: str | None,
        policy: str | None,
        request: ProxyRequest | None,
        state: LiveState | None,
        config_version: str,
    ) -> None:
        """Close the request: metrics, SERVER span attributes and events, one access log line."""
        elapsed = time.perf_counter() - observation.started
        if error_type is None and request is not None and request.fallback is not None:
            error_type = request.fallback  # the app got the fallback; the real failure stays visible
        self._record_metrics(observation, status, error_type, policy, request, state, elapsed)
        span = observation.span
        if span.is_recording():
            span.set_attributes(_attributes(status, error_type, policy, request, state, config_version))
            if request is not None and request.policy.settings.redact_paths and observation.target:
                span.set_attribute("url.full", full_url(observation.target, request.policy.redact_path))
            for event in request.events if request is not None else ():
                span.add_event(event)
            if error_type is not None:
                span.add_event(error_type)
            if request is not None and request.cache_masked_error is not None:
                span.add_event("stale_if_error", {"error.type": request.cache_masked_error})
            if status >= 500:
                span.set_status(StatusCode.ERROR)
            span.end()
        if self.settings.access_log:
            entry = _log_entry(observation, status, error_type, policy, request, config_version, elapsed)
            self.access_log.write(encode_line(entry))

    def close(self) -> None:
        """Flush the access log and the span exporter (blocking: call from a worker thread)."""
        self.access_log.close()
        self.tracing.shutdown()

    def record_tunnel(self, policy: str | None, result: str | None, to_upstream: int, to_app: int) -> None:
        """A tunnel or upgraded connection ended: its bytes, and for CONNECT how it ended (`result`).
        Tunnels are long-lived and few: plain `.labels()` lookups are fine here."""
        label = policy or UNKNOWN_HOST_LABEL
        if result is not None:
            self.metrics.tunnels.labels(label, result).inc()
        self.metrics.tunnel_bytes.labels(label, "upstream").inc(to_upstream)
        self.metrics.tunnel_bytes.labels(label, "app").inc(to_app)

    def _record_metrics(
        self,
        observation: RequestObservation,
        status: int,
        error_type: str | None,
        policy: str | None,
        request: ProxyRequest | None,
        state: LiveState | None,
        elapsed: float,
    ) -> None:
        m = self.policy_metrics(policy)
        m.requests(observation.method, status).inc()
        m.duration.observe(elapsed)
        if error_type in LOCAL_REFUSALS:
            m.rejections(error_type).inc()
        if request is not None:
            _record_request_facts(m, request, state)

    def record_replayed(self, request: ProxyRequest, state: LiveState | None) -> None:
        """A stored request sent again by the delivery worker: its attempts, retries, refusals
        and the rest count like a live request's (there is no SERVER span or log line of its own)."""
        _record_request_facts(self.policy_metrics(request.policy.name), request, state)


def _record_request_facts(m: PolicyMetrics, request: ProxyRequest, state: LiveState | None) -> None:
    for attempt in request.attempt_outcomes:
        m.attempts(attempt).inc()
    for retry in request.retries:
        m.retries(retry.reason).inc()
    for event in request.events:
        m.rejections(event).inc()
    if request.idempotency_key_injected:
        m.keys_injected.inc()
    if request.fallback is not None:
        m.fallbacks(request.fallback).inc()
    if request.fault is not None:
        m.faults(request.fault).inc()
    if request.failover is not None:
        for upstream in request.failover.moves:
            m.failovers(upstream).inc()
    if request.cache_result is not None:
        m.cache(request.cache_result).inc()
        if request.cache_masked_error in LOCAL_REFUSALS:  # e.g. circuit_open, answered stale
            m.rejections(request.cache_masked_error).inc()
    if state is not None and state.limiter is not None:
        m.ratelimit_wait.observe(request.ratelimit_wait)
        m.ratelimit_queue_wait(request.priority).observe(request.ratelimit_wait)


def _attributes(
    status: int,
    error_type: str | None,
    policy: str | None,
    request: ProxyRequest | None,
    state: LiveState | None,
    config_version: str,
) -> dict[str, Any]:
    attributes: dict[str, Any] = {"http.response.status_code": status, ATTR_CONFIG_VERSION: config_version}
    if error_type is not None:
        attributes["error.type"] = error_type
    elif status >= 500:
        attributes["error.type"] = str(status)
    if policy is not None:
        attributes[ATTR_POLICY] = policy
    if state is not None and state.breaker is not None:
        attributes[ATTR_BREAKER_STATE] = state.breaker.state
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
    if request.fallback is not None:
        attributes[ATTR_FALLBACK] = request.fallback
    if request.fault is not None:
        attributes[ATTR_FAULT] = request.fault
    if request.failover is not None:
        attributes[ATTR_UPSTREAM] = str(request.target)
    if request.delivery_id is not None:
        attributes[ATTR_DELIVERY_ID] = request.delivery_id
    if request.cache_result is not None:
        attributes[ATTR_CACHE] = request.cache_result
        if request.cache_masked_error is not None:
            attributes[ATTR_CACHE_MASKED_ERROR] = request.cache_masked_error
    return attributes


def _log_entry(
    observation: RequestObservation,
    status: int,
    error_type: str | None,
    policy: str | None,
    request: ProxyRequest | None,
    config_version: str,
    elapsed: float,
) -> dict[str, Any]:
    span_context = observation.span.get_span_context()
    entry = {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "trace_id": format(span_context.trace_id, "032x") if span_context.is_valid else None,
        "request_id": observation.request_id,
        "method": observation.method,
        "host": observation.host,
        "path": redact_query(
            request.policy.redact_path(observation.path_qs) if request is not None else observation.path_qs
        ),
        "status": status,
        "attempts": request.attempts if request is not None else 0,
        "retry_reasons": [r.reason for r in request.retries] if request is not None else [],
        "duration_ms": round(elapsed * 1000, 3),
        "policy": policy,
        "upstream": str(request.target) if request is not None else None,
        "error_type": error_type,
        "replayed": request.replayed if request is not None else False,
        "config_version": config_version,
        "fallback": request.fallback if request is not None else None,
        "fault": request.fault if request is not None else None,
    }
    if request is not None and request.delivery_id is not None:  # only accepted deliveries' lines
        entry["delivery_id"] = request.delivery_id
    if request is not None and request.cache_result is not None:  # only cached policies' lines
        entry["cache"] = request.cache_result
        if request.cache_masked_error is not None:
            entry["cache_masked_error"] = request.cache_masked_error
    return entry
