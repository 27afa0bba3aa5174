"""Everything derived from one config, swapped as a whole on reload."""

from __future__ import annotations

from dataclasses import dataclass

from opentelemetry import trace

from proxy.config.loader import Config
from proxy.fleet import FleetBackend
from proxy.pipeline import Pipelines
from proxy.routing import Router
from proxy.transport import UpstreamClient
from proxy.webhooks.routes import WebhookRoutes


@dataclass(frozen=True)
class Runtime:
    """Everything derived from one config; replaced as a whole on reload."""

    config: Config
    router: Router
    pipelines: Pipelines
    webhooks: WebhookRoutes | None
    """The webhook routes with their keys rendered; None without a ``webhooks`` section."""

    @classmethod
    def build(
        cls,
        config: Config,
        upstream: UpstreamClient,
        tracer: trace.Tracer,
        previous: Runtime | None = None,
        fleet: FleetBackend | None = None,
    ) -> Runtime:
        router = Router(config)
        before = previous.pipelines if previous else None
        pipelines = Pipelines(config, router, upstream, tracer, before, fleet=fleet)
        webhooks = config.main.webhooks
        routes = WebhookRoutes(webhooks, config.path.parent) if webhooks is not None else None
        return cls(config, router, pipelines, routes)
