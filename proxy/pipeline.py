"""The one place the layer order is written (see ARCHITECTURE.md).

    deadline   total timeout over everything below (retries and backoff too)
    attempt    header rules with rendered secrets, per_try timeout
    upstream   SSRF-checked connect, TLS origination, pooled connection

Later layers slot in here, each as one line, in the order ARCHITECTURE.md
draws: telemetry > concurrency > deadline > idempotency > retry > breaker >
rate limit > attempt > upstream.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from proxy.config.loader import Config
from proxy.config.model import Policy, PolicySettings
from proxy.exchange import Handler, Layer, ProxyRequest, ProxyResponse
from proxy.layers.attempt import AttemptLayer
from proxy.layers.deadline import DeadlineLayer
from proxy.routing import Match, Router
from proxy.upstream import UpstreamClient


def _bind(layer: Layer, next: Handler) -> Handler:
    async def handle(request: ProxyRequest) -> ProxyResponse:
        return await layer(request, next)

    return handle


def compose(layers: Sequence[Layer], terminal: Handler) -> Handler:
    handler = terminal
    for layer in reversed(layers):
        handler = _bind(layer, handler)
    return handler


def build_pipeline(settings: PolicySettings, upstream: UpstreamClient, base_dir: Path) -> Handler:
    layers: list[Layer] = [
        DeadlineLayer(settings.timeouts.total),
        AttemptLayer(settings.timeouts.per_try, settings.headers, base_dir),
    ]
    return compose(layers, upstream.send)


class Pipelines:
    """Every pipeline of one config, built up front so a request only does a dict lookup."""

    def __init__(self, config: Config, router: Router, upstream: UpstreamClient) -> None:
        base_dir = config.path.parent
        self._handlers: dict[tuple[str, int | None], Handler] = {}
        policies: list[Policy] = [*config.policies]
        if router.fallback is not None:
            policies.append(router.fallback)
        for policy in policies:
            self._handlers[(policy.source, None)] = build_pipeline(policy.settings, upstream, base_dir)
            for index, route in enumerate(policy.routes):
                self._handlers[(policy.source, index)] = build_pipeline(route.settings, upstream, base_dir)

    def handler(self, match: Match) -> Handler:
        return self._handlers[(match.policy.source, match.route)]
