"""Telemetry that costs nothing when nobody looks: unrecorded spans build no attributes, metric
children are bound once per policy, the access log never blocks, and the target is parsed once."""

from __future__ import annotations

import io
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families

import proxy.telemetry as telemetry_module
from proxy.config.model import Telemetry as TelemetrySettings
from proxy.exchange import RetryRecord
from proxy.layers import attempt as attempt_module
from proxy.layers.attempt import AttemptLayer
from proxy.target import RequestTarget, parse_target
from proxy.telemetry import RequestObservation, Telemetry, new_request_id
from proxy.telemetry.access_log import AccessLogWriter
from proxy.telemetry.tracing import inject_context, server_attributes
from tests.fakes import fake_upstream, make_request

APP_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
APP_TRACEPARENT = f"00-{APP_TRACE}-00f067aa0ba902b7-01"


def _headers(**values: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(values))


def _telemetry(tracer: trace.Tracer, stream: io.BytesIO | None = None) -> Telemetry:
    telemetry = Telemetry(TelemetrySettings(), dict, stream or io.BytesIO())
    telemetry.tracing.tracer = tracer
    return telemetry


def _sampled_out() -> trace.Tracer:
    return TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.0))).get_tracer("test")


class _Spy:
    """Stands in for an attribute builder and counts the calls (then does the real work)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.calls = 0

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        return self.real(*args)


@pytest.fixture
def attribute_spies(monkeypatch: pytest.MonkeyPatch) -> dict[str, _Spy]:
    spies = {
        "server": _Spy(server_attributes),
        "finish": _Spy(telemetry_module._attributes),
        "client": _Spy(attempt_module._attributes),
        "inject": _Spy(inject_context),
    }
    monkeypatch.setattr(telemetry_module, "server_attributes", spies["server"])
    monkeypatch.setattr(telemetry_module, "_attributes", spies["finish"])
    monkeypatch.setattr(attempt_module, "_attributes", spies["client"])
    monkeypatch.setattr(attempt_module, "inject_context", spies["inject"])
    return spies


async def _one_request(telemetry: Telemetry, traceparent: str | None) -> tuple[RequestObservation, list[str]]:
    """One request with two attempts through the real AttemptLayer; returns what went upstream."""
    headers = {"traceparent": traceparent} if traceparent else {}
    observation = telemetry.start("GET", _headers(**headers), parse_target("/v1?token=x", "api.test"))
    request = make_request(path_qs="/v1?token=x", headers=headers)
    request.trace_context = observation.context
    request.traced = observation.context is not None
    request.traceparent = observation.traceparent
    layer = AttemptLayer(request.settings.headers, Path("."), telemetry.tracer)
    upstream = fake_upstream(503, 200)
    for _ in range(2):
        (await layer(request, upstream)).body.release()
    telemetry.finish(
        observation,
        status=200,
        error_type=None,
        policy="api.test",
        request=request,
        state=None,
        config_version="v",
    )
    sent = [value for seen in upstream.attempts for value in seen.headers.getall("traceparent", [])]
    return observation, sent


# --------------------------------------------------------------------------- spans nobody records


@pytest.mark.parametrize("tracer", [trace.NoOpTracer(), _sampled_out()], ids=["no-export", "sampled-out"])
async def test_unrecorded_requests_build_no_span_attributes(
    tracer: trace.Tracer, attribute_spies: dict[str, _Spy]
) -> None:
    observation, _ = await _one_request(_telemetry(tracer), None)

    assert not observation.span.is_recording()
    assert {name: spy.calls for name, spy in attribute_spies.items()} == {
        "server": 0,
        "finish": 0,
        "client": 0,
        "inject": 0,
    }


async def test_recorded_requests_still_build_every_attribute(attribute_spies: dict[str, _Spy]) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    await _one_request(_telemetry(provider.get_tracer("test")), None)

    assert {name: spy.calls for name, spy in attribute_spies.items()} == {
        "server": 1,
        "finish": 1,
        "client": 2,
        "inject": 2,
    }
    assert [span.kind for span in exporter.get_finished_spans()].count(SpanKind.CLIENT) == 2


async def test_without_export_the_apps_traceparent_goes_upstream_as_sent() -> None:
    observation, sent = await _one_request(_telemetry(trace.NoOpTracer()), APP_TRACEPARENT)

    assert format(observation.span.get_span_context().trace_id, "032x") == APP_TRACE  # for the log
    assert sent == [APP_TRACEPARENT, APP_TRACEPARENT]


async def test_a_sampled_out_trace_sends_one_unsampled_traceparent_on_every_attempt() -> None:
    observation, sent = await _one_request(_telemetry(_sampled_out()), None)

    context = observation.span.get_span_context()
    assert not context.trace_flags.sampled
    ours = f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
    assert observation.traceparent == ours
    assert sent == [ours, ours]


# --------------------------------------------------------------------------- metric children bound once


def test_metric_children_are_bound_once_per_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    telemetry = _telemetry(trace.NoOpTracer())

    def finish() -> None:
        request = make_request()
        request.attempts = 2
        request.attempt_outcomes = ["5xx", "2xx"]
        request.retries = [RetryRecord("503", 0.01)]
        request.events = ["retry_budget_exhausted"]
        request.idempotency_key_injected = True
        observation = telemetry.start("GET", _headers(), parse_target("/", "api.test"))
        telemetry.finish(
            observation, status=200, error_type=None, policy="api.test", request=request, state=None,
            config_version="v",
        )  # fmt: skip

    finish()
    bound = telemetry.policy_metrics("api.test")
    child = bound.requests("GET", 200)
    metrics = telemetry.metrics
    families = (metrics.requests, metrics.duration, metrics.attempts, metrics.retries, metrics.rejections)
    for family in (*families, metrics.keys_injected):
        monkeypatch.setattr(family, "labels", _no_lookups)
    for _ in range(3):
        finish()

    assert telemetry.policy_metrics("api.test") is bound
    assert bound.requests("GET", 200) is child
    assert child._value.get() == 4
    monkeypatch.undo()
    assert bound.requests("get", 200) is bound.requests("PURGE", 200)  # both OTHER: the cache stays bounded


def _no_lookups(*labels: str) -> None:
    raise AssertionError(f"labels{labels} looked up on the request path")


# --------------------------------------------------------------------------- the access log writer


class _StuckStream(io.BytesIO):
    """A stdout pipe nobody reads: `write` blocks until `unstick` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.unstick = threading.Event()

    def write(self, data: Any) -> int:
        self.entered.set()
        assert self.unstick.wait(10)
        return super().write(data)


def test_a_stuck_stdout_never_blocks_the_writer_and_drops_beyond_the_cap() -> None:
    stream = _StuckStream()
    drops: list[int] = []
    writer = AccessLogWriter(stream, on_drop=drops.append, max_pending=3)
    writer.write("first")
    assert stream.entered.wait(5)  # the thread holds "first" and is stuck writing it

    started = time.perf_counter()
    for index in range(10):
        writer.write(f"line-{index}")
    assert time.perf_counter() - started < 0.1

    assert writer.dropped == 7
    assert sum(drops) == 7
    stream.unstick.set()
    writer.close()
    assert stream.getvalue().decode().splitlines() == ["first", "line-0", "line-1", "line-2"]


def test_close_flushes_everything_and_a_later_write_starts_again() -> None:
    stream = io.BytesIO()
    writer = AccessLogWriter(stream)
    for index in range(1000):
        writer.write(f"{index}")
    writer.close()
    assert stream.getvalue().decode().splitlines() == [str(i) for i in range(1000)]
    writer.write("after")
    writer.close()
    assert stream.getvalue().decode().splitlines()[-1] == "after"


def test_lines_lost_to_a_closed_stdout_are_counted_in_the_metric() -> None:
    stream = io.BytesIO()
    stream.close()
    telemetry = _telemetry(trace.NoOpTracer(), stream)
    observation = telemetry.start("GET", _headers(), parse_target("/", "api.test"))
    telemetry.finish(
        observation, status=200, error_type=None, policy=None, request=None, state=None, config_version="v"
    )
    telemetry.close()
    text = telemetry.metrics.exposition().decode()
    samples = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples["outrigger_access_log_dropped_total"] == 1


def test_log_line_keeps_the_field_order_and_stays_one_line() -> None:
    stream = io.BytesIO()
    telemetry = _telemetry(trace.NoOpTracer(), stream)
    tricky = 'id "quoted" \\ back\nslash \u2028 é'
    observation = telemetry.start(
        "GET", _headers(**{"x-request-id": tricky}), parse_target("/p?q=1", "api.test")
    )
    telemetry.finish(
        observation, status=403, error_type="host_not_allowed", policy=None, request=None, state=None,
        config_version="v",
    )  # fmt: skip
    telemetry.access_log.flush()

    (line,) = stream.getvalue().decode().splitlines()
    entry = json.loads(line)
    assert list(entry) == [
        "time", "trace_id", "request_id", "method", "host", "path", "status", "attempts", "retry_reasons",
        "duration_ms", "policy", "upstream", "error_type", "replayed", "config_version",
        "fallback", "fault",
    ]  # fmt: skip
    assert entry["request_id"] == tricky
    assert line.isascii()


# --------------------------------------------------------------------------- the target, parsed once


@pytest.mark.parametrize(
    ("raw_target", "authority", "expected"),
    [
        ("/v1?x=1", "API.test.:8443", RequestTarget("http", "api.test", 8443, "/v1?x=1", False)),
        ("http://api.test/v1?x=1", "ignored", RequestTarget("http", "api.test", None, "/v1?x=1", True)),
        ("HTTPS://api.test", "", RequestTarget("https", "api.test", None, "/", True)),
        ("/x", "[::1]:8080", RequestTarget("http", "::1", 8080, "/x", False)),
        ("/x", "", RequestTarget("http", "", None, "/x", False)),
        (
            "/x",
            "u@api.test",
            RequestTarget("http", "api.test", None, "/x", False, "invalid host 'u@api.test'"),
        ),
        (
            "/x",
            "api.test:99999",
            RequestTarget("http", "api.test", None, "/x", False, "invalid host 'api.test:99999'"),
        ),
        (
            "*",
            "api.test",
            RequestTarget("http", "api.test", None, "*", False, "unsupported request target '*'"),
        ),
    ],
)
def test_parse_target(raw_target: str, authority: str, expected: RequestTarget) -> None:
    assert parse_target(raw_target, authority) == expected


def test_authority_brackets_ipv6_and_keeps_an_explicit_port() -> None:
    assert parse_target("/", "[::1]:8080").authority == "[::1]:8080"
    assert parse_target("/", "api.test").authority == "api.test"


def test_new_request_ids_are_distinct_version_4_uuids() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    for value in list(ids)[:50]:
        parsed = uuid.UUID(value)
        assert (parsed.version, parsed.variant, str(parsed)) == (4, uuid.RFC_4122, value)
