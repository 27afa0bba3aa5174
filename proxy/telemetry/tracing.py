"""Spans by hand (ARCHITECTURE.md): one SERVER span per inbound request continuing the app's W3C
``traceparent``, one CLIENT span per attempt (in the attempt layer) whose context goes upstream.

Export is batched on the SDK's own thread, so a slow or absent collector never blocks a request.
A span that does not record (no exporter, or not sampled) costs no attributes, URLs or redaction:
callers start it bare and add attributes only when `is_recording()` says someone will read them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from proxy.config.model import Telemetry as TelemetrySettings
from proxy.config.model import is_valid_host
from proxy.target import RequestTarget
from proxy.telemetry.names import ATTR_REQUEST_ID, TRACEPARENT_HEADER, redact_query

_W3C = TraceContextTextMapPropagator()


def _exporter(settings: TelemetrySettings) -> SpanExporter | None:
    """The OTLP/HTTP exporter, imported only when traces go somewhere (it costs ~4 MiB of RSS)."""
    from_env = bool(
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )
    if not settings.traces.endpoint and not from_env:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    if settings.traces.endpoint:
        return OTLPSpanExporter(endpoint=settings.traces.endpoint)
    return OTLPSpanExporter()


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


def extract_context(headers: Mapping[str, str]) -> Context:
    """The app's trace context from its ``traceparent``/``tracestate`` (empty when it sent none)."""
    return _W3C.extract(headers)


def inject_context(headers: MutableMapping[str, str] | Any, context: Context) -> None:
    _W3C.inject(headers, context=context)


def unrecorded_traceparent(span: trace.Span, parent: Context) -> str | None:
    """What to send upstream for a request whose SERVER span does not record: None when the span is
    the app's own context (the app's ``traceparent`` then goes upstream untouched), else ours,
    formatted once per request (a sampled-out trace still tells the provider it was not sampled)."""
    if not span.get_span_context().is_valid or trace.get_current_span(parent) is span:
        return None
    return _traceparent(span)


def recorded_traceparent(span: trace.Span) -> str | None:
    """The ``traceparent`` naming `span`, kept for a link made later (each attempt of a stored
    delivery links to the request that was accepted); None when the span records nothing."""
    if not span.is_recording() or not span.get_span_context().is_valid:
        return None
    return _traceparent(span)


def _traceparent(span: trace.Span) -> str | None:
    carrier: dict[str, str] = {}
    inject_context(carrier, trace.set_span_in_context(span))
    return carrier.get(TRACEPARENT_HEADER)


def full_url(target: RequestTarget, redact_path: Callable[[str], str] | None = None) -> str:
    """The URL the app asked for, as spans may show it: query values and path secrets redacted."""
    path_qs = redact_path(target.path_qs) if redact_path is not None else target.path_qs
    return f"{target.scheme}://{target.authority}{redact_query(path_qs)}"


def server_attributes(method: str, request_id: str, target: RequestTarget) -> dict[str, Any]:
    """The SERVER span's request attributes (only built for a recording span)."""
    attributes: dict[str, Any] = {"http.request.method": method, ATTR_REQUEST_ID: [request_id]}
    if target.host and is_valid_host(target.host):
        attributes["url.full"] = full_url(target)
        attributes["server.address"] = target.host
        attributes["server.port"] = target.port or (443 if target.scheme == "https" else 80)
    return attributes
