"""Telemetry of the webhook listener: one SERVER span, one access log line and the
``outrigger_webhooks_total{route,result}`` sample per inbound webhook request.

Nothing here sees a signature or a key: the listener passes the route, the result and the
provider's event id only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from multidict import MultiMapping
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import Counter

from proxy.telemetry import Telemetry, new_request_id
from proxy.telemetry.access_log import encode_line
from proxy.telemetry.names import (
    ATTR_CONFIG_VERSION,
    ATTR_REQUEST_ID,
    ATTR_WEBHOOK_EVENT_ID,
    ATTR_WEBHOOK_RESULT,
    ATTR_WEBHOOK_ROUTE,
    ATTR_WEBHOOK_SCHEME,
    REQUEST_ID_HEADER,
    redact_query,
)
from proxy.telemetry.tracing import extract_context

LISTENER = "webhooks"
"""The access log's ``listener`` field on webhook lines (proxy lines have none)."""


@dataclass
class WebhookObservation:
    method: str
    path: str
    """The request path with query values redacted."""
    request_id: str
    span: trace.Span
    started: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class WebhookOutcome:
    status: int
    error_type: str | None
    route: str | None
    """None when no route has the path (404): such requests get no metric sample."""
    scheme: str | None = None
    result: str | None = None
    """The ``result`` label (values listed at `names.ATTR_WEBHOOK_RESULT`); None for answers
    outside them (405, 408)."""
    event_id: str | None = None


class WebhookTelemetry:
    def __init__(self, telemetry: Telemetry) -> None:
        self._telemetry = telemetry
        self._samples: dict[tuple[str, str], Counter] = {}
        """Bound children per (route, result): both come from the config and a fixed list."""

    def start(self, method: str, raw_path: str, headers: MultiMapping[str]) -> WebhookObservation:
        request_id = headers.get(REQUEST_ID_HEADER) or new_request_id()
        path = redact_query(raw_path)
        span = self._telemetry.tracer.start_span(
            method, context=extract_context(headers), kind=SpanKind.SERVER
        )
        if span.is_recording():
            span.set_attributes(
                {
                    "http.request.method": method,
                    "url.path": path.partition("?")[0],
                    ATTR_REQUEST_ID: [request_id],
                }
            )
        return WebhookObservation(method, path, request_id, span)

    def finish(self, observation: WebhookObservation, outcome: WebhookOutcome, config_version: str) -> None:
        elapsed = time.perf_counter() - observation.started
        if outcome.route is not None and outcome.result is not None:
            self._sample(outcome.route, outcome.result).inc()
        span = observation.span
        if span.is_recording():
            span.set_attributes(_attributes(outcome, config_version))
            if outcome.route is not None:
                span.update_name(f"{observation.method} {outcome.route}")
            if outcome.status >= 500:
                span.set_status(StatusCode.ERROR)
            span.end()
        if self._telemetry.settings.access_log:
            self._telemetry.access_log.write(
                encode_line(_log_entry(observation, outcome, config_version, elapsed))
            )

    def _sample(self, route: str, result: str) -> Counter:
        child = self._samples.get((route, result))
        if child is None:
            child = self._samples[(route, result)] = self._telemetry.metrics.webhooks.labels(route, result)
        return child


def _attributes(outcome: WebhookOutcome, config_version: str) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "http.response.status_code": outcome.status,
        ATTR_CONFIG_VERSION: config_version,
    }
    optional = {
        "http.route": outcome.route,
        ATTR_WEBHOOK_ROUTE: outcome.route,
        ATTR_WEBHOOK_SCHEME: outcome.scheme,
        ATTR_WEBHOOK_RESULT: outcome.result,
        ATTR_WEBHOOK_EVENT_ID: outcome.event_id,
        "error.type": outcome.error_type,
    }
    attributes.update({name: value for name, value in optional.items() if value is not None})
    return attributes


def _log_entry(
    observation: WebhookObservation, outcome: WebhookOutcome, config_version: str, elapsed: float
) -> dict[str, Any]:
    span_context = observation.span.get_span_context()
    return {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "trace_id": format(span_context.trace_id, "032x") if span_context.is_valid else None,
        "request_id": observation.request_id,
        "listener": LISTENER,
        "method": observation.method,
        "path": observation.path,
        "status": outcome.status,
        "duration_ms": round(elapsed * 1000, 3),
        "route": outcome.route,
        "scheme": outcome.scheme,
        "result": outcome.result,
        "event_id": outcome.event_id,
        "error_type": outcome.error_type,
        "config_version": config_version,
    }
