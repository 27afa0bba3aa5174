"""The Grafana dashboard and the alert rules query only series the proxy exports (or the SPEC
names the parallel delivery, fleet and credentials work exports), with the right types."""

from __future__ import annotations

import json
import re

from proxy import errors
from proxy.layers.retry import BUDGET_EXHAUSTED
from proxy.telemetry.metrics import Metrics
from tests.helm import CHART, one, render

SPEC_NAMES_BUILT_IN_PARALLEL = {
    "outrigger_deliveries": "gauge",  # SPEC 11 {source,state}
    "outrigger_deliveries_total": "counter",  # SPEC 11 {source,result}
    "outrigger_fleet_backend_up": "gauge",  # SPEC 12
    "outrigger_credential_keys": "gauge",  # SPEC 10 {host,state}
}
"""Not exported by proxy/telemetry/metrics.py yet: the branches that build them name them so."""


def exported_series() -> dict[str, str]:
    """Every series name /metrics can carry, with its kind: counter, gauge or histogram part."""
    series = dict(SPEC_NAMES_BUILT_IN_PARALLEL)
    for family in Metrics(dict).registry.collect():
        if family.type == "counter":
            series[f"{family.name}_total"] = "counter"
        elif family.type == "histogram":
            series.update({f"{family.name}{part}": "histogram" for part in ("_bucket", "_sum", "_count")})
        else:
            series[family.name] = family.type
    return series


def dashboard_expressions() -> list[str]:
    dashboard = json.loads((CHART / "dashboards" / "outrigger.json").read_text())
    queries = [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return queries + [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def alert_expressions() -> list[str]:
    values = {
        "metrics": {"prometheusRule": {"enabled": True, "runbookBaseUrl": "https://docs.example.com/sre.md"}}
    }
    (group,) = one(render(CHART, values), "PrometheusRule")["spec"]["groups"]
    return [rule["expr"] for rule in group["rules"]]


def rejection_types() -> set[str]:
    """The `type` values of outrigger_rejections_total: Outrigger's error types and the budget's."""
    types = {
        cls.error_type
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.OutriggerError)
    }
    return types | {BUDGET_EXHAUSTED}


def test_every_queried_metric_is_exported_and_rated_only_when_it_is_a_counter_or_histogram() -> None:
    series = exported_series()
    expressions = dashboard_expressions() + alert_expressions()
    used = {name for expr in expressions for name in re.findall(r"\boutrigger_\w+", expr)}
    assert used - set(series) == set()
    assert used >= {"outrigger_deliveries", "outrigger_deliveries_total", "outrigger_fleet_backend_up"}
    for expr in expressions:
        for name in re.findall(r"\b(?:rate|increase)\((outrigger_\w+)", expr):
            assert series[name] in {"counter", "histogram"}, expr
        for name in re.findall(r"histogram_quantile\([^,]+, sum by \([^)]*\) \(rate\((outrigger_\w+)", expr):
            assert name.endswith("_bucket"), expr


def test_the_dashboard_has_the_panels_sres_look_for() -> None:
    expressions = " ".join(dashboard_expressions())
    for series in (
        "outrigger_requests_total",
        "outrigger_rejections_total",
        "outrigger_attempts_total",
        "outrigger_circuit_state",
        "outrigger_ratelimit_wait_seconds_bucket",
        "outrigger_cache_total",
        "outrigger_deliveries",
        "outrigger_deliveries_total",
    ):
        assert series in expressions, series


def test_rejection_types_in_queries_are_ones_outrigger_counts() -> None:
    known = rejection_types()
    for expr in dashboard_expressions() + alert_expressions():
        for value in re.findall(r'\btype!?="([^"]+)"', expr):
            assert value in known, expr
    assert any(f'type="{BUDGET_EXHAUSTED}"' in e for e in alert_expressions())
