"""The admin listener (its own loopback port): health, metrics, config, state, reload, deliveries."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy import errors
from proxy.config.model import Policy
from proxy.delivery.service import DeliveryService
from proxy.delivery.store import STATES, Delivery, State
from proxy.explain import redacted_settings, redacted_webhooks
from proxy.fleet.backend import redacted
from proxy.pipeline import PolicyState
from proxy.reload import Reloader
from proxy.server import ProxyServer
from proxy.server.respond import error_response

PROXY_KEY = web.AppKey("proxy", ProxyServer)
RELOADER_KEY = web.AppKey("reloader", Reloader)


async def healthz(request: web.Request) -> web.Response:
    """Alive: the event loop answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready: a config is loaded and the listeners are up; 503 while draining."""
    proxy = request.app[PROXY_KEY]
    if not proxy.ready:
        return web.json_response({"status": "not ready", "draining": proxy.draining}, status=503)
    return web.json_response({"status": "ready", "config_version": proxy.runtime.config.version})


async def metrics(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    if proxy.deliveries is not None:
        await proxy.deliveries.refresh()  # the store's counts, read off the loop, for this scrape
    body = proxy.telemetry.metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def config(request: web.Request) -> web.Response:
    """The effective, merged config (secrets redacted), its version and the last reload outcome."""
    runtime = request.app[PROXY_KEY].runtime
    last = request.app[RELOADER_KEY].last
    main = runtime.config.main
    policies: list[dict[str, Any]] = [
        {
            "hosts": list(policy.hosts),
            "source": policy.source,
            "preset": policy.preset,
            "upstream": str(policy.upstream) if policy.upstream else None,
            "listen": policy.listen,
            "settings": redacted_settings(policy.settings),
            "routes": [
                {
                    "match": route.match.model_dump(exclude_none=True),
                    "settings": redacted_settings(route.settings),
                }
                for route in policy.routes
            ],
        }
        for policy in runtime.config.policies
    ]
    body = {
        "version": runtime.config.version,
        "path": str(runtime.config.path),
        "last_reload": last.as_dict() if last else None,
        "last_reload_error": last.error if last and not last.ok else None,
        "main": {
            **main.model_dump(mode="json", exclude={"defaults", "webhooks", "fleet"}),
            "fleet": None
            if main.fleet is None
            else {**main.fleet.model_dump(mode="json"), "redis": redacted(main.fleet.redis)},
            "defaults": redacted_settings(main.defaults),
            "webhooks": redacted_webhooks(main.webhooks),
        },
        "policies": policies,
    }
    return web.json_response(body)


async def state(request: web.Request) -> web.Response:
    """Per policy: breaker, retry budget, limiter (and any provider pause), bulkhead, replay and
    response caches, each failover upstream's breaker, and credentials (token state, keys by index)."""
    pipelines = request.app[PROXY_KEY].runtime.pipelines
    body = {
        name: {
            "circuit_breaker": s.breaker.snapshot() if s.breaker is not None else None,
            "retry_budget": s.budget.snapshot() if s.budget is not None else None,
            "rate_limit": s.limiter.snapshot() if s.limiter is not None else None,
            "concurrency": s.bulkhead.snapshot() if s.bulkhead is not None else None,
            "replay_cache": {"entries": len(s.replay)} if s.replay is not None else None,
            **_failover_state(pipelines.policies[name], s),
            "cache": s.cache.snapshot() if s.cache is not None else None,
            **_credentials_state(s),
        }
        for name, s in pipelines.states.items()
    }
    return web.json_response(body)


def _failover_state(policy: Policy, state: PolicyState) -> dict[str, Any]:
    """With failover: each upstream's breaker by URL, the primary first (SPEC 9)."""
    if policy.settings.failover is None:
        return {}
    primary = str(policy.upstream) if policy.upstream else "(requested host)"
    breakers = {primary: state.breaker, **state.failover_breakers}
    return {
        "failover": {
            "upstreams": [
                {"url": url, "circuit_breaker": b.snapshot() if b is not None else None}
                for url, b in breakers.items()
            ]
        }
    }


def _credentials_state(state: PolicyState) -> dict[str, Any]:
    """With credentials: the token's state (never the token), or each key by index (never its value)."""
    if state.token_source is not None:
        return {"credentials": {"oauth2": state.token_source.snapshot()}}
    if state.key_pool is not None:
        return {"credentials": {"keys": state.key_pool.snapshot()}}
    return {}


async def reload(request: web.Request) -> web.Response:
    result = await request.app[RELOADER_KEY].reload("admin")
    if result.unexpected:  # a bug, not a bad config: the SPEC 5 error shape, the old config serving
        error = {"type": "internal_error", "message": result.error}
        return web.json_response({**result.as_dict(), "error": error}, status=500)
    return web.json_response(result.as_dict(), status=200 if result.ok else 422)


LIST_LIMIT = 100
LIST_LIMIT_MAX = 1000


def _problem(status: int, error_type: str, message: str) -> web.Response:
    return web.json_response({"error": {"type": error_type, "message": message}}, status=status)


def _service(request: web.Request) -> DeliveryService:
    service = request.app[PROXY_KEY].deliveries
    assert service is not None, "guarded by _deliveries_guard"
    return service


def _view(request: web.Request, delivery: Delivery) -> dict[str, Any]:
    """Never the body or header values; the path as the policy's redact_paths allows it shown."""
    policy = request.app[PROXY_KEY].runtime.pipelines.policies.get(delivery.source)
    return delivery.view(policy.redact_path if policy is not None and delivery.kind == "policy" else None)


@web.middleware
async def _deliveries_guard(request: web.Request, handler: Any) -> web.StreamResponse:
    """/deliveries when delivery is off: 404 saying so; a store that cannot answer (disk gone,
    read-only): the SPEC 5 error shape, 503."""
    if request.path.startswith("/deliveries") and request.app[PROXY_KEY].deliveries is None:
        return _problem(
            404,
            "deliveries_off",
            "durable delivery is off: no policy has a delivery section and there is no webhooks section",
        )
    try:
        response: web.StreamResponse = await handler(request)
    except errors.StoreUnavailable as error:
        return error_response(error, "")
    return response


async def deliveries_list(request: web.Request) -> web.Response:
    """``?state=pending|done|dead`` (default: all), newest first, at most ``?limit`` (100)."""
    service = _service(request)
    state = request.query.get("state")
    if state is not None and state not in STATES:
        return _problem(400, "bad_request", f"state must be one of {', '.join(STATES)}")
    limit_text = request.query.get("limit", str(LIST_LIMIT))
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= LIST_LIMIT_MAX:
        return _problem(400, "bad_request", f"limit must be a whole number from 1 to {LIST_LIMIT_MAX}")
    chosen: State | None = next((s for s in STATES if s == state), None)
    found = await service.list(chosen, int(limit_text))
    return web.json_response({"deliveries": [_view(request, d) for d in found]})


def _missing(delivery_id: str) -> web.Response:
    return _problem(404, "delivery_not_found", f"no delivery {delivery_id}")


async def delivery_show(request: web.Request) -> web.Response:
    delivery_id = request.match_info["id"]
    delivery = await _service(request).get(delivery_id)
    return web.json_response(_view(request, delivery)) if delivery is not None else _missing(delivery_id)


async def delivery_retry(request: web.Request) -> web.Response:
    """A dead delivery becomes pending, due now, with fresh attempts and ttl."""
    service, delivery_id = _service(request), request.match_info["id"]
    retried = await service.retry(delivery_id)
    if retried is not None:
        return web.json_response(_view(request, retried))
    current = await service.get(delivery_id)
    if current is None:
        return _missing(delivery_id)
    message = f"delivery {delivery_id} is {current.state}: only dead ones are retried"
    return _problem(409, "delivery_not_dead", message)


async def delivery_delete(request: web.Request) -> web.Response:
    delivery_id = request.match_info["id"]
    if not await _service(request).delete(delivery_id):
        return _missing(delivery_id)
    return web.json_response({"id": delivery_id, "deleted": True})


def build_admin_app(proxy: ProxyServer, reloader: Reloader) -> web.Application:
    app = web.Application(middlewares=[_deliveries_guard])
    app[PROXY_KEY] = proxy
    app[RELOADER_KEY] = reloader
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/config", config)
    app.router.add_get("/state", state)
    app.router.add_post("/reload", reload)
    app.router.add_get("/deliveries", deliveries_list)
    app.router.add_get("/deliveries/{id}", delivery_show)
    app.router.add_post("/deliveries/{id}/retry", delivery_retry)
    app.router.add_delete("/deliveries/{id}", delivery_delete)
    return app
