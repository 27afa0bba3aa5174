"""A small, deliberately misbehaving HTTP upstream for trying Outrigger.

Why: a resilience proxy is only interesting when the upstream fails. This
server fails in small, predictable ways so a newcomer can watch Outrigger
proxy a request, retry a flaky one, honour ``Retry-After`` and (once a
path keeps failing) open its circuit breaker.

Run it with ``python demo/upstream.py --port 8080 [--standby-port 8081]``. It
binds 127.0.0.1 only and needs nothing but aiohttp. The standby port serves the
same endpoints as a second "region", for the failover step.

Endpoints:

- ``GET /`` and ``GET /hello``: always 200.
- ``GET /flaky``: 503 on calls 1, 2, 4, 5, ...; 200 on every third call.
- ``GET /down``: always 503.
- ``GET /slow?ms=N``: waits N ms (default 3000, at most 60000), then 200.
- ``GET /ratelimited``: 429 with ``Retry-After: 1`` on every other call.
- ``GET /catalog``: 200 with ``Cache-Control: max-age=1`` on the first call,
  then 503 forever: a cached copy outlives its upstream.
- ``GET /region``: 503 on the primary port (a region that is down), 200 on the
  standby port.
- ``POST /orders``: 503 on calls 1 and 2 (an outage), then 201 naming the ``Idempotency-Key``
  it received: the fire-and-forget step.
- ``POST /echo``: the headers it received and the body it read, as JSON.
- ``GET /stats``: how many calls reached each path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from aiohttp import web

HOST = "127.0.0.1"
DEFAULT_SLOW_MS = 3000
MAX_SLOW_MS = 60000
UNMATCHED = "(unmatched)"

log = logging.getLogger("demo-upstream")

CALLS: web.AppKey[Counter[str]] = web.AppKey("calls", Counter)
REGION: web.AppKey[str] = web.AppKey("region", str)
PRIMARY = "primary"
STANDBY = "standby"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _path_key(request: web.Request) -> str:
    """Count known paths by name, everything else under one key.

    Why: a scanner hitting random paths must not grow the table forever.
    """
    if request.match_info.http_exception is not None:
        return UNMATCHED
    return request.path


def _calls_to(request: web.Request) -> int:
    """How many times this request's path has been called, this one included."""
    return request.app[CALLS][_path_key(request)]


@web.middleware
async def count_and_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count every call per path and log one line per request to stderr.

    Why: ``/stats`` and the log show how many attempts Outrigger really
    made, which is the point of the demo.
    """
    request.app[CALLS][_path_key(request)] += 1
    started = time.monotonic()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        elapsed_ms = (time.monotonic() - started) * 1000
        log.info(
            "%s %s -> %d (%.0f ms, call #%d)",
            request.method,
            request.path_qs,
            status,
            elapsed_ms,
            request.app[CALLS][_path_key(request)],
        )


async def hello(request: web.Request) -> web.Response:
    """Always succeed: the baseline that shows a plain proxied request."""
    served = sum(request.app[CALLS].values())
    return web.json_response({"message": "hello from the demo upstream", "served": served})


async def flaky(request: web.Request) -> web.Response:
    """Fail twice, then succeed, deterministically: shows retries at work."""
    n = _calls_to(request)
    if n % 3 != 0:
        return web.json_response({"error": "flaky: failing on purpose", "call": n}, status=503)
    return web.json_response({"message": "flaky: this time it worked", "call": n})


async def down(request: web.Request) -> web.Response:
    """Always fail: enough failures in a row open Outrigger's breaker."""
    return web.json_response(
        {"error": "down: this upstream is always unavailable", "call": _calls_to(request)},
        status=503,
    )


async def slow(request: web.Request) -> web.Response:
    """Answer late: shows per-try and total timeouts."""
    raw = request.query.get("ms", str(DEFAULT_SLOW_MS))
    try:
        ms = int(raw)
    except ValueError:
        return web.json_response({"error": f"ms must be an integer, got {raw!r}"}, status=400)
    ms = max(0, min(ms, MAX_SLOW_MS))
    await asyncio.sleep(ms / 1000)
    return web.json_response({"message": f"slow: answered after {ms} ms", "ms": ms})


async def ratelimited(request: web.Request) -> web.Response:
    """Answer 429 with ``Retry-After: 1`` every other call: shows Retry-After."""
    n = _calls_to(request)
    if n % 2 == 1:
        return web.json_response(
            {"error": "ratelimited: slow down", "call": n},
            status=429,
            headers={"Retry-After": "1"},
        )
    return web.json_response({"message": "ratelimited: allowed this time", "call": n})


async def catalog(request: web.Request) -> web.Response:
    """Fresh for 1 s once, then failing: shows the cache answering for a failed upstream."""
    n = _calls_to(request)
    if n == 1:
        return web.json_response(
            {"catalog": ["kayak", "paddle", "outrigger"], "call": n},
            headers={"Cache-Control": "max-age=1"},
        )
    return web.json_response({"error": "catalog: the database is down", "call": n}, status=503)


async def region(request: web.Request) -> web.Response:
    """Down in the primary region, up in the standby: shows failover."""
    name = request.app[REGION]
    if name == PRIMARY:
        return web.json_response({"error": "region: the primary region is down"}, status=503)
    return web.json_response({"message": f"region: served by the {name} region"})


async def orders(request: web.Request) -> web.Response:
    """Down for two calls, then accepting: a stored delivery gets through once it is back."""
    n = _calls_to(request)
    if n <= 2:
        return web.json_response({"error": "orders: the service is down", "call": n}, status=503)
    key = request.headers.get("Idempotency-Key")
    return web.json_response({"order": "created", "idempotency_key": key, "call": n}, status=201)


async def echo(request: web.Request) -> web.Response:
    """Return the headers and body that arrived: shows what Outrigger injected."""
    body = await request.read()
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return web.json_response(
        {
            "headers": headers,
            "body_bytes": len(body),
            "body": body.decode("utf-8", errors="replace"),
        }
    )


async def stats(request: web.Request) -> web.Response:
    """Calls per path so far: compare with what the app saw to count retries."""
    return web.json_response(dict(sorted(request.app[CALLS].items())))


def make_app(region_name: str = PRIMARY) -> web.Application:
    """Build the application; separate from main() so tests can use it."""
    app = web.Application(middlewares=[count_and_log])
    app[CALLS] = Counter()
    app[REGION] = region_name
    app.router.add_get("/", hello)
    app.router.add_get("/hello", hello)
    app.router.add_get("/flaky", flaky)
    app.router.add_get("/down", down)
    app.router.add_get("/slow", slow)
    app.router.add_get("/ratelimited", ratelimited)
    app.router.add_get("/catalog", catalog)
    app.router.add_get("/region", region)
    app.router.add_post("/orders", orders)
    app.router.add_post("/echo", echo)
    app.router.add_get("/stats", stats)
    return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line: only the port is configurable."""
    parser = argparse.ArgumentParser(
        description="Misbehaving demo upstream for Outrigger (binds 127.0.0.1 only)."
    )
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    parser.add_argument(
        "--standby-port", type=int, default=None, help="also serve the standby region on this port"
    )
    return parser.parse_args(argv)


async def serve(port: int, standby_port: int | None) -> None:
    """Serve the primary region (and the standby one) until cancelled."""
    regions = [(PRIMARY, port)] + ([(STANDBY, standby_port)] if standby_port is not None else [])
    runners = []
    try:
        for name, region_port in regions:
            runner = web.AppRunner(make_app(name), access_log=None)
            runners.append(runner)
            await runner.setup()
            await web.TCPSite(runner, HOST, region_port).start()
            log.info("demo upstream (%s region) listening on http://%s:%d", name, HOST, region_port)
        await asyncio.Event().wait()
    finally:
        for runner in runners:
            await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    """Serve until Ctrl-C or SIGTERM."""
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s upstream %(message)s")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM ends it like Ctrl-C
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port, args.standby_port))


if __name__ == "__main__":
    main()
