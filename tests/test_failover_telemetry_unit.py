"""What telemetry records of a failover: the SERVER span's `outrigger.upstream`, the access log's
`upstream` (who answered) and `outrigger_failovers_total{host,upstream}` (one per move)."""

from __future__ import annotations

import json

from prometheus_client.parser import text_string_to_metric_families

from proxy.config.model import UpstreamTarget
from proxy.exchange import FailoverState, ProxyRequest
from proxy.telemetry.names import ATTR_UPSTREAM
from tests.conftest import RecordingTelemetry
from tests.fakes import finish_request, make_request

EU = UpstreamTarget(scheme="https", host="api.eu.test", port=443)


def _failed_over() -> ProxyRequest:
    request = make_request()
    primary = request.target
    request.failover = FailoverState(primary, request.settings, request.headers.copy())
    request.failover.moves = [str(EU)]
    request.target = EU
    request.attempts = 2
    return request


def test_span_log_and_metric_name_the_upstream_that_answered(
    recording_telemetry: RecordingTelemetry,
) -> None:
    telemetry, exporter, stream = (
        recording_telemetry.telemetry,
        recording_telemetry.exporter,
        recording_telemetry.stream,
    )

    finish_request(telemetry, _failed_over())
    finish_request(telemetry, _failed_over())
    finish_request(telemetry, make_request())  # no failover section: no attribute, no count

    first, _, plain = exporter.get_finished_spans()
    assert dict(first.attributes or {})[ATTR_UPSTREAM] == "https://api.eu.test"
    assert ATTR_UPSTREAM not in dict(plain.attributes or {})
    telemetry.access_log.flush()
    lines = [json.loads(line) for line in stream.getvalue().decode().splitlines()]
    assert [line["upstream"] for line in lines] == [
        "https://api.eu.test",
        "https://api.eu.test",
        "http://api.test",
    ]
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(telemetry.metrics.exposition().decode())
        for s in family.samples
    }
    key = ("outrigger_failovers_total", (("host", "api.test"), ("upstream", "https://api.eu.test")))
    assert samples[key] == 2.0
