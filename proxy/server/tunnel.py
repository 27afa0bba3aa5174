"""CONNECT host:port as an opaque TCP tunnel, for policies with ``connect: tunnel`` (SPEC 2).

Outrigger cannot read what flows through a tunnel, so only what applies to
bytes applies: the allowlist on host and port, the SSRF guard on the
resolved address, `timeouts.connect` and `timeouts.idle`, the policy's
`concurrency` (an open tunnel counts as in flight), metrics, one SERVER
span and one access-log line per tunnel.
"""

from __future__ import annotations

from aiohttp import web

from proxy import errors
from proxy.config.model import Policy
from proxy.server.entry import connect_refusal
from proxy.server.respond import PassThroughResponse, error_response
from proxy.server.runtime import Runtime
from proxy.server.splice import Splice
from proxy.target import RequestTarget, split_authority
from proxy.telemetry import REQUEST_ID_HEADER, Telemetry
from proxy.transport import UpstreamClient


async def serve_connect(
    request: web.BaseRequest, runtime: Runtime, telemetry: Telemetry, upstream: UpstreamClient
) -> web.StreamResponse:
    host, port, problem = split_authority(request.raw_path)
    target = RequestTarget("https", host, port, "", False, problem)
    observation = telemetry.start(request.method, request.headers, target)
    policy: Policy | None = None
    status, result = 499, "cancelled"
    error_type: str | None = "cancelled"
    to_upstream = to_app = 0
    try:
        try:
            policy = _tunnel_policy(runtime, host, port, problem)
            bulkhead = runtime.pipelines.states[policy.name].bulkhead
            if bulkhead is not None:
                await bulkhead.acquire()
            try:
                assert port is not None
                connection = await upstream.open_tunnel(host, port, policy.settings)
                try:
                    out = PassThroughResponse(status=200, reason="Connection established")
                    out.headers[REQUEST_ID_HEADER] = observation.request_id
                    writer = await out.prepare(request)
                    assert writer is not None, "a fresh response always gets a writer"
                    out.force_close()
                    status, error_type, result = 200, None, "closed"  # an app hanging up: the usual end
                    splice = Splice(request, writer, connection, policy.settings.timeouts.idle)
                    try:
                        ending = await splice.run()
                    finally:
                        to_upstream, to_app = splice.to_upstream, splice.to_app
                finally:
                    connection.close()  # unpooled: nobody else would (idempotent after the splice's)
                result = ending
                if ending == "idle_timeout":
                    error_type = ending
                return out
            finally:
                if bulkhead is not None:
                    bulkhead.release()
        except errors.OutriggerError as error:
            status, error_type, result = error.status, error.error_type, error.condition or error.error_type
            reply = error_response(error, error.host or host)
            reply.headers[REQUEST_ID_HEADER] = observation.request_id
            return reply
    finally:
        name = policy.name if policy is not None else None
        telemetry.record_tunnel(name, result, to_upstream, to_app)
        telemetry.finish(
            observation,
            status=status,
            error_type=error_type,
            policy=name,
            request=None,
            state=runtime.pipelines.states.get(name) if name is not None else None,
            config_version=runtime.config.version,
        )


def _tunnel_policy(runtime: Runtime, host: str, port: int | None, problem: str | None) -> Policy:
    if problem is not None or port is None:
        raise errors.BadRequest(f"CONNECT needs host:port, got {host!r}")
    policy = runtime.router.policy_for_host(host, port)
    if policy is None:
        raise errors.HostNotAllowed(
            f"no policy allows {host}:{port}; add it to a policy's hosts (or set unknown_hosts: allow)",
            host=host,
        )
    if policy.settings.connect != "tunnel":
        raise connect_refusal(runtime, host)
    return policy
