"""The proxy listeners (main and per-policy ports), the current `Runtime`, start, reload and drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Literal

from aiohttp import web

from proxy import errors
from proxy.config.loader import Config
from proxy.delivery import service as delivery
from proxy.delivery.webhook import WebhookSink
from proxy.fleet import FleetBackend
from proxy.pipeline import PolicyState
from proxy.server import handler
from proxy.server.protocol import Handler, ProxyWebServer
from proxy.server.runtime import Runtime
from proxy.telemetry import Telemetry
from proxy.transport import UpstreamClient
from proxy.webhooks.listener import WebhookListener
from proxy.webhooks.routes import WebhookRoutes
from proxy.webhooks.sink import EventSink

log = logging.getLogger("outrigger.server")

_CANCEL_GRACE_S = 0.2
"""After drain_timeout, how long cancelled handlers get to unwind before the listener shuts down."""


_DRAIN_POLL_S = 0.05
"""The shortest sleep between two looks at a drain (a zero drain_idle must not spin)."""

DrainEnd = Literal["idle", "timeout", "signal"]
"""Why a drain ended: nothing in flight for drain_idle, drain_timeout reached, or a second signal."""


class ShuttingDown(Exception):
    """A reload arrived after shutdown began."""


class DrainTracker:
    """When a drain may end: nothing in flight for `idle` seconds, or `timeout` after it began.

    The quiet period starts at the drain's start and again whenever a request arrives or ends
    (`active`). The clock is injected so the rule is tested without sleeping.
    """

    def __init__(self, idle: float, timeout: float, now: Callable[[], float]) -> None:
        self._now = now
        self._idle = idle
        started = now()
        self.deadline = started + timeout
        self._last_active = started

    def active(self) -> None:
        """A request arrived or finished: the quiet period starts again."""
        self._last_active = self._now()

    def verdict(self, in_flight: int) -> tuple[DrainEnd | None, float]:
        """Why the drain is over, or None and how long until it may be (the time to sleep)."""
        now = self._now()
        if now >= self.deadline:
            return "timeout", 0.0
        if in_flight:  # the earliest end: drain_idle after the last of them ends
            return None, min(self._idle, self.deadline - now)
        quiet_at = self._last_active + self._idle
        if quiet_at <= now:
            return "idle", 0.0
        return None, min(quiet_at, self.deadline) - now


class ProxyServer:
    """The proxy listeners (main and per-policy ports), the webhook listener, the current `Runtime`."""

    def __init__(self, config: Config, webhook_sink: EventSink | None = None) -> None:
        self._upstream: UpstreamClient | None = None
        self._runtime: Runtime | None = None
        self._initial = config
        self._runner: web.BaseRunner | None = None
        self._sites: dict[int, web.TCPSite] = {}
        self.draining = False
        self._in_flight: set[asyncio.Task[object]] = set()
        self._listeners_lock = asyncio.Lock()
        """Serialises apply() and stop(): a reload must never reopen a port while shutting down."""
        self._drained = asyncio.Event()
        self._drain: DrainTracker | None = None
        """Set by drain(): the idle clock every request arriving or ending restarts."""
        self.telemetry = Telemetry(config.main.telemetry, self._states)
        self._webhook_sink = webhook_sink
        """Where verified webhook events go instead of the delivery store (tests only)."""
        self._webhooks: WebhookListener | None = None
        self.fleet: FleetBackend | None = None
        """Redis for ``scope: fleet`` state (main config ``fleet``, restart-only); None: all local."""
        self.deliveries: delivery.DeliveryService | None = None
        """Built when a config first needs it (a policy with ``delivery``, or ``webhooks``); None
        costs nothing."""

    def _states(self) -> dict[str, PolicyState]:
        return self._runtime.pipelines.states if self._runtime is not None else {}

    @property
    def runtime(self) -> Runtime:
        assert self._runtime is not None, "server not started"
        return self._runtime

    @property
    def ready(self) -> bool:
        webhooks_up = self._initial.main.webhooks is None or (
            self._webhooks is not None and self._webhooks.listening
        )  # a provider's event must not meet a closed port once /readyz says yes
        return self._runtime is not None and not self.draining and bool(self._sites) and webhooks_up

    async def start(self) -> None:
        config = self._initial
        self._upstream = UpstreamClient(max_header_bytes=config.main.limits.max_header_bytes)
        if config.main.fleet is not None:
            fleet = self.fleet = FleetBackend(config.main.fleet, config.path.parent)
            self.telemetry.metrics.watch_fleet(lambda: fleet.up)
            fleet.start()
        self._runtime = Runtime.build(config, self._upstream, self.telemetry.tracer, fleet=self.fleet)
        limits = config.main.limits
        server = ProxyWebServer(
            self._tracked(self._proxy),
            self._refused,
            max_line_size=limits.max_header_bytes,
            max_field_size=limits.max_header_bytes,
            max_headers=limits.max_headers,
            header_timeout=limits.header_timeout,
            auto_decompress=False,
            access_log=None,
            handler_cancellation=True,  # an app that hangs up stops its retries and frees its slot
        )
        self._runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=_CANCEL_GRACE_S)
        await self._runner.setup()
        await self._start_deliveries(config)
        await self._open(config.main.listen.port)
        for port in self.runtime.router.ports:
            await self._open(port)
        if config.main.webhooks is not None:
            assert self.deliveries is not None, "a webhooks section wants the delivery store"
            sink = self._webhook_sink or WebhookSink(self.deliveries)
            self._webhooks = WebhookListener(self._webhook_routes, sink, self.telemetry)
            await self._webhooks.start(config.main.webhooks.listen, limits, self._tracked)

    def _webhook_routes(self) -> tuple[WebhookRoutes, str]:
        """The running config's webhook routes (present while the listener runs: its ``listen``
        is restart-only, so a reload can neither add nor remove the section)."""
        runtime = self.runtime
        assert runtime.webhooks is not None
        return runtime.webhooks, runtime.config.version

    def build_runtime(self, config: Config) -> Runtime:
        """The runtime for `config`, carrying state over from the running one. Blocking: it renders
        ``${file:}`` secrets, so a reload calls it in a thread (the loop keeps serving)."""
        return Runtime.build(
            config, self.upstream, self.telemetry.tracer, previous=self.runtime, fleet=self.fleet
        )

    async def apply(self, config: Config, runtime: Runtime | None = None) -> None:
        """Swap in a validated config: open new policy ports, swap atomically, then close stale ports.

        Requests already running keep the runtime they started with; state of unchanged policy
        sections carries over. Raises OSError (old config still serving) when a new port can't
        bind, and ShuttingDown once stop() has begun. `runtime` is `build_runtime(config)` when the
        caller built it already.
        """
        async with self._listeners_lock:
            if self.draining:
                raise ShuttingDown("shutting down: reload refused")
            self.upstream.forget_tls_contexts()  # rotated CA or client certificates are read again
            if runtime is None:
                runtime = self.build_runtime(config)
            wanted = {config.main.listen.port, *runtime.router.ports}
            opened: list[int] = []
            try:
                for port in sorted(wanted - set(self._sites)):
                    await self._open(port)
                    opened.append(port)
            except OSError:
                for port in opened:
                    await self._close(port)
                raise
            await self._start_deliveries(config)
            self._runtime = runtime
            for port in sorted(set(self._sites) - wanted):
                await self._close(port)

    async def _start_deliveries(self, config: Config) -> None:
        """The store and worker, the first time a config asks for them; they then stay for the
        process's life (deliveries already stored outlive a reload that drops their policy)."""
        if self.deliveries is None and delivery.wanted(config):
            self.deliveries = delivery.DeliveryService(
                config.main.data_dir, lambda: self.runtime, self.telemetry
            )
            await self.deliveries.start()

    @property
    def upstream(self) -> UpstreamClient:
        assert self._upstream is not None, "server not started"
        return self._upstream

    async def _open(self, port: int) -> None:
        assert self._runner is not None
        host = self._initial.main.listen.host
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        self._sites[port] = site
        log.info("listening on %s:%d", host, port)

    async def _close(self, port: int) -> None:
        """Stop accepting on a port; connections already open there finish their requests."""
        await self._sites.pop(port).stop()
        log.info("closed port %d", port)

    @property
    def bound_ports(self) -> list[int]:
        return list(self._sites)

    async def drain(self, interrupted: asyncio.Event) -> DrainEnd:
        """Keep every listener serving, each response with ``Connection: close`` and /readyz at 503,
        until nothing has been in flight for drain_idle, drain_timeout has passed, or `interrupted`
        (a second signal) is set: the app's own shutdown-time calls still go through."""
        async with self._listeners_lock:
            self.draining = True
        main = self._initial.main
        tracker = self._drain = DrainTracker(
            main.drain_idle, main.drain_timeout, asyncio.get_running_loop().time
        )
        for _ in range(int(main.drain_timeout / _DRAIN_POLL_S) + 2):  # each pass sleeps >= the poll
            end, wait_s = tracker.verdict(len(self._in_flight))
            if end is not None:
                return end
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(wait_s, _DRAIN_POLL_S)):
                    await interrupted.wait()
            if interrupted.is_set():
                return "signal"
        return "timeout"

    async def stop(self, interrupted: asyncio.Event | None = None) -> None:
        """Stop accepting, let in-flight requests finish until drain_timeout (counted from the start
        of drain(), if it ran), cancel the rest, close the upstream pool, flush telemetry.

        Once `interrupted` is set (a second signal), in-flight requests are cancelled at once."""
        async with self._listeners_lock:
            self.draining = True
            for port in list(self._sites):
                await self._close(port)
            if self._webhooks is not None:
                await self._webhooks.close()
        loop = asyncio.get_running_loop()
        deadline = self._drain.deadline if self._drain else loop.time() + self._initial.main.drain_timeout
        stopped = interrupted if interrupted is not None else asyncio.Event()
        if self._in_flight and not stopped.is_set() and loop.time() < deadline:
            log.info("waiting for %d in-flight request(s)", len(self._in_flight))
            self._drained.clear()  # it may have been set while the listeners were still open
            waiters = [asyncio.ensure_future(event.wait()) for event in (self._drained, stopped)]
            try:
                await asyncio.wait(
                    waiters, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for waiter in waiters:
                    waiter.cancel()
        if self._in_flight:
            why = "second signal" if stopped.is_set() else "drain_timeout reached"
            log.warning("%s: cancelling %d request(s)", why, len(self._in_flight))
            for task in self._in_flight:
                task.cancel()
            await asyncio.wait(self._in_flight, timeout=_CANCEL_GRACE_S)
        if self.deliveries is not None:  # attempts in flight may finish within the drain's time
            grace = 0.0 if stopped.is_set() else deadline - loop.time()
            await self.deliveries.stop(grace)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._webhooks is not None:
            await self._webhooks.cleanup()
        if self._upstream is not None:
            await self._upstream.close()
        if self.fleet is not None:  # after the requests: their last breaker reports go out first
            await self.fleet.close()
        await asyncio.to_thread(self.telemetry.close)

    def _tracked(self, serve: Handler) -> Handler:
        """`serve` counted in flight, so drains and shutdown wait for it (proxy and webhook
        requests alike)."""

        async def tracked(request: web.BaseRequest) -> web.StreamResponse:
            task: asyncio.Task[object] | None = asyncio.current_task()
            assert task is not None
            self._in_flight.add(task)
            if self._drain is not None:
                self._drain.active()
            try:
                response = await serve(request)
            finally:
                self._in_flight.discard(task)
                if self._drain is not None:
                    self._drain.active()
                if self.draining and not self._in_flight:
                    self._drained.set()
            if self.draining and not response.prepared:
                response.force_close()  # Outrigger's own answers too: the client reconnects elsewhere
            return response

        return tracked

    async def _proxy(self, request: web.BaseRequest) -> web.StreamResponse:
        return await handler.proxy(
            request, self.runtime, self.telemetry, self.upstream, self.draining, self.deliveries
        )

    def _refused(self, request: web.BaseRequest, error: errors.OutriggerError) -> str:
        return handler.refused(request, error, self.runtime, self.telemetry)
