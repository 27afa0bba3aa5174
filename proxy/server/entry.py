"""The three ways in (SPEC 2), turning an aiohttp request into a `ProxyRequest`.

A policy's dedicated ``listen`` port, an absolute-form target (HTTP_PROXY), or
the ``Host`` header name the policy; the request line and headers are checked
against the limits, and the headers are copied without hop-by-hop ones.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from aiohttp import HttpVersion10, HttpVersion11, web
from multidict import MultiMapping

from proxy import errors
from proxy.addresses import is_loopback_literal
from proxy.config.model import DEFAULT_PORTS, Policy, UpstreamTarget
from proxy.exchange import (
    CHUNK_SIZE,
    DEFAULT_PRIORITY,
    PRIORITIES,
    REQUEST_DROP,
    ProxyRequest,
    RequestBody,
    end_to_end_headers,
)
from proxy.routing import dedicated_upstream, upstream_for
from proxy.server.runtime import Runtime
from proxy.target import RequestTarget
from proxy.telemetry import REQUEST_ID_HEADER, RequestObservation

TIMEOUT_HEADER = "x-outrigger-timeout-ms"
PRIORITY_HEADER = "x-outrigger-priority"
FAULT_HEADER = "x-outrigger-fault"
"""``on`` opts a request into a ``header_only`` fault drill."""


def check_header_size(request: web.BaseRequest, runtime: Runtime) -> None:
    limit = runtime.config.main.limits.max_header_bytes
    size = len(request.method) + len(request.raw_path) + 11
    size += sum(len(name) + len(value) + 4 for name, value in request.raw_headers)
    if size > limit:
        raise errors.HeadersTooLarge(f"request line and headers are {size} bytes; the limit is {limit}")


def build_request(
    request: web.BaseRequest,
    runtime: Runtime,
    target: RequestTarget,
    observation: RequestObservation,
) -> ProxyRequest:
    check_header_size(request, runtime)
    if request.version not in (HttpVersion10, HttpVersion11):
        raise errors.BadRequest(
            f"unsupported protocol version HTTP/{request.version[0]}.{request.version[1]}"
        )
    policy, host, upstream, path_qs = route(request, runtime, target)
    headers, control = end_to_end_headers(request.headers.items(), REQUEST_DROP)
    timeout_override = None
    fault_requested = False
    priority = DEFAULT_PRIORITY
    for name, value in control:
        if name == TIMEOUT_HEADER:
            timeout_override = parse_timeout_ms(value)
        elif name == PRIORITY_HEADER:
            priority = parse_priority(value)
        elif name == FAULT_HEADER:
            fault_requested = value.strip().lower() == "on"
    headers[REQUEST_ID_HEADER] = observation.request_id
    source = request_body(request) if request.body_exists else None
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
        priority=priority,
        fault_requested=fault_requested,
        upgrade=upgrade_protocol(request.headers),
        request_id=observation.request_id,
        trace_context=observation.context,
        traced=observation.context is not None,
        traceparent=observation.traceparent,
    )


UPGRADABLE = frozenset({"websocket", "tcp"})
"""What aiohttp's parser switches to raw bytes for; other Upgrade requests (h2c) go on as HTTP/1.1."""


def upgrade_protocol(headers: MultiMapping[str]) -> str | None:
    """The protocol an upgrade request asks for, when it is one Outrigger can splice."""
    protocol = headers.get("Upgrade")
    if protocol is None or protocol.strip().lower() not in UPGRADABLE:
        return None
    tokens = {t.strip().lower() for value in headers.getall("Connection", ()) for t in value.split(",")}
    return protocol.strip() if "upgrade" in tokens else None


def connect_refusal(runtime: Runtime, host: str) -> errors.ConnectNotSupported:
    listen = runtime.config.main.listen
    return errors.ConnectNotSupported(
        "CONNECT tunnels bypass every policy: send plain http:// URLs to Outrigger"
        f" (HTTP_PROXY=http://{listen.host}:{listen.port}) and it will originate TLS itself,"
        " or set connect: tunnel in the host's policy",
        host=host,
    )


def route(
    request: web.BaseRequest, runtime: Runtime, target: RequestTarget
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
        if host and not _names_this_port(host, port, dedicated, runtime):
            raise errors.HostNotAllowed(
                f"port {local_port} serves only {dedicated.name}: Host {host} is refused here"
                " (use localhost, a loopback address or one of the policy's hosts)",
                host=host,
            )
        return dedicated, dedicated.name, dedicated_upstream(dedicated), path_qs
    policy = runtime.router.policy_for_host(host, port)
    if policy is None:
        claimed = "" if port in DEFAULT_PORTS else f":{port}"
        raise errors.HostNotAllowed(
            f"no policy allows {host}{claimed}; add it to a policy's hosts"
            f"{' (with its port)' if claimed else ''} (or set unknown_hosts: allow)",
            host=host,
        )
    return policy, host, upstream_for(policy, host, port), path_qs


def _names_this_port(host: str, port: int | None, dedicated: Policy, runtime: Runtime) -> bool:
    """A dedicated port answers only for itself: a page using DNS rebinding (Host: evil.example)
    must not borrow the credentials this policy injects (SPEC 2)."""
    if host == "localhost" or is_loopback_literal(host):
        return True
    router = runtime.router
    return router.policy_for_host(host) is dedicated or router.policy_for_host(host, port) is dedicated


async def request_body(request: web.BaseRequest) -> AsyncIterator[bytes]:
    """The app's body, streamed; answers ``Expect: 100-continue`` only once a layer wants the body,
    so a request refused locally (403, 429, ...) is answered without inviting the upload."""
    if request.version == HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    async for chunk in request.content.iter_chunked(CHUNK_SIZE):
        yield chunk


def parse_timeout_ms(value: str) -> float:
    """Digits only, and few enough that the seconds are a float (a 400-digit value is a 400)."""
    millis = int(value) if value.isdigit() and len(value) <= 12 else 0
    if millis <= 0:
        raise errors.BadRequest(f"{TIMEOUT_HEADER} must be a positive integer number of milliseconds")
    return millis / 1000


def parse_priority(value: str) -> str:
    """``high``, ``normal`` or ``low`` (any case); anything else is a 400, like a bad timeout."""
    priority = value.strip().lower()
    if priority not in PRIORITIES:
        raise errors.BadRequest(f"{PRIORITY_HEADER} must be one of {', '.join(PRIORITIES)}")
    return priority
