"""The SPEC 8 Prometheus metrics, on a registry of our own (one per process).

Label lookups (`Counter.labels(...)`) hash, validate and lock on every call, so
requests never make them: each policy gets a `PolicyMetrics` once, holding the
children already bound to its `host` label (and small caches for the rest).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from proxy.telemetry.names import CIRCUIT_STATE_VALUES, method_label

disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series next to every counter


class _BreakerView(Protocol):
    @property
    def state(self) -> str: ...


class _QuotaView(Protocol):
    @property
    def limit(self) -> int | None: ...

    @property
    def remaining(self) -> int | None: ...


class _LimiterView(Protocol):
    @property
    def quota(self) -> _QuotaView | None: ...

    def queue_lengths(self) -> Mapping[str, int]: ...


class _KeyPoolView(Protocol):
    def counts(self) -> Mapping[str, int]: ...


class LiveState(Protocol):
    """What telemetry reads of one policy's live state. The pipeline's `PolicyState` fits it, so
    the dependency runs from pipeline to telemetry only."""

    @property
    def breaker(self) -> _BreakerView | None: ...

    @property
    def limiter(self) -> _LimiterView | None: ...

    @property
    def key_pool(self) -> _KeyPoolView | None: ...


States = Callable[[], Mapping[str, LiveState]]


class _StateCollector(Collector):
    """Gauges read at scrape time from the live per-policy state (no bookkeeping on the hot path)."""

    def __init__(self, states: States) -> None:
        self._states = states

    def collect(self) -> Iterable[GaugeMetricFamily]:
        circuit = GaugeMetricFamily(
            "outrigger_circuit_state",
            "Circuit breaker state (0 closed, 1 half-open, 2 open)",
            labels=["host"],
        )
        remaining = GaugeMetricFamily(
            "outrigger_upstream_ratelimit_remaining",
            "Requests left in the provider's quota, as last reported by its RateLimit headers",
            labels=["host"],
        )
        limit = GaugeMetricFamily(
            "outrigger_upstream_ratelimit_limit",
            "The provider's quota size, as last reported by its RateLimit headers",
            labels=["host"],
        )
        keys = GaugeMetricFamily(
            "outrigger_credential_keys",
            "API keys of a policy's key pool, by state (ready, resting)",
            labels=["host", "state"],
        )
        queued = GaugeMetricFamily(
            "outrigger_ratelimit_queued",
            "Requests waiting for a rate-limit token, by x-outrigger-priority",
            labels=["host", "priority"],
        )
        for name, state in self._states().items():
            if state.key_pool is not None:
                for key_state, count in state.key_pool.counts().items():
                    keys.add_metric([name, key_state], count)
            if state.breaker is not None:
                circuit.add_metric([name], CIRCUIT_STATE_VALUES[state.breaker.state])
            if state.limiter is not None:
                for priority, length in state.limiter.queue_lengths().items():
                    queued.add_metric([name, priority], length)
            quota = state.limiter.quota if state.limiter is not None else None
            if quota is not None and quota.remaining is not None:
                remaining.add_metric([name], quota.remaining)
            if quota is not None and quota.limit is not None:
                limit.add_metric([name], quota.limit)
        yield from (circuit, remaining, limit, keys, queued)


class _FleetCollector(Collector):
    def __init__(self, up: Callable[[], bool]) -> None:
        self._up = up

    def collect(self) -> Iterable[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "outrigger_fleet_backend_up",
            "1 while the fleet's Redis answers; 0 while each sidecar runs on its local state",
            value=1 if self._up() else 0,
        )


RATELIMIT_WAIT_BUCKETS = (0.0, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The metric families; requests record through `PolicyMetrics`, never through `.labels()`."""

    def __init__(self, states: States) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "outrigger_requests", "Requests answered", ["host", "method", "code"], registry=r
        )
        self.duration = Histogram(
            "outrigger_request_duration_seconds",
            "Time to answer a request, body included",
            ["host"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
            registry=r,
        )
        self.attempts = Counter("outrigger_attempts", "Upstream attempts", ["host", "outcome"], registry=r)
        self.retries = Counter(
            "outrigger_retries", "Retries, by the condition that caused them", ["host", "reason"], registry=r
        )
        self.rejections = Counter(
            "outrigger_rejections", "Requests or retries refused locally", ["host", "type"], registry=r
        )
        self.ratelimit_wait = Histogram(
            "outrigger_ratelimit_wait_seconds",
            "Time spent waiting for rate-limit tokens per request",
            ["host"],
            buckets=RATELIMIT_WAIT_BUCKETS,
            registry=r,
        )
        self.ratelimit_queue_wait = Histogram(
            "outrigger_ratelimit_queue_wait_seconds",
            "Time spent waiting for rate-limit tokens per request, by x-outrigger-priority",
            ["host", "priority"],
            buckets=RATELIMIT_WAIT_BUCKETS,
            registry=r,
        )
        self.keys_injected = Counter(
            "outrigger_idempotency_keys_injected", "Idempotency keys added by Outrigger", ["host"], registry=r
        )
        self.reloads = Counter("outrigger_config_reloads", "Config reloads", ["result"], registry=r)
        self.tunnels = Counter(
            "outrigger_tunnels", "CONNECT tunnels, by how they ended", ["host", "result"], registry=r
        )
        self.tunnel_bytes = Counter(
            "outrigger_tunnel_bytes",
            "Bytes through CONNECT tunnels and upgraded (WebSocket) connections",
            ["host", "direction"],
            registry=r,
        )
        self.access_log_dropped = Counter(
            "outrigger_access_log_dropped",
            "Access log lines dropped because stdout could not keep up",
            registry=r,
        )
        self.fallbacks = Counter(
            "outrigger_fallbacks",
            "Requests answered with the declared fallback, by the failure it replaced",
            ["host", "reason"],
            registry=r,
        )
        self.faults_injected = Counter(
            "outrigger_faults_injected", "Faults injected by drills", ["host", "kind"], registry=r
        )
        self.failovers = Counter(
            "outrigger_failovers",
            "Attempts that moved to another upstream (open breaker or a failover.on outcome)",
            ["host", "upstream"],
            registry=r,
        )
        self.cache = Counter(
            "outrigger_cache",
            "Answers of cached policies: hit, miss, stale, revalidated or bypass",
            ["host", "result"],
            registry=r,
        )
        self.webhooks = Counter(
            "outrigger_webhooks",
            "Inbound webhook requests that matched a route, by result",
            ["route", "result"],
            registry=r,
        )
        r.register(_StateCollector(states))

    def watch_fleet(self, up: Callable[[], bool]) -> None:
        """Expose ``outrigger_fleet_backend_up`` (only a sidecar in fleet mode has one)."""
        self.registry.register(_FleetCollector(up))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class PolicyMetrics:
    """One `host` label's metric children, bound once and reused by every request of that policy.

    The per-label caches stay small: methods are folded by `method_label`, codes, outcomes,
    retry reasons and rejection types are bounded sets.
    """

    def __init__(self, metrics: Metrics, label: str) -> None:
        self._metrics = metrics
        self.label = label
        self.duration = metrics.duration.labels(label)
        self.ratelimit_wait = metrics.ratelimit_wait.labels(label)
        self.keys_injected = metrics.keys_injected.labels(label)
        self._requests: dict[tuple[str, int], Counter] = {}
        self._attempts: dict[str, Counter] = {}
        self._retries: dict[str, Counter] = {}
        self._rejections: dict[str, Counter] = {}
        self._fallbacks: dict[str, Counter] = {}
        self._faults: dict[str, Counter] = {}
        self._failovers: dict[str, Counter] = {}
        self._cache: dict[str, Counter] = {}
        self._queue_wait: dict[str, Histogram] = {}

    def requests(self, method: str, status: int) -> Counter:
        key = (method_label(method), status)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self._metrics.requests.labels(self.label, key[0], str(status))
        return child

    def attempts(self, outcome: str) -> Counter:
        return _child(self._attempts, self._metrics.attempts, self.label, outcome)

    def retries(self, reason: str) -> Counter:
        return _child(self._retries, self._metrics.retries, self.label, reason)

    def rejections(self, kind: str) -> Counter:
        return _child(self._rejections, self._metrics.rejections, self.label, kind)

    def fallbacks(self, reason: str) -> Counter:
        return _child(self._fallbacks, self._metrics.fallbacks, self.label, reason)

    def faults(self, kind: str) -> Counter:
        return _child(self._faults, self._metrics.faults_injected, self.label, kind)

    def failovers(self, upstream: str) -> Counter:
        """Bounded: upstreams are the policy's configured ones."""
        return _child(self._failovers, self._metrics.failovers, self.label, upstream)

    def cache(self, result: str) -> Counter:
        return _child(self._cache, self._metrics.cache, self.label, result)

    def ratelimit_queue_wait(self, priority: str) -> Histogram:
        """Bounded: the three priorities."""
        return _child(self._queue_wait, self._metrics.ratelimit_queue_wait, self.label, priority)


_Family = TypeVar("_Family", Counter, Histogram)


def _child(cache: dict[str, _Family], family: _Family, label: str, value: str) -> _Family:
    child = cache.get(value)
    if child is None:
        child = cache[value] = family.labels(label, value)
    return child
