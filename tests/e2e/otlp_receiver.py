"""A real OTLP/HTTP trace collector on 127.0.0.1 for the tracing tests.

`OtlpReceiver` is an aiohttp server accepting ``POST /v1/traces`` with a
protobuf ``ExportTraceServiceRequest`` body (optionally gzip-encoded, as the
SDK's exporter may send it). Every span is decoded into an `ExportedSpan`
with hex ids, plain-Python attribute values, events and its resource's
attributes, so tests can assert on exactly what reached the collector.

Outrigger exports through a `BatchSpanProcessor`, i.e. later and on another
thread: `wait_for_spans` polls (bounded) until the expected spans arrived.
"""

from __future__ import annotations

import asyncio
import gzip
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

SPAN_KIND_SERVER = Span.SpanKind.SPAN_KIND_SERVER
SPAN_KIND_CLIENT = Span.SpanKind.SPAN_KIND_CLIENT
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
    def event_names(self) -> list[str]:
        return [event.name for event in self.events]


def decode(body: bytes) -> list[ExportedSpan]:
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


@dataclass
class OtlpReceiver:
    """`POST /v1/traces` on 127.0.0.1:`port` (0: any free port); collects every span it is sent."""

    port: int = 0
    spans: list[ExportedSpan] = field(default_factory=list)
    exports: int = 0
    """How many export requests arrived."""
    raw_bodies: list[bytes] = field(default_factory=list)
    """Every decoded (un-gzipped) protobuf body, for greps that must not depend on the decoder."""
    _runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    async def _traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        encoding = request.headers.get("Content-Encoding", "").lower()
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        self.exports += 1
        self.raw_bodies.append(body)
        self.spans.extend(decode(body))
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf"
        )

    async def start(self) -> OtlpReceiver:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._traces)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        addresses = self._runner.addresses
        assert addresses, "the receiver is not listening"
        self.port = int(addresses[0][1])
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait_for_spans(
        self,
        predicate: Callable[[list[ExportedSpan]], bool],
        *,
        within: float = 10.0,
        interval: float = 0.05,
    ) -> list[ExportedSpan]:
        """Poll until `predicate(all spans so far)` holds; fails with what arrived after `within` s."""
        deadline = time.monotonic() + within
        for _ in range(int(within / interval) + 2):
            if predicate(self.spans):
                return list(self.spans)
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(interval)
        raise AssertionError(
            f"expected spans did not arrive within {within}s; got {len(self.spans)}: "
            + "; ".join(f"{s.name}/{s.kind} {s.attributes}" for s in self.spans)
        )

    def in_trace(self, trace_id: str) -> list[ExportedSpan]:
        return [span for span in self.spans if span.trace_id == trace_id]

    def servers(self) -> list[ExportedSpan]:
        return [span for span in self.spans if span.is_server]

    def clients(self) -> list[ExportedSpan]:
        return [span for span in self.spans if span.is_client]
