"""The proxy listener: entry modes, request limits, streaming, lifecycle and drain.

Three ways in (SPEC 2): a policy's dedicated ``listen`` port, an absolute-form
target (HTTP_PROXY), or the ``Host`` header. Every request takes one snapshot
of the current `Runtime`, so a reload never changes a request halfway.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler
from yarl import URL

from proxy import errors
from proxy.config.loader import Config
from proxy.config.model import Policy, UpstreamTarget
from proxy.exchange import CHUNK_SIZE, ProxyRequest, ProxyResponse, RequestBody, end_to_end_headers
from proxy.pipeline import Pipelines
from proxy.routing import Router, upstream_for
from proxy.upstream import UpstreamClient

log = logging.getLogger("outrigger.server")

ATTEMPTS_HEADER = "x-outrigger-attempts"
TIMEOUT_HEADER = "x-outrigger-timeout-ms"
_CONTROL_PREFIX = "x-outrigger-"
_NO_BODY_STATUSES = frozenset({204, 304})


@dataclass(frozen=True)
class Runtime:
    """Everything derived from one config; replaced as a whole on reload."""

    config: Config
    router: Router
    pipelines: Pipelines

    @classmethod
    def build(cls, config: Config, upstream: UpstreamClient) -> Runtime:
        router = Router(config)
        return cls(config, router, Pipelines(config, router, upstream))


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
        return response


class _ProxyServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _ProxyRequestHandler(self, loop=self._loop, **self._kwargs)


def _split_host(authority: str) -> tuple[str, int | None]:
    """`host[:port]` (IPv6 in brackets) -> (host, port); raises BadRequest when malformed."""
    try:
        url = URL(f"http://{authority}")
        host = url.raw_host
        explicit = url.explicit_port
    except ValueError:
        host = None
        explicit = None
    if not host or url.raw_path not in ("", "/") or url.user is not None:
        raise errors.BadRequest(f"invalid host {authority!r}")
    return host.lower(), explicit


class ProxyServer:
    def __init__(self, config: Config) -> None:
        self._upstream: UpstreamClient | None = None
        self._runtime: Runtime | None = None
        self._initial = config
        self._runner: web.BaseRunner | None = None
        self._sites: dict[int, web.TCPSite] = {}
        self.draining = False

    @property
    def runtime(self) -> Runtime:
        assert self._runtime is not None, "server not started"
        return self._runtime

    @property
    def ready(self) -> bool:
        return self._runtime is not None and not self.draining and bool(self._sites)

    async def start(self) -> None:
        config = self._initial
        self._upstream = UpstreamClient()
        self._runtime = Runtime.build(config, self._upstream)
        limits = config.main.limits
        server = _ProxyServer(
            self._handle,
            max_line_size=limits.max_header_bytes,
            max_field_size=limits.max_header_bytes,
            max_headers=limits.max_headers,
            auto_decompress=False,
            access_log=None,
        )
        self._runner = web.ServerRunner(
            server, handle_signals=False, shutdown_timeout=config.main.drain_timeout
        )
        await self._runner.setup()
        await self._open(config.main.listen.host, config.main.listen.port)
        for port in self.runtime.router.ports:
            await self._open(config.main.listen.host, port)

    async def _open(self, host: str, port: int) -> None:
        assert self._runner is not None
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        self._sites[port] = site
        log.info("listening on %s:%d", host, port)

    @property
    def bound_ports(self) -> list[int]:
        return list(self._sites)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish up to drain_timeout, then cancel them."""
        self.draining = True
        if self._runner is not None:
            await self._runner.cleanup()
        self._sites.clear()
        if self._upstream is not None:
            await self._upstream.close()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        runtime = self.runtime
        host_label = ""
        proxy_request: ProxyRequest | None = None
        try:
            self._check_header_size(request, runtime)
            if request.method == "CONNECT":
                raise errors.ConnectNotSupported(
                    "CONNECT tunnels bypass every policy: send plain http:// URLs to Outrigger"
                    " (HTTP_PROXY=http://127.0.0.1:15001) and it will originate TLS itself"
                )
            proxy_request = self._build_request(request, runtime)
            host_label = proxy_request.host
            match = runtime.router.resolve_route(
                proxy_request.policy, request.method, proxy_request.path_qs.partition("?")[0]
            )
            proxy_request.settings = match.settings
            response = await runtime.pipelines.handler(match)(proxy_request)
        except errors.OutriggerError as error:
            reply = error_response(error, error.host or host_label)
            if proxy_request is not None:
                reply.headers[ATTEMPTS_HEADER] = str(proxy_request.attempts)
            return reply
        return await self._stream(request, proxy_request, response)

    def _check_header_size(self, request: web.BaseRequest, runtime: Runtime) -> None:
        limit = runtime.config.main.limits.max_header_bytes
        size = len(request.method) + len(request.raw_path) + 11
        size += sum(len(name) + len(value) + 4 for name, value in request.raw_headers)
        if size > limit:
            raise errors.HeadersTooLarge(f"request line and headers are {size} bytes; the limit is {limit}")

    def _build_request(self, request: web.BaseRequest, runtime: Runtime) -> ProxyRequest:
        policy, host, target, path_qs = self._target(request, runtime)
        headers = end_to_end_headers(request.headers, frozenset({"host", "expect"}))
        timeout_override = None
        for name in [k for k in headers if k.lower().startswith(_CONTROL_PREFIX)]:
            value = headers.popone(name)
            if name.lower() == TIMEOUT_HEADER:
                timeout_override = _parse_timeout_ms(value)
        source = request.content.iter_chunked(CHUNK_SIZE) if request.body_exists else None
        return ProxyRequest(
            method=request.method,
            host=host,
            target=target,
            path_qs=path_qs,
            headers=headers,
            body=RequestBody(source, request.content_length),
            policy=policy,
            settings=policy.settings,
            timeout_override=timeout_override,
        )

    def _target(self, request: web.BaseRequest, runtime: Runtime) -> tuple[Policy, str, UpstreamTarget, str]:
        """Which policy, which upstream and which path: by local port, absolute URL or Host header."""
        raw_target = request.raw_path
        sockname: Any = request.transport.get_extra_info("sockname") if request.transport else None
        local_port = sockname[1] if sockname else None
        dedicated = runtime.router.policy_for_port(local_port) if local_port is not None else None
        if raw_target.lower().startswith(("http://", "https://")):
            url = URL(raw_target, encoded=True)
            if not url.raw_host:
                raise errors.BadRequest("absolute request target without a host")
            host, port = url.raw_host.lower(), url.explicit_port
            path_qs = url.raw_path_qs or "/"
        elif raw_target.startswith("/") or (raw_target == "*" and request.method == "OPTIONS"):
            path_qs = raw_target
            host_header = request.headers.get("Host")
            if dedicated is None and not host_header:
                raise errors.BadRequest("no Host header: Outrigger cannot tell which upstream to call")
            host, port = _split_host(host_header) if host_header else ("", None)
        else:
            raise errors.BadRequest(f"unsupported request target {raw_target[:100]!r}")
        if dedicated is not None:
            return dedicated, dedicated.name, upstream_for(dedicated, dedicated.name, None), path_qs
        policy = runtime.router.policy_for_host(host)
        if policy is None:
            raise errors.HostNotAllowed(
                f"no policy allows {host}; add it to a policy's hosts (or set unknown_hosts: allow)",
                host=host,
            )
        return policy, host, upstream_for(policy, host, port), path_qs

    async def _stream(
        self, request: web.BaseRequest, proxy_request: ProxyRequest, response: ProxyResponse
    ) -> web.StreamResponse:
        """Send the upstream response to the app as it arrives; abort the connection if it breaks."""
        out = web.StreamResponse(status=response.status, reason=response.reason, headers=response.headers)
        out.headers[ATTEMPTS_HEADER] = str(proxy_request.attempts)
        has_body = request.method != "HEAD" and response.status not in _NO_BODY_STATUSES
        try:
            await out.prepare(request)
            if has_body:
                async with asyncio.timeout_at(proxy_request.deadline):
                    async for chunk in response.body.chunks():
                        await out.write(chunk)
            await out.write_eof()
        except (errors.OutriggerError, TimeoutError, ConnectionError) as exc:
            log.warning("response to %s %s cut short: %s", request.method, proxy_request.target.host, exc)
            if request.transport is not None:
                request.transport.abort()
        finally:
            response.body.release()
        return out


def _parse_timeout_ms(value: str) -> float:
    try:
        millis = int(value)
    except ValueError:
        millis = 0
    if millis <= 0:
        raise errors.BadRequest(f"{TIMEOUT_HEADER} must be a positive integer number of milliseconds")
    return millis / 1000
