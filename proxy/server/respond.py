"""Streaming the response back to the app, and the error responses Outrigger writes itself."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import HttpVersion10, HttpVersion11, hdrs, web

from proxy import errors
from proxy.exchange import ProxyRequest, ProxyResponse
from proxy.telemetry import REQUEST_ID_HEADER

log = logging.getLogger("outrigger.server")

ATTEMPTS_HEADER = "x-outrigger-attempts"
UPSTREAM_HEADER = "x-outrigger-upstream"
"""On responses of policies with ``failover``: the upstream that answered (scheme://host[:port])."""
_NO_BODY_STATUSES = frozenset({204, 304})


def error_response(error: errors.OutriggerError, host: str) -> web.Response:
    return ErrorResponse(status=error.status, body=error.body(host), headers=error.headers())


class ErrorResponse(web.Response):
    """Outrigger's own answer, always in HTTP/1.x: aiohttp writes the status line in the request's
    version, so a request line claiming ``HTTP/2.0`` (or none: HTTP/0.9) would get a refusal in a
    version Outrigger does not speak. Such a connection is closed after the answer."""

    def _speaks_http1(self) -> bool:
        request = self._req
        return request is None or request.version in (HttpVersion10, HttpVersion11)

    async def _prepare_headers(self) -> None:
        if not self._speaks_http1():
            self.force_close()
        await super()._prepare_headers()

    async def _write_headers(self) -> None:
        if self._speaks_http1():
            await super()._write_headers()
            return
        writer = self._payload_writer
        assert writer is not None
        await writer.write_headers(f"HTTP/1.1 {self.status} {self.reason}", self.headers)


class PassThroughResponse(web.StreamResponse):
    """A streamed upstream response without the Content-Type and Server headers aiohttp would
    invent when the upstream sent none (Date stays: RFC 9110 6.6.1 asks a forwarder to add it)."""

    def coalesce_head(self) -> None:
        """Hold the head back until the body is written, so a complete small response leaves in
        one write (aiohttp's StreamResponse otherwise sends the head at once, as it must when the
        body is still to come)."""
        self._send_headers_immediately = False

    async def _prepare_headers(self) -> None:
        invented = [name for name in (hdrs.CONTENT_TYPE, hdrs.SERVER) if name not in self.headers]
        length = self.headers.get(hdrs.CONTENT_LENGTH) if self.status == 304 else None
        await super()._prepare_headers()
        for name in invented:
            self.headers.popall(name, None)
        if length is not None:  # aiohttp drops it; on a 304 it is the selected representation's length
            self.headers[hdrs.CONTENT_LENGTH] = length


def name_upstream(out: web.StreamResponse, proxy_request: ProxyRequest) -> None:
    """``x-outrigger-upstream`` when the policy fails over (the failover layer ran)."""
    if proxy_request.failover is not None:
        out.headers[UPSTREAM_HEADER] = str(proxy_request.target)


async def stream_response(
    request: web.BaseRequest,
    proxy_request: ProxyRequest,
    response: ProxyResponse,
    request_id: str,
    draining: bool,
) -> tuple[web.StreamResponse, bool]:
    """Send the upstream response as it arrives; abort the connection if it breaks (False)."""
    out = PassThroughResponse(status=response.status, reason=response.reason, headers=response.headers)
    out.headers[ATTEMPTS_HEADER] = str(proxy_request.attempts)
    out.headers[REQUEST_ID_HEADER] = request_id
    name_upstream(out, proxy_request)
    if draining:
        out.force_close()  # tell keep-alive clients to reconnect elsewhere while we drain
    has_body = request.method != "HEAD" and response.status not in _NO_BODY_STATUSES
    whole = response.body.whole() if has_body else b""
    if whole is not None:
        out.coalesce_head()  # all there is, in one write with the head
    try:
        await out.prepare(request)
        if whole is not None:
            await out.write_eof(whole)
            return out, True
        stream = proxy_request.settings.timeouts.stream
        async with asyncio.timeout(stream) if stream is not None else contextlib.nullcontext():
            async for chunk in response.body.chunks():  # idle bounds each silence (transport)
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
