"""Regressions found by the second code review (unit level)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from multidict import CIMultiDict, CIMultiDictProxy
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from proxy.config.model import Telemetry as TelemetrySettings
from proxy.exchange import ProxyResponse
from proxy.layers import retry as retry_module
from proxy.layers.idempotency import IdempotencyLayer, ReplayCache
from proxy.target import parse_target
from proxy.telemetry import Telemetry
from tests.fakes import FakeClock, fake_upstream, make_request, settings_from


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


async def test_a_pending_request_is_never_evicted_so_duplicates_wait() -> None:
    """Stored entries may be evicted under memory pressure; the in-flight marker may not."""
    settings = settings_from(
        idempotency={"replay": {"max_entries": 100, "max_body_bytes": "100B", "max_total_bytes": "100B"}}
    )
    assert settings.idempotency is not None
    assert settings.idempotency.replay is not None
    cache = ReplayCache(settings.idempotency.replay, FakeClock())
    layer = IdempotencyLayer(settings.idempotency, cache)
    gate = asyncio.Event()
    slow = fake_upstream(200, gate=gate)

    def send(key: str, upstream: object) -> asyncio.Task[ProxyResponse]:
        request = make_request("POST", "/v1/x", {"Idempotency-Key": key}, b"a=1", settings=settings)
        return asyncio.ensure_future(layer(request, upstream))  # type: ignore[arg-type]

    first = send("held", slow)
    await asyncio.sleep(0.01)
    filler = fake_upstream(*[(200, {}, b"x" * 40) for _ in range(3)])
    for key in ("f1", "f2", "f3"):  # each stored response pushes older entries out
        await send(key, filler)
    duplicate = send("held", slow)
    await asyncio.sleep(0.01)
    gate.set()
    await asyncio.gather(first, duplicate)
    assert slow.calls == 1, "the concurrent duplicate waited for the first instead of calling again"


async def test_a_stalled_discarded_body_does_not_delay_the_retry() -> None:
    class Stalling:
        released = False

        async def chunks(self) -> AsyncIterator[bytes]:
            yield b"0123456789"
            await asyncio.sleep(30)

        def release(self) -> None:
            self.released = True

    body = Stalling()
    response = ProxyResponse(503, CIMultiDict({"Content-Length": "100", "Retry-After": "1"}), body)
    started = asyncio.get_running_loop().time()
    settled = await retry_module._settle(response)
    assert asyncio.get_running_loop().time() - started < 1.5
    assert body.released
    assert settled.status == 503
    assert settled.headers["Retry-After"] == "1"
    assert settled.headers["Content-Length"] == "0"
    assert b"".join([c async for c in settled.body.chunks()]) == b""
