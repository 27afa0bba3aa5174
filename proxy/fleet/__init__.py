"""Fleet mode (SPEC 12): rate limits and breakers shared through Redis by every sidecar.

`breaker` and `limiter` build a policy's state for its ``scope``; the pipeline calls nothing else.
"""

from __future__ import annotations

from proxy.clock import Clock
from proxy.config.model import CircuitBreakerSettings, RateLimit
from proxy.fleet.backend import FleetBackend, FleetUnavailable
from proxy.fleet.breaker import FleetBreaker
from proxy.fleet.limiter import FleetBucket
from proxy.layers.breaker import CircuitBreaker
from proxy.layers.ratelimit import RateLimiter

__all__ = ["FleetBackend", "FleetUnavailable", "breaker", "limiter"]


def breaker(
    name: str, settings: CircuitBreakerSettings, clock: Clock, fleet: FleetBackend | None
) -> CircuitBreaker:
    if settings.scope == "fleet" and fleet is not None:
        return FleetBreaker(fleet, name, settings, clock)
    return CircuitBreaker(name, settings, clock)


def limiter(name: str, settings: RateLimit, clock: Clock, fleet: FleetBackend | None) -> RateLimiter:
    shared = FleetBucket(fleet, name, settings) if settings.scope == "fleet" and fleet is not None else None
    return RateLimiter(name, settings, clock, shared=shared)
