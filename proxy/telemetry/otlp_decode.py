"""OTLP/HTTP trace exports (protobuf ``ExportTraceServiceRequest``) as plain Python spans.

Why here: the demo's trace printer (demo/traces.py) and the tests' collector
(tests/e2e/otlp_receiver.py) read what Outrigger exported on the wire the same way. The
protobuf classes come with the OTLP exporter Outrigger already depends on.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

SPAN_KIND_SERVER = Span.SpanKind.SPAN_KIND_SERVER
SPAN_KIND_CLIENT = Span.SpanKind.SPAN_KIND_CLIENT
SPAN_KIND_CONSUMER = Span.SpanKind.SPAN_KIND_CONSUMER
STATUS_CODE_ERROR = 2


def any_value(value: AnyValue) -> Any:
    """An OTLP `AnyValue` as the Python value the SDK was given."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return attributes_of(value.kvlist_value.values)
    return getattr(value, kind)


def attributes_of(pairs: Iterable[KeyValue]) -> dict[str, Any]:
    return {pair.key: any_value(pair.value) for pair in pairs}


@dataclass(frozen=True)
class ExportedEvent:
    name: str
    attributes: dict[str, Any]


@dataclass(frozen=True)
class ExportedSpan:
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str | None
    attributes: dict[str, Any]
    events: tuple[ExportedEvent, ...]
    resource: dict[str, Any]
    status_code: int
    start_ns: int
    end_ns: int
    links: tuple[tuple[str, str], ...] = ()
    """Each linked span as (trace id, span id), hex."""

    @property
    def is_server(self) -> bool:
        return self.kind == SPAN_KIND_SERVER

    @property
    def is_client(self) -> bool:
        return self.kind == SPAN_KIND_CLIENT

    @property
    def is_consumer(self) -> bool:
        """A delivery attempt of a stored request (the root of a trace of its own)."""
        return self.kind == SPAN_KIND_CONSUMER

    @property
    def event_names(self) -> list[str]:
        return [event.name for event in self.events]

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def unpack(body: bytes, content_encoding: str) -> bytes:
    """The protobuf body of an export request (the SDK's exporter may gzip it)."""
    encoding = content_encoding.lower()
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    return body


def decode(body: bytes) -> list[ExportedSpan]:
    """Every span of one (unpacked) export request, with its resource's attributes."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans: list[ExportedSpan] = []
    for resource_spans in request.resource_spans:
        resource = attributes_of(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ExportedSpan(
                        name=span.name,
                        kind=span.kind,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex() or None,
                        attributes=attributes_of(span.attributes),
                        events=tuple(
                            ExportedEvent(event.name, attributes_of(event.attributes))
                            for event in span.events
                        ),
                        resource=resource,
                        status_code=span.status.code,
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        links=tuple((link.trace_id.hex(), link.span_id.hex()) for link in span.links),
                    )
                )
    return spans
