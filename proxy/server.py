"""The proxy listener: entry modes, request limits, streaming, lifecycle and drain.

Three ways in (SPEC 2): a policy's dedicated ``listen`` port, an absolute-form
target (HTTP_PROXY), or the ``Host`` header. Every request takes one snapshot
of the current `Runtime`, so a reload never changes a request halfway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import HttpVersion10, HttpVersion11, hdrs, web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler
from opentelemetry import trace

from proxy import errors
from proxy.config.loader import Config
from proxy.config.model import Policy, UpstreamTarget
from proxy.exchange import (
    CHUNK_SIZE,
    REQUEST_DROP,
    ProxyRequest,
    ProxyResponse,
    RequestBody,
    end_to_end_headers,
)
from proxy.pipeline import Pipelines, PolicyState
from proxy.routing import Router, dedicated_upstream, upstream_for
from proxy.target import RequestTarget, parse_target
from proxy.telemetry import REQUEST_ID_HEADER, RequestObservation, Telemetry
from proxy.transport import UpstreamClient

log = logging.getLogger("outrigger.server")

ATTEMPTS_HEADER = "x-outrigger-attempts"
TIMEOUT_HEADER = "x-outrigger-timeout-ms"
_NO_BODY_STATUSES = frozenset({204, 304})
_CANCEL_GRACE_S = 0.2
"""After drain_timeout, how long cancelled handlers get to unwind before the listener shuts down."""


@dataclass(frozen=True)
class Runtime:
    """Everything derived from one config; replaced as a whole on reload."""

    config: Config
    router: Router
    pipelines: Pipelines

    @classmethod
    def build(
        cls, config: Config, upstream: UpstreamClient, tracer: trace.Tracer, previous: Runtime | None = None
    ) -> Runtime:
        router = Router(config)
        pipelines = Pipelines(config, router, upstream, tracer, previous.pipelines if previous else None)
        return cls(config, router, pipelines)


def error_response(error: errors.OutriggerError, host: str) -> web.Response:
    return web.Response(status=error.status, body=error.body(host), headers=error.headers())


class _ProxyRequestHandler(RequestHandler):
    """Answers requests the HTTP parser rejects with the SPEC 5 JSON body, not aiohttp's text."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        error: errors.OutriggerError
        if isinstance(exc, LineTooLong) or (
            isinstance(exc, BadHttpMessage) and "too many headers" in str(exc).lower()
        ):
            error = errors.HeadersTooLarge("request line or headers exceed the configured limits")
        elif status == 400:
            error = errors.BadRequest(f"malformed request: {message or exc}")
        else:
            log.error("error while handling a request", exc_info=exc)
            return super().handle_error(request, status, exc, message)
        response = error_response(error, "")
        response.force_close()
        manager = self._manager
        if isinstance(manager, _ProxyServer):
            response.headers[REQUEST_ID_HEADER] = manager.on_refused(request, error)
        return response


class _ProxyServer(web.Server):
    def __init__(
        self,
        handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
        on_refused: Callable[[web.BaseRequest, errors.OutriggerError], str],
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self.on_refused = on_refused
        """Records a request the HTTP parser refused (log line, metrics, span); returns its request id."""

    def __call__(self) -> RequestHandler:
        return _ProxyRequestHandler(self, loop=self._loop, **self._kwargs)


class _PassThroughResponse(web.StreamResponse):
    """A streamed upstream response without the Content-Type and Server headers aiohttp would
    invent when the upstream sent none (Date stays: RFC 9110 6.6.1 asks a forwarder to add it)."""

    async def _prepare_headers(self) -> None:
        invented = [name for name in (hdrs.CONTENT_TYPE, hdrs.SERVER) if name not in self.headers]
        await super()._prepare_headers()
        for name in invented:
            self.headers.popall(name, None)


class ShuttingDown(Exception):
    """A reload arrived after shutdown began."""


class ProxyServer:
    """The proxy listeners (main and per-policy ports) and the current `Runtime`."""

    def __init__(self, config: Config) -> None:
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
        self.telemetry = Telemetry(config.main.telemetry, self._states)

    def _states(self) -> dict[str, PolicyState]:
        return self._runtime.pipelines.states if self._runtime is not None else {}

    @property
    def runtime(self) -> Runtime:
        assert self._runtime is not None, "server not started"
        return self._runtime

    @property
    def ready(self) -> bool:
        return self._runtime is not None and not self.draining and bool(self._sites)

    async def start(self) -> None:
        config = self._initial
        self._upstream = UpstreamClient(max_header_bytes=config.main.limits.max_header_bytes)
        self._runtime = Runtime.build(config, self._upstream, self.telemetry.tracer)
        limits = config.main.limits
        server = _ProxyServer(
            self._handle,
            self._refused,
            max_line_size=limits.max_header_bytes,
            max_field_size=limits.max_header_bytes,
            max_headers=limits.max_headers,
            auto_decompress=False,
            access_log=None,
            handler_cancellation=True,  # an app that hangs up stops its retries and frees its slot
        )
        self._runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=_CANCEL_GRACE_S)
        await self._runner.setup()
        await self._open(config.main.listen.port)
        for port in self.runtime.router.ports:
            await self._open(port)

    def build_runtime(self, config: Config) -> Runtime:
        """The runtime for `config`, carrying state over from the running one. Blocking: it renders
        ``${file:}`` secrets, so a reload calls it in a thread (the loop keeps serving)."""
        return Runtime.build(config, self.upstream, self.telemetry.tracer, previous=self.runtime)

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
            self._runtime = runtime
            for port in sorted(set(self._sites) - wanted):
                await self._close(port)

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

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish up to drain_timeout, then cancel the rest."""
        async with self._listeners_lock:
            self.draining = True
            for port in list(self._sites):
                await self._close(port)
        if self._in_flight:
            log.info("draining %d in-flight request(s)", len(self._in_flight))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._initial.main.drain_timeout):
                    await self._drained.wait()
        if self._in_flight:
            log.warning("drain_timeout reached: cancelling %d request(s)", len(self._in_flight))
            for task in self._in_flight:
                task.cancel()
            await asyncio.wait(self._in_flight, timeout=_CANCEL_GRACE_S)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._upstream is not None:
            await self._upstream.close()
        await asyncio.to_thread(self.telemetry.close)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        task: asyncio.Task[object] | None = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        try:
            return await self._proxy(request)
        finally:
            self._in_flight.discard(task)
            if self.draining and not self._in_flight:
                self._drained.set()

    def _refused(self, request: web.BaseRequest, error: errors.OutriggerError) -> str:
        runtime = self.runtime
        target = parse_target(request.raw_path, request.host)
        observation = self.telemetry.start(request.method, request.headers, target)
        self.telemetry.finish(
            observation,
            status=error.status,
            error_type=error.error_type,
            policy=None,
            request=None,
            state=None,
            config_version=runtime.config.version,
        )
        return observation.request_id

    async def _proxy(self, request: web.BaseRequest) -> web.StreamResponse:
        runtime = self.runtime
        target = parse_target(request.raw_path, request.host)
        observation = self.telemetry.start(request.method, request.headers, target)
        proxy_request: ProxyRequest | None = None
        status: int = 499  # until the request gets further (client gone, or cancelled by drain)
        error_type: str | None = "cancelled"
        try:
            try:
                proxy_request = self._build_request(request, runtime, target, observation)
                match = runtime.router.resolve_route(
                    proxy_request.policy, request.method, proxy_request.path_qs.partition("?")[0]
                )
                proxy_request.settings = match.settings
                response = await runtime.pipelines.handler(match)(proxy_request)
            except errors.OutriggerError as error:
                status, error_type = error.status, error.error_type
                reply = error_response(error, error.host or (proxy_request.host if proxy_request else ""))
                reply.headers[REQUEST_ID_HEADER] = observation.request_id
                reply.headers[ATTEMPTS_HEADER] = str(proxy_request.attempts if proxy_request else 0)
                return reply
            status = response.status
            out, completed = await self._stream(request, proxy_request, response, observation.request_id)
            error_type = None if completed else "response_aborted"
            return out
        except Exception:
            status, error_type = 500, errors.OutriggerError.error_type
            raise
        finally:
            policy = proxy_request.policy.name if proxy_request is not None else None
            self.telemetry.finish(
                observation,
                status=status,
                error_type=error_type,
                policy=policy,
                request=proxy_request,
                state=runtime.pipelines.states.get(policy) if policy is not None else None,
                config_version=runtime.config.version,
            )

    def _check_header_size(self, request: web.BaseRequest, runtime: Runtime) -> None:
        limit = runtime.config.main.limits.max_header_bytes
        size = len(request.method) + len(request.raw_path) + 11
        size += sum(len(name) + len(value) + 4 for name, value in request.raw_headers)
        if size > limit:
            raise errors.HeadersTooLarge(f"request line and headers are {size} bytes; the limit is {limit}")

    def _build_request(
        self,
        request: web.BaseRequest,
        runtime: Runtime,
        target: RequestTarget,
        observation: RequestObservation,
    ) -> ProxyRequest:
        self._check_header_size(request, runtime)
        if request.version not in (HttpVersion10, HttpVersion11):
            raise errors.BadRequest(
                f"unsupported protocol version HTTP/{request.version[0]}.{request.version[1]}"
            )
        if request.method == "CONNECT":
            listen = runtime.config.main.listen
            raise errors.ConnectNotSupported(
                "CONNECT tunnels bypass every policy: send plain http:// URLs to Outrigger"
                f" (HTTP_PROXY=http://{listen.host}:{listen.port}) and it will originate TLS itself",
                host=request.raw_path.rpartition(":")[0].strip("[]").lower(),
            )
        policy, host, upstream, path_qs = self._route(request, runtime, target)
        headers, control = end_to_end_headers(request.headers.items(), REQUEST_DROP)
        timeout_override = None
        for name, value in control:
            if name == TIMEOUT_HEADER:
                timeout_override = _parse_timeout_ms(value)
        headers[REQUEST_ID_HEADER] = observation.request_id
        source = _request_body(request) if request.body_exists else None
        return ProxyRequest(
            method=request.method,
            host=host,
            target=upstream,
            path_qs=path_qs,
            headers=headers,
            body=RequestBody(source, request.content_length),
            policy=policy,
            settings=policy.settings,
            timeout_override=timeout_override,
            request_id=observation.request_id,
            trace_context=observation.context,
            traced=observation.context is not None,
            traceparent=observation.traceparent,
        )

    def _route(
        self, request: web.BaseRequest, runtime: Runtime, target: RequestTarget
    ) -> tuple[Policy, str, UpstreamTarget, str]:
        """Which policy, which upstream and which path: by local port, absolute URL or Host header."""
        sockname: Any = request.transport.get_extra_info("sockname") if request.transport else None
        local_port = sockname[1] if sockname else None
        dedicated = runtime.router.policy_for_port(local_port) if local_port is not None else None
        if target.problem is not None:
            raise errors.BadRequest(target.problem)
        path_qs = target.path_qs
        if target.absolute:
            host, port = target.host, target.port
        else:
            host_header = request.headers.get("Host")
            if dedicated is None and not host_header:
                raise errors.BadRequest("no Host header: Outrigger cannot tell which upstream to call")
            host, port = (target.host, target.port) if host_header else ("", None)
        if dedicated is not None:
            return dedicated, dedicated.name, dedicated_upstream(dedicated), path_qs
        policy = runtime.router.policy_for_host(host)
        if policy is None:
            raise errors.HostNotAllowed(
                f"no policy allows {host}; add it to a policy's hosts (or set unknown_hosts: allow)",
                host=host,
            )
        return policy, host, upstream_for(policy, host, port), path_qs

    async def _stream(
        self, request: web.BaseRequest, proxy_request: ProxyRequest, response: ProxyResponse, request_id: str
    ) -> tuple[web.StreamResponse, bool]:
        """Send the upstream response as it arrives; abort the connection if it breaks (False)."""
        out = _PassThroughResponse(status=response.status, reason=response.reason, headers=response.headers)
        out.headers[ATTEMPTS_HEADER] = str(proxy_request.attempts)
        out.headers[REQUEST_ID_HEADER] = request_id
        if self.draining:
            out.force_close()  # tell keep-alive clients to reconnect elsewhere while we drain
        has_body = request.method != "HEAD" and response.status not in _NO_BODY_STATUSES
        try:
            await out.prepare(request)
            if has_body:  # idle bounds each silence (in the transport); stream, if set, the whole body
                async with asyncio.timeout(proxy_request.settings.timeouts.stream):
                    async for chunk in response.body.chunks():
                        await out.write(chunk)
            await out.write_eof()
        except (errors.OutriggerError, TimeoutError, ConnectionError) as exc:
            log.warning("response to %s %s cut short: %s", request.method, proxy_request.host, exc)
            if request.transport is not None:
                request.transport.abort()
            return out, False
        finally:
            response.body.release()
        return out, True


async def _request_body(request: web.BaseRequest) -> AsyncIterator[bytes]:
    """The app's body, streamed; answers ``Expect: 100-continue`` only once a layer wants the body,
    so a request refused locally (403, 429, ...) is answered without inviting the upload."""
    if request.version == HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    async for chunk in request.content.iter_chunked(CHUNK_SIZE):
        yield chunk


def _parse_timeout_ms(value: str) -> float:
    try:
        millis = int(value)
    except ValueError:
        millis = 0
    if millis <= 0:
        raise errors.BadRequest(f"{TIMEOUT_HEADER} must be a positive integer number of milliseconds")
    return millis / 1000
