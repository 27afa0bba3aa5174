"""A real OTLP/HTTP trace collector on 127.0.0.1 for the tracing tests.

`OtlpReceiver` is an aiohttp server accepting ``POST /v1/traces`` with a
protobuf ``ExportTraceServiceRequest`` body (optionally gzip-encoded, as the
SDK's exporter may send it). Every span is decoded (proxy/telemetry/otlp_decode.py,
shared with the demo's trace printer) into an `ExportedSpan` with hex ids,
plain-Python attribute values, events and its resource's attributes, so tests
can assert on exactly what reached the collector.

Outrigger exports through a `BatchSpanProcessor`, i.e. later and on another
thread: `wait_for_spans` polls (bounded) until the expected spans arrived.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from proxy.telemetry.otlp_decode import (
    STATUS_CODE_ERROR,
    ExportedEvent,
    ExportedSpan,
    decode,
    unpack,
)

__all__ = ["STATUS_CODE_ERROR", "ExportedEvent", "ExportedSpan", "OtlpReceiver"]


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
        body = unpack(await request.read(), request.headers.get("Content-Encoding", ""))
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
