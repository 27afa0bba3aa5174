"""The one place the layer order is written (see ARCHITECTURE.md).

    fallback     outermost: the declared answer for failures in fallback.on (overloaded and timeout too)
    concurrency  bulkhead: in-flight cap and bounded FIFO queue; sheds load before any work
    cache        fresh hits, revalidation, stale-if-error; coalesces misses (a hit costs no deadline work)
    deadline     total timeout over everything below, retries and backoff included
    faults       drills: injected abort (what the app sees; never retried or counted) or delay
    idempotency  key added once so every attempt shares it; optional replay cache
    retry        conditions, backoff with jitter, Retry-After, budget, replay buffer
    failover     picks each attempt's upstream: the first whose breaker admits it (holds their breakers)
    breaker      counts every attempt; open = fail fast (and retries stop)
    rate limit   every attempt takes a token; obeys the provider's rate-limit headers
    credentials  OAuth2 token (one refresh + re-send on 401) or one key of a pool (per-key cooldown)
    attempt      header rules with rendered secrets, CLIENT span
    transport    SSRF-checked connect, TLS, pooled connection; connect, per_try and idle timeouts

A webhook event forwarded to the app (`Pipelines.forward`) takes only the last two: attempt (its
CLIENT span, no header rules) and transport. The app is ours, so no policy applies to it, and the
delivery worker retries it with the route's ``delivery`` settings.

A layer whose section is absent from the settings is not in the stack. State
that must outlive one request (budget, replay cache, breaker, bulkhead,
limiter, response cache, token source, key pool) lives in `PolicyState`, one per policy, shared by its routes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry import trace

from proxy import fleet as fleet_mode
from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.config import defaults
from proxy.config.loader import Config
from proxy.config.model import HeaderRules, Policy, PolicySettings, RetryBudgetSettings
from proxy.credentials import KeyPool, TokenSource, build_key_pool, build_token_source
from proxy.exchange import Handler, Layer, ProxyRequest, ProxyResponse
from proxy.fleet import FleetBackend
from proxy.layers.attempt import AttemptLayer
from proxy.layers.breaker import BreakerLayer, CircuitBreaker
from proxy.layers.budget import RetryBudget
from proxy.layers.cache import CacheLayer, ResponseCache
from proxy.layers.concurrency import Bulkhead, ConcurrencyLayer
from proxy.layers.credentials import KeyPoolLayer, OAuth2Layer
from proxy.layers.deadline import DeadlineLayer
from proxy.layers.failover import FailoverLayer
from proxy.layers.fallback import FallbackLayer
from proxy.layers.faults import FaultsLayer
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
    failover_breakers: dict[str, CircuitBreaker] = dataclasses.field(default_factory=dict)
    """One breaker per ``failover.upstreams`` URL (the primary's is `breaker`)."""
    cache: ResponseCache | None = None
    token_source: TokenSource | None = None
    key_pool: KeyPool | None = None

    @classmethod
    def build(
        cls,
        policy: Policy,
        clock: Clock,
        previous: tuple[Policy, PolicyState] | None = None,
        base_dir: Path = Path("."),
        fleet: FleetBackend | None = None,
    ) -> PolicyState:
        """Fresh state, except that each piece whose section is unchanged since `previous` carries over
        (a reload must not reset an open breaker, a spent budget or a provider-imposed pause). The
        credentials compare as rendered: a rotated secret file renews only what it feeds (`base_dir`
        resolves relative ``${file:}`` references). With `fleet`, sections of ``scope: fleet`` keep
        their state in Redis."""

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
                lambda key: fleet_mode.breaker(name, key[0], clock, fleet),
            ),
            bulkhead=carry(lambda p: p.settings.concurrency, "bulkhead", lambda c: Bulkhead(name, c)),
            limiter=carry(
                lambda p: p.settings.rate_limit,
                "limiter",
                lambda r: fleet_mode.limiter(name, r, clock, fleet),
            ),
            cache=carry(lambda p: p.settings.cache, "cache", lambda c: ResponseCache(c, clock)),
        )
        state.failover_breakers = _failover_breakers(policy, clock, previous, fleet)
        credentials = policy.settings.credentials
        state.token_source = build_token_source(
            name, credentials, base_dir, clock, previous[1].token_source if previous else None
        )
        state.key_pool = build_key_pool(
            name, credentials, base_dir, clock, previous[1].key_pool if previous else None
        )
        old_limiter = previous[1].limiter if previous is not None else None
        if state.limiter is not None and old_limiter is not None and state.limiter is not old_limiter:
            state.limiter.adopt_provider_view(old_limiter)
        return state


def _failover_breaker_keys(policy: Policy) -> dict[str, tuple[Any, ...]]:
    """Per failover upstream URL, what its breaker judged: settings, upstream and TLS."""
    breaker, failover = policy.settings.circuit_breaker, policy.settings.failover
    if breaker is None or failover is None:
        return {}
    return {str(u.url): (breaker, u.url, u.tls or policy.settings.tls) for u in failover.upstreams}


def _failover_breakers(
    policy: Policy, clock: Clock, previous: tuple[Policy, PolicyState] | None, fleet: FleetBackend | None
) -> dict[str, CircuitBreaker]:
    """Each failover upstream's breaker, carried over a reload when what it judged is unchanged."""
    keys = _failover_breaker_keys(policy)
    old_keys = _failover_breaker_keys(previous[0]) if previous is not None else {}
    breakers: dict[str, CircuitBreaker] = {}
    for url, key in keys.items():
        if previous is not None and old_keys.get(url) == key and url in previous[1].failover_breakers:
            breakers[url] = previous[1].failover_breakers[url]
        else:
            breakers[url] = fleet_mode.breaker(f"{policy.name} -> {url}", key[0], clock, fleet)
    return breakers


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
    if settings.fallback is not None:
        layers.append(FallbackLayer(settings.fallback))
    if state.bulkhead is not None:
        layers.append(ConcurrencyLayer(state.bulkhead, settings.timeouts.total))
    if state.cache is not None:
        layers.append(CacheLayer(state.cache, settings))
    layers.append(DeadlineLayer(settings.timeouts.total))
    if settings.faults is not None:
        layers.append(FaultsLayer(settings.faults, clock))
    if settings.idempotency is not None:
        layers.append(IdempotencyLayer(settings.idempotency, state.replay))
    failover = (
        FailoverLayer(settings, state.breaker, state.failover_breakers, base_dir)
        if settings.failover is not None
        else None
    )
    if settings.retries is not None:
        circuit_open = state.breaker.is_open if state.breaker else None
        if failover is not None and circuit_open is not None:
            circuit_open = failover.all_open  # retries stop only when no upstream is left
        retry = RetryLayer(settings.retries, settings.idempotency_header, state.budget, clock, circuit_open)
        layers.append(retry)
    if failover is not None:
        layers.append(failover)  # it holds each upstream's breaker: no breaker layer of its own below
    elif state.breaker is not None:
        layers.append(BreakerLayer(state.breaker))
    if state.limiter is not None:
        layers.append(RateLimitLayer(state.limiter))
    if state.token_source is not None:
        replay = settings.retries.max_replay_bytes if settings.retries else defaults.MAX_REPLAY_BYTES
        layers.append(OAuth2Layer(state.token_source, replay, tracer))
    elif state.key_pool is not None:
        limit = settings.rate_limit
        layers.append(
            KeyPoolLayer(
                state.key_pool,
                limit.max_wait if limit else defaults.RATE_LIMIT_MAX_WAIT_S,
                limit.max_pause if limit else defaults.RATE_LIMIT_MAX_PAUSE_S,
            )
        )
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
        fleet: FleetBackend | None = None,
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
            state = PolicyState.build(policy, clock, before, base_dir, fleet)
            if policy is router.fallback:
                # Many unrelated hosts share this policy: one breaker, limiter, bulkhead or replay cache
                # for all of them would let one failing host shut out the rest. Only the budget is shared.
                # No response cache either: nobody declared these hosts' responses shareable.
                state = dataclasses.replace(
                    state,
                    breaker=None,
                    bulkhead=None,
                    limiter=None,
                    replay=None,
                    failover_breakers={},
                    cache=None,
                    token_source=None,  # nor credentials: they were issued for a known upstream
                    key_pool=None,
                )
            self.states[policy.name] = state
            self.policies[policy.name] = policy
            variants = [(None, policy.settings), *enumerate(r.settings for r in policy.routes)]
            for route, settings in variants:
                layers = build_layers(settings, state, base_dir, clock, tracer)
                self._handlers[(policy.name, route)] = compose(layers, upstream.send)
        self.forward: Handler = compose([AttemptLayer(HeaderRules(), base_dir, tracer)], upstream.send)
        """Webhook forwarding to the app (see the module docstring)."""

    def state_of(self, name: str) -> tuple[Policy, PolicyState] | None:
        if name not in self.states:
            return None
        return self.policies[name], self.states[name]

    def handler(self, match: Match) -> Handler:
        return self._handlers[(match.policy.name, match.route)]
