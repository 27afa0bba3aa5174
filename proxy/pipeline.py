"""The one place the layer order is written (see ARCHITECTURE.md).

    concurrency  bulkhead: in-flight cap and bounded FIFO queue; sheds load before any work
    cache        fresh hits, revalidation, stale-if-error; coalesces misses (a hit costs no deadline work)
    deadline     total timeout over everything below, retries and backoff included
    idempotency  key added once so every attempt shares it; optional replay cache
    retry        conditions, backoff with jitter, Retry-After, budget, replay buffer
    breaker      counts every attempt; open = fail fast (and retries stop)
    rate limit   every attempt takes a token; obeys the provider's rate-limit headers
    attempt      header rules with rendered secrets, CLIENT span
    transport    SSRF-checked connect, TLS, pooled connection; connect, per_try and idle timeouts

A layer whose section is absent from the settings is not in the stack. State
that must outlive one request (budget, replay cache, breaker, bulkhead,
limiter, response cache) lives in `PolicyState`, one per policy, shared by its routes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry import trace

from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.config.loader import Config
from proxy.config.model import Policy, PolicySettings, RetryBudgetSettings
from proxy.exchange import Handler, Layer, ProxyRequest, ProxyResponse
from proxy.layers.attempt import AttemptLayer
from proxy.layers.breaker import BreakerLayer, CircuitBreaker
from proxy.layers.budget import RetryBudget
from proxy.layers.cache import CacheLayer, ResponseCache
from proxy.layers.concurrency import Bulkhead, ConcurrencyLayer
from proxy.layers.deadline import DeadlineLayer
from proxy.layers.idempotency import IdempotencyLayer, ReplayCache
from proxy.layers.ratelimit import RateLimiter, RateLimitLayer
from proxy.layers.retry import RetryLayer
from proxy.routing import Match, Router
from proxy.transport import UpstreamClient


@dataclass
class PolicyState:
    """Per-policy state built from the policy's own settings (routes cannot change these)."""

    budget: RetryBudget | None
    replay: ReplayCache | None
    breaker: CircuitBreaker | None
    bulkhead: Bulkhead | None
    limiter: RateLimiter | None
    cache: ResponseCache | None = None

    @classmethod
    def build(
        cls, policy: Policy, clock: Clock, previous: tuple[Policy, PolicyState] | None = None
    ) -> PolicyState:
        """Fresh state, except that each piece whose section is unchanged since `previous` carries over
        (a reload must not reset an open breaker, a spent budget or a provider-imposed pause)."""

        name = policy.name

        def carry(section: Callable[[Policy], Any], attribute: str, make: Callable[[Any], Any]) -> Any:
            current = section(policy)
            if previous is not None and section(previous[0]) == current:
                return getattr(previous[1], attribute)
            return make(current) if current is not None else None

        state = cls(
            budget=carry(_budget_settings, "budget", lambda b: RetryBudget(b, clock)),
            replay=carry(
                lambda p: p.settings.idempotency.replay if p.settings.idempotency else None,
                "replay",
                lambda r: ReplayCache(r, clock),
            ),
            breaker=carry(  # a breaker judged one upstream: a new upstream (or TLS) starts closed
                lambda p: (
                    (p.settings.circuit_breaker, p.upstream, p.settings.tls)
                    if p.settings.circuit_breaker
                    else None
                ),
                "breaker",
                lambda key: CircuitBreaker(name, key[0], clock),
            ),
            bulkhead=carry(lambda p: p.settings.concurrency, "bulkhead", lambda c: Bulkhead(name, c)),
            limiter=carry(lambda p: p.settings.rate_limit, "limiter", lambda r: RateLimiter(name, r, clock)),
            cache=carry(lambda p: p.settings.cache, "cache", lambda c: ResponseCache(c, clock)),
        )
        old_limiter = previous[1].limiter if previous is not None else None
        if state.limiter is not None and old_limiter is not None and state.limiter is not old_limiter:
            state.limiter.adopt_provider_view(old_limiter)
        return state


def _budget_settings(policy: Policy) -> RetryBudgetSettings | None:
    """The policy's retry budget; a route may turn retries on, so the first route with retries
    supplies it when the policy itself has none (routes cannot set the budget themselves)."""
    for settings in (policy.settings, *(route.settings for route in policy.routes)):
        if settings.retries is not None:
            return settings.retries.budget
    return None


def _bind(layer: Layer, next: Handler) -> Handler:
    async def handle(request: ProxyRequest) -> ProxyResponse:
        return await layer(request, next)

    return handle


def compose(layers: Sequence[Layer], terminal: Handler) -> Handler:
    handler = terminal
    for layer in reversed(layers):
        handler = _bind(layer, handler)
    return handler


def build_layers(
    settings: PolicySettings, state: PolicyState, base_dir: Path, clock: Clock, tracer: trace.Tracer
) -> list[Layer]:
    layers: list[Layer] = []
    if state.bulkhead is not None:
        layers.append(ConcurrencyLayer(state.bulkhead))
    if state.cache is not None:
        layers.append(CacheLayer(state.cache, settings))
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
    layers.append(AttemptLayer(settings.headers, base_dir, tracer))
    return layers


class Pipelines:
    """Every pipeline of one config, built up front so a request only does a dict lookup."""

    def __init__(
        self,
        config: Config,
        router: Router,
        upstream: UpstreamClient,
        tracer: trace.Tracer,
        previous: Pipelines | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        base_dir = config.path.parent
        self._handlers: dict[tuple[str, int | None], Handler] = {}
        self.states: dict[str, PolicyState] = {}
        self.policies: dict[str, Policy] = {}
        policies: list[Policy] = [*config.policies]
        if router.fallback is not None:
            policies.append(router.fallback)
        for policy in policies:
            before = previous.state_of(policy.name) if previous is not None else None
            state = PolicyState.build(policy, clock, before)
            if policy is router.fallback:
                # Many unrelated hosts share this policy: one breaker, limiter, bulkhead or replay cache
                # for all of them would let one failing host shut out the rest. Only the budget is shared.
                # No response cache either: nobody declared these hosts' responses shareable.
                state = dataclasses.replace(state, breaker=None, bulkhead=None, limiter=None, replay=None)
                state = dataclasses.replace(state, cache=None)
            self.states[policy.name] = state
            self.policies[policy.name] = policy
            variants = [(None, policy.settings), *enumerate(r.settings for r in policy.routes)]
            for route, settings in variants:
                layers = build_layers(settings, state, base_dir, clock, tracer)
                self._handlers[(policy.name, route)] = compose(layers, upstream.send)

    def state_of(self, name: str) -> tuple[Policy, PolicyState] | None:
        if name not in self.states:
            return None
        return self.policies[name], self.states[name]

    def handler(self, match: Match) -> Handler:
        return self._handlers[(match.policy.name, match.route)]
