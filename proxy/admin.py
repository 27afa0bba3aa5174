"""The admin listener (its own loopback port): liveness and readiness."""

from __future__ import annotations

from aiohttp import web

from proxy.server import ProxyServer

PROXY_KEY = web.AppKey("proxy", ProxyServer)


async def healthz(request: web.Request) -> web.Response:
    """Alive: the event loop answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready: a config is loaded and the listeners are up; 503 while draining."""
    proxy = request.app[PROXY_KEY]
    if not proxy.ready:
        return web.json_response({"status": "not ready", "draining": proxy.draining}, status=503)
    return web.json_response({"status": "ready", "config_version": proxy.runtime.config.version})


def build_admin_app(proxy: ProxyServer) -> web.Application:
    app = web.Application()
    app[PROXY_KEY] = proxy
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
