"""One attempt: header rules (with rendered secrets) and the CLIENT span (the transport times it).

Each attempt gets its own span, child of the request's SERVER span, and its
context is injected as ``traceparent`` so the provider's trace joins ours.
The span ends when the attempt's response body is released. When the SERVER
span does not record (no exporter, or not sampled) an attempt makes no span
at all: the request's one precomputed ``traceparent`` (or the app's own) goes upstream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from proxy import errors, secrets
from proxy.config.model import HeaderRules
from proxy.exchange import Handler, HeaderEdits, ProxyRequest, ProxyResponse, ReleasingBody
from proxy.telemetry.names import (
    ATTR_RETRY_BACKOFF_MS,
    ATTR_RETRY_REASON,
    TRACEPARENT_HEADER,
    outcome_label,
    redact_query,
)
from proxy.telemetry.tracing import inject_context

_NOT_TRACED = trace.NoOpTracer()


def render_rules(headers: HeaderRules, base_dir: Path) -> HeaderEdits:
    """Header rules with their secrets read now (a rotated file makes a reload rebuild them)."""
    return HeaderEdits(
        headers.remove, tuple((name, secrets.render(value, base_dir)) for name, value in headers.set.items())
    )


class AttemptLayer:
    def __init__(self, headers: HeaderRules, base_dir: Path, tracer: trace.Tracer = _NOT_TRACED) -> None:
        self.edits = render_rules(headers, base_dir)
        self.tracer = tracer

    async def __call__(self, request: ProxyRequest, next: Handler) -> ProxyResponse:
        edits = self.edits
        if request.failover is not None and request.failover.edits is not None:
            edits = request.failover.edits  # a failover upstream's own rules replace the policy's
        for name in edits.remove:
            request.headers.popall(name, None)
        for name, value in edits.set:
            request.headers[name] = value
        request.attempts += 1
        span = self._start_span(request)
        try:
            response = await next(request)
        except errors.OutriggerError as error:
            _fail(request, span, error)
            raise
        except BaseException:
            if span is not None:
                span.end()
            raise
        request.attempt_outcomes.append(outcome_label(response.status, None))
        if span is not None:
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 400:  # semconv: a CLIENT span is in error for 4xx too
                span.set_attribute("error.type", str(response.status))
                span.set_status(StatusCode.ERROR)
            response.body = ReleasingBody(response.body, span.end)
        return response

    def _start_span(self, request: ProxyRequest) -> trace.Span | None:
        """The attempt's CLIENT span, injected upstream; None (and no span work) when not traced."""
        if not request.traced:
            if request.traceparent is not None:
                request.headers[TRACEPARENT_HEADER] = request.traceparent
            return None
        span = self.tracer.start_span(request.method, context=request.trace_context, kind=SpanKind.CLIENT)
        if span.is_recording():
            span.set_attributes(_attributes(request))
        inject_context(request.headers, trace.set_span_in_context(span))
        return span


def _attributes(request: ProxyRequest) -> dict[str, Any]:
    target = request.target
    attributes: dict[str, Any] = {
        "http.request.method": request.method,
        "url.full": f"{target.scheme}://{target.authority}{redact_query(request.policy.redact_path(request.path_qs))}",
        "server.address": target.host,
        "server.port": target.port,
    }
    if request.attempts > 1:
        attributes["http.request.resend_count"] = request.attempts - 1
        if request.retries:
            attributes[ATTR_RETRY_REASON] = request.retries[-1].reason
            attributes[ATTR_RETRY_BACKOFF_MS] = round(request.retries[-1].delay * 1000, 3)
    return attributes


def _fail(request: ProxyRequest, span: trace.Span | None, error: errors.OutriggerError) -> None:
    request.attempt_outcomes.append(outcome_label(None, error.condition or error.error_type))
    if span is None:
        return
    span.set_attribute("error.type", error.condition or error.error_type)
    span.set_status(StatusCode.ERROR)  # the message may name the upstream URL: the type says enough
    span.end()
