"""What telemetry makes of a cached policy's request: span attributes, metric, log fields."""

from __future__ import annotations

import io
import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from proxy.telemetry import ATTR_CACHE, ATTR_CACHE_MASKED_ERROR, Telemetry
from tests.conftest import RecordingTelemetry
from tests.fakes import finish_request, make_request


def samples(telemetry: Telemetry, family: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = telemetry.metrics.exposition().decode()
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for metric in text_string_to_metric_families(text)
        if metric.name == family
        for sample in metric.samples
    }


def log_lines(telemetry: Telemetry, stream: io.BytesIO) -> list[dict[str, Any]]:
    telemetry.access_log.flush()
    return [json.loads(line) for line in stream.getvalue().decode().splitlines()]


def test_a_stale_answer_shows_its_result_and_the_failure_it_masked(
    recording_telemetry: RecordingTelemetry,
) -> None:
    telemetry, exporter, stream = (
        recording_telemetry.telemetry,
        recording_telemetry.exporter,
        recording_telemetry.stream,
    )
    request = make_request()
    request.cache_result, request.cache_masked_error = "stale", "circuit_open"
    finish_request(telemetry, request)

    (span,) = exporter.get_finished_spans()
    attributes = dict(span.attributes or {})
    assert (attributes[ATTR_CACHE], attributes[ATTR_CACHE_MASKED_ERROR]) == ("stale", "circuit_open")
    (event,) = span.events
    assert (event.name, dict(event.attributes or {})) == ("stale_if_error", {"error.type": "circuit_open"})
    assert samples(telemetry, "outrigger_cache") == {(("host", "api.test"), ("result", "stale")): 1.0}
    rejections = samples(telemetry, "outrigger_rejections")
    assert rejections == {(("host", "api.test"), ("type", "circuit_open")): 1.0}  # the breaker did refuse
    (line,) = log_lines(telemetry, stream)
    assert (line["cache"], line["cache_masked_error"]) == ("stale", "circuit_open")


def test_an_uncached_policys_request_records_nothing_about_the_cache(
    recording_telemetry: RecordingTelemetry,
) -> None:
    telemetry, exporter, stream = (
        recording_telemetry.telemetry,
        recording_telemetry.exporter,
        recording_telemetry.stream,
    )
    finish_request(telemetry, make_request())

    (span,) = exporter.get_finished_spans()
    assert ATTR_CACHE not in (span.attributes or {})
    assert samples(telemetry, "outrigger_cache") == {}
    (line,) = log_lines(telemetry, stream)
    assert "cache" not in line
