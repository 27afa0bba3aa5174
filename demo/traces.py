"""A tiny OTLP/HTTP trace receiver for the demo: prints each trace Outrigger exports as a tree.

Why: a newcomer should see what one request went through — every attempt with its status and
duration, the backoff waits between them, and the breaker, rate-limiter, cache and failover
decisions — without running a collector and a tracing UI. The decoding is the same one the
tests use (proxy/telemetry/otlp_decode.py).

Run it with ``python demo/traces.py --port 4318`` (127.0.0.1 only) and start Outrigger with
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=http://127.0.0.1:4318/v1/traces``. A trace is printed when
its SERVER span arrives; its attempts (CLIENT spans) end before it, so they arrived already. A
stored (fire-and-forget) request's delivery attempts are traces of their own, rooted at a
CONSUMER span linked to the request that was acknowledged: they print the same way.
"""

from __future__ import annotations

import argparse
import sys
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from proxy.telemetry import names
from proxy.telemetry.otlp_decode import ExportedSpan, decode, unpack

HOST = "127.0.0.1"
MAX_PENDING_TRACES = 1000
"""Traces whose attempts arrived but whose SERVER span did not (yet); the oldest are dropped."""

REFUSALS = {
    "circuit_open": "refused at once: the circuit breaker is open (no upstream call)",
    "rate_limited": "refused: the rate limiter had no token in time (429)",
    "overloaded": "refused: too many requests in flight (503)",
    "retry_budget_exhausted": "no retry: the retry budget is spent",
    "timeout": "gave up: the deadline passed (504)",
    "upstream_unreachable": "gave up: the upstream could not be reached (502)",
}
"""What a SERVER span event means, in words; events not listed here are shown by name."""


def _ms(value: float) -> str:
    return f"{value:.0f} ms"


def _attempt_line(number: int, span: ExportedSpan) -> str:
    a = span.attributes
    outcome = a.get("http.response.status_code") or a.get("error.type", "?")
    where = f"{a.get('server.address')}:{a.get('server.port')}"
    return f"attempt {number}  {where}  -> {outcome}  {_ms(span.duration_ms)}"


def _decisions(server: ExportedSpan) -> list[str]:
    """The policy's decisions recorded on the SERVER span, one short line each."""
    a: dict[str, Any] = server.attributes
    lines: list[str] = []
    if (state := a.get(names.ATTR_BREAKER_STATE)) is not None:
        # with failover, the SERVER span carries the primary upstream's breaker
        whose = "the primary upstream's " if names.ATTR_UPSTREAM in a else ""
        lines.append(f"{whose}circuit breaker: {state}")
    if (waited := a.get(names.ATTR_RATELIMIT_WAIT_MS)) and waited >= 1:
        lines.append(f"rate limiter: waited {_ms(waited)} for a token")
    if (cache := a.get(names.ATTR_CACHE)) is not None:
        masked = a.get(names.ATTR_CACHE_MASKED_ERROR)
        lines.append(f"cache: {cache}" + (f" (a stored copy stood in for: {masked})" if masked else ""))
    if (upstream := a.get(names.ATTR_UPSTREAM)) is not None:
        lines.append(f"answered by upstream {upstream}")
    if a.get(names.ATTR_IDEMPOTENCY_INJECTED):
        lines.append(f"idempotency key added: {a.get(names.ATTR_IDEMPOTENCY_KEY)}")
    if a.get(names.ATTR_REPLAYED):
        lines.append("replayed from the idempotency cache (no upstream call)")
    if (fallback := a.get(names.ATTR_FALLBACK)) is not None:
        lines.append(f"declared fallback answered instead of: {fallback}")
    if (fault := a.get(names.ATTR_FAULT)) is not None:
        lines.append(f"fault drill injected: {fault}")
    for event in server.events:
        if event.name != "stale_if_error":  # the cache line says it
            lines.append(REFUSALS.get(event.name, f"event: {event.name}"))
    return lines


def render(server: ExportedSpan, attempts: Sequence[ExportedSpan]) -> list[str]:
    """One trace as lines: the request, then its attempts and backoff waits in time order, then
    the decisions taken."""
    a = server.attributes
    policy = a.get(names.ATTR_POLICY)
    outcome = a.get("http.response.status_code") or a.get("error.type")
    if server.is_consumer:
        origin = f", for the request of trace {server.links[0][0][:8]}" if server.links else ""
        head = (
            f"trace {server.trace_id[:8]}  delivery {a.get(names.ATTR_DELIVERY_ID)}"
            f" attempt {a.get(names.ATTR_DELIVERY_ATTEMPT)}{origin}  -> {outcome}"
            f"  in {_ms(server.duration_ms)}  (policy {a.get(names.ATTR_DELIVERY_SOURCE)})"
        )
    else:
        head = (
            f"trace {server.trace_id[:8]}  {a.get('http.request.method')} {a.get('url.full')}"
            f"  -> {outcome}  in {_ms(server.duration_ms)}" + (f"  (policy {policy})" if policy else "")
        )
    children: list[str] = []
    for number, attempt in enumerate(sorted(attempts, key=lambda s: s.start_ns), start=1):
        backoff = attempt.attributes.get(names.ATTR_RETRY_BACKOFF_MS)
        if backoff is not None:
            reason = attempt.attributes.get(names.ATTR_RETRY_REASON)
            children.append(f"wait {_ms(backoff)} (backoff), then retry because of {reason}")
        children.append(_attempt_line(number, attempt))
    if not attempts:
        children.append("no upstream attempt")
    children += _decisions(server)
    return [head, *(("└─ " if i == len(children) - 1 else "├─ ") + c for i, c in enumerate(children))]


class TraceBook:
    """Holds attempts until their SERVER (or delivery CONSUMER) span arrives, then renders the
    whole trace."""

    def __init__(self) -> None:
        self.pending: OrderedDict[str, list[ExportedSpan]] = OrderedDict()

    def add(self, spans: Sequence[ExportedSpan]) -> list[list[str]]:
        finished: list[list[str]] = []
        for span in spans:
            if span.is_client:
                self.pending.setdefault(span.trace_id, []).append(span)
                self.pending.move_to_end(span.trace_id)
                while len(self.pending) > MAX_PENDING_TRACES:
                    self.pending.popitem(last=False)
        for span in spans:
            if span.is_server or span.is_consumer:
                attempts = [
                    c for c in self.pending.pop(span.trace_id, []) if c.parent_span_id == span.span_id
                ]
                finished.append(render(span, attempts))
        return finished


BOOK: web.AppKey[TraceBook] = web.AppKey("book", TraceBook)


async def traces(request: web.Request) -> web.Response:
    """``POST /v1/traces``: decode, print every finished trace, acknowledge."""
    body = unpack(await request.read(), request.headers.get("Content-Encoding", ""))
    for tree in request.app[BOOK].add(decode(body)):
        print("\n".join(tree) + "\n", flush=True)
    return web.Response(
        body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf"
    )


def make_app() -> web.Application:
    """Build the application; separate from main() so tests can use it."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[BOOK] = TraceBook()
    app.router.add_post("/v1/traces", traces)
    return app


def main(argv: list[str] | None = None) -> None:
    """Serve until Ctrl-C or SIGTERM, printing trees to stdout."""
    parser = argparse.ArgumentParser(description="Print Outrigger's traces as trees (binds 127.0.0.1 only).")
    parser.add_argument(
        "--port", type=int, default=4318, help="port to listen on (default 4318, OTLP/HTTP's)"
    )
    args = parser.parse_args(argv)
    print(f"trace printer listening on http://{HOST}:{args.port}/v1/traces", file=sys.stderr, flush=True)
    web.run_app(make_app(), host=HOST, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
