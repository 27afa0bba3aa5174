"""The one place the layer order is written (see ARCHITECTURE.md).

    concurrency  bulkhead: in-flight cap and bounded FIFO queue; sheds load before any work
    deadline     total timeout over everything below, retries and backoff included
    idempotency  key added once so every attempt shares it; optional replay cache
    retry        conditions, backoff with jitter, Retry-After, budget, replay buffer
    breaker      counts every attempt; open = fail fast (and retries stop)
    rate limit   every attempt takes a token; obeys the provider's rate-limit headers
    attempt      header rules with rendered secrets, per_try timeout
    upstream     SSRF-checked connect, TLS origination, pooled connection

A layer whose section is absent from the settings is not in the stack. State
that must outlive one request (budget, replay cache, breaker, bulkhead,
limiter) lives in `PolicyState`, one per policy, shared by its routes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.config.loader import Config
from proxy.config.model import Policy, PolicySettings
from proxy.exchange import Handler, Layer, ProxyRequest, ProxyResponse
from proxy.layers.attempt import AttemptLayer
from proxy.layers.breaker import BreakerLayer, CircuitBreaker
from proxy.layers.budget import RetryBudget
from proxy.layers.concurrency import Bulkhead, ConcurrencyLayer
from proxy.layers.deadline import DeadlineLayer
from proxy.layers.idempotency import IdempotencyLayer, ReplayCache
from proxy.layers.ratelimit import RateLimiter, RateLimitLayer
from proxy.layers.retry import RetryLayer
from proxy.routing import Match, Router
from proxy.upstream import UpstreamClient


@dataclass
class PolicyState:
    """Per-policy state built from the policy's own settings (routes cannot change these)."""

    budget: RetryBudget | None
    replay: ReplayCache | None
    breaker: CircuitBreaker | None
    bulkhead: Bulkhead | None
    limiter: RateLimiter | None

    @classmethod
    def build(cls, name: str, settings: PolicySettings, clock: Clock) -> PolicyState:
        retries, idempotency, breaker = settings.retries, settings.idempotency, settings.circuit_breaker
        return cls(
            budget=RetryBudget(retries.budget, clock) if retries and retries.budget else None,
            replay=ReplayCache(idempotency.replay, clock) if idempotency and idempotency.replay else None,
            breaker=CircuitBreaker(name, breaker, clock) if breaker else None,
            bulkhead=Bulkhead(name, settings.concurrency) if settings.concurrency else None,
            limiter=RateLimiter(name, settings.rate_limit, clock) if settings.rate_limit else None,
        )


def _bind(layer: Layer, next: Handler) -> Handler:
    async def handle(request: ProxyRequest) -> ProxyResponse:
        return await layer(request, next)

    return handle


def compose(layers: Sequence[Layer], terminal: Handler) -> Handler:
    handler = terminal
    for layer in reversed(layers):
        handler = _bind(layer, handler)
    return handler


def build_layers(settings: PolicySettings, state: PolicyState, base_dir: Path, clock: Clock) -> list[Layer]:
    layers: list[Layer] = []
    if state.bulkhead is not None:
        layers.append(ConcurrencyLayer(state.bulkhead))
    layers.append(DeadlineLayer(settings.timeouts.total))
    if settings.idempotency is not None:
        layers.append(IdempotencyLayer(settings.idempotency, state.replay))
    if settings.retries is not None:
        circuit_open = state.breaker.is_open if state.breaker else None
        retry = RetryLayer(settings.retries, settings.idempotency_header, state.budget, clock, circuit_open)
        layers.append(retry)
    if state.breaker is not None:
        layers.append(BreakerLayer(state.breaker))
    if state.limiter is not None:
        layers.append(RateLimitLayer(state.limiter))
    layers.append(AttemptLayer(settings.timeouts.per_try, settings.headers, base_dir))
    return layers


class Pipelines:
    """Every pipeline of one config, built up front so a request only does a dict lookup."""

    def __init__(
        self, config: Config, router: Router, upstream: UpstreamClient, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        base_dir = config.path.parent
        self._handlers: dict[tuple[str, int | None], Handler] = {}
        self.states: dict[str, PolicyState] = {}
        policies: list[Policy] = [*config.policies]
        if router.fallback is not None:
            policies.append(router.fallback)
        for policy in policies:
            state = self.states[policy.name] = PolicyState.build(policy.name, policy.settings, clock)
            variants = [(None, policy.settings), *enumerate(r.settings for r in policy.routes)]
            for route, settings in variants:
                layers = build_layers(settings, state, base_dir, clock)
                self._handlers[(policy.source, route)] = compose(layers, upstream.send)

    def handler(self, match: Match) -> Handler:
        return self._handlers[(match.policy.source, match.route)]
