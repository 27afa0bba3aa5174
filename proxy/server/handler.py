"""One request through Outrigger: entry, the policy's pipeline, the response back, telemetry."""

from __future__ import annotations

from aiohttp import web

from proxy import errors
from proxy.delivery.intake import wants_async
from proxy.delivery.service import DeliveryService
from proxy.exchange import ProxyRequest
from proxy.layers.cache import CACHE_HEADER
from proxy.server.entry import build_request
from proxy.server.respond import ATTEMPTS_HEADER, error_response, stream_response
from proxy.server.runtime import Runtime
from proxy.server.splice import serve_upgrade
from proxy.server.tunnel import serve_connect
from proxy.target import parse_target
from proxy.telemetry import REQUEST_ID_HEADER, Telemetry
from proxy.transport import UpstreamClient


async def proxy(
    request: web.BaseRequest,
    runtime: Runtime,
    telemetry: Telemetry,
    upstream: UpstreamClient,
    draining: bool,
    deliveries: DeliveryService | None = None,
) -> web.StreamResponse:
    """One request from arrival to its last body byte; telemetry sees every outcome."""
    if request.method == "CONNECT":
        return await serve_connect(request, runtime, telemetry, upstream)
    target = parse_target(request.raw_path, request.host)
    observation = telemetry.start(request.method, request.headers, target)
    proxy_request: ProxyRequest | None = None
    status: int = 499  # until the request gets further (client gone, or cancelled by drain)
    error_type: str | None = "cancelled"
    try:
        try:
            proxy_request = build_request(request, runtime, target, observation)
            match = runtime.router.route_for(
                proxy_request.policy, request.method, proxy_request.path_qs.partition("?")[0]
            )
            proxy_request.settings = match.settings
            durable = proxy_request.policy.settings.delivery
            if durable is not None and deliveries is not None and wants_async(proxy_request.headers):
                response = await deliveries.accept(proxy_request, durable)  # stored, answered 202
            else:
                response = await runtime.pipelines.handler(match)(proxy_request)
        except errors.OutriggerError as error:
            status, error_type = error.status, error.error_type
            reply = error_response(error, error.host or (proxy_request.host if proxy_request else ""))
            reply.headers[REQUEST_ID_HEADER] = observation.request_id
            reply.headers[ATTEMPTS_HEADER] = str(proxy_request.attempts if proxy_request else 0)
            if proxy_request is not None and proxy_request.cache_result is not None:
                reply.headers[CACHE_HEADER] = proxy_request.cache_result  # every answer of a cached policy
            return reply
        status = response.status
        if response.tunnel is not None:  # 101: the connection is the upgraded protocol's now
            error_type = None
            out, ending = await serve_upgrade(
                request, proxy_request, response, observation.request_id, telemetry
            )
            error_type = "idle_timeout" if ending == "idle_timeout" else None
            return out
        out, completed = await stream_response(
            request, proxy_request, response, observation.request_id, draining
        )
        error_type = None if completed else "response_aborted"
        return out
    except Exception:
        status, error_type = 500, errors.OutriggerError.error_type
        raise
    finally:
        policy = proxy_request.policy.name if proxy_request is not None else None
        telemetry.finish(
            observation,
            status=status,
            error_type=error_type,
            policy=policy,
            request=proxy_request,
            state=runtime.pipelines.states.get(policy) if policy is not None else None,
            config_version=runtime.config.version,
        )


def refused(
    request: web.BaseRequest, error: errors.OutriggerError, runtime: Runtime, telemetry: Telemetry
) -> str:
    """Record a request the HTTP parser refused (log line, metrics, span); returns its request id."""
    target = parse_target(request.raw_path, request.host)
    observation = telemetry.start(request.method, request.headers, target)
    telemetry.finish(
        observation,
        status=error.status,
        error_type=error.error_type,
        policy=None,
        request=None,
        state=None,
        config_version=runtime.config.version,
    )
    return observation.request_id
