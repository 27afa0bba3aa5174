"""Bytes both ways between the app's connection and an upstream tunnel (SPEC 2).

Used after ``101 Switching Protocols`` (WebSockets and other upgrades) and for
CONNECT tunnels. The app's bytes arrive through aiohttp's upgraded-connection
hook (``RequestHandler.set_parser``: aiohttp buffers what follows an upgrade
until a parser is set) and go straight to the upstream transport; the
upstream's bytes go straight to the app's transport. A full buffer on either
side pauses reading on the other. The splice ends when either side closes or
`idle` passes without a byte in either direction.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal, cast

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from proxy.exchange import ProxyRequest, ProxyResponse, Tunnel
from proxy.server.respond import ATTEMPTS_HEADER, PassThroughResponse, name_upstream
from proxy.telemetry import REQUEST_ID_HEADER, Telemetry

HIGH_WATER = 256 * 1024
"""Bytes waiting for the app beyond which reading from the upstream pauses."""

Ending = Literal["closed", "idle_timeout"]


class Splice:
    def __init__(
        self, request: web.BaseRequest, writer: AbstractStreamWriter, tunnel: Tunnel, idle: float
    ) -> None:
        self._request = request
        self._writer = writer
        self._tunnel = tunnel
        self._idle = idle
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._done: asyncio.Future[Ending] = loop.create_future()
        self._last_byte = loop.time()
        self._draining: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.to_upstream = 0
        self.to_app = 0

    async def run(self) -> Ending:
        """Until one side closes (``closed``) or both fall silent for `idle` (``idle_timeout``)."""
        protocol = cast(Any, self._request.protocol)  # typed for aiohttp's WebSocketReader only
        protocol.set_parser(self)
        self._tunnel.attach(self)
        self._timer = self._loop.call_later(self._idle, self._check_idle)
        try:
            return await self._done
        finally:
            self._timer.cancel()
            if self._draining is not None:
                self._draining.cancel()
            self._tunnel.close()

    # --- the app's bytes (aiohttp calls these as it would a payload parser)

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self._last_byte = self._loop.time()
        self.to_upstream += len(data)
        self._tunnel.send(data)
        return False, b""

    def feed_eof(self) -> None:
        self._end("closed")

    # --- the upstream's bytes (TunnelSink)

    def received(self, data: bytes) -> None:
        transport = self._request.transport
        if transport is None or transport.is_closing():
            self._end("closed")
            return
        self._last_byte = self._loop.time()
        self.to_app += len(data)
        transport.write(data)
        if self._draining is None and transport.get_write_buffer_size() > HIGH_WATER:
            self._tunnel.pause_reading()
            self._draining = asyncio.ensure_future(self._drain())

    def ended(self) -> None:
        self._end("closed")

    def upstream_writable(self, writable: bool) -> None:
        transport = self._request.transport
        if transport is None or transport.is_closing():
            return
        if writable:
            transport.resume_reading()
        else:
            transport.pause_reading()

    # --- internals

    async def _drain(self) -> None:
        try:
            await self._writer.drain()
        finally:
            self._draining = None
            self._tunnel.resume_reading()

    def _check_idle(self) -> None:
        silent_until = self._last_byte + self._idle
        if self._loop.time() >= silent_until:
            self._end("idle_timeout")
        else:
            self._timer = self._loop.call_at(silent_until, self._check_idle)

    def _end(self, ending: Ending) -> None:
        if not self._done.done():
            self._done.set_result(ending)


async def serve_upgrade(
    request: web.BaseRequest,
    proxy_request: ProxyRequest,
    response: ProxyResponse,
    request_id: str,
    telemetry: Telemetry,
) -> tuple[web.StreamResponse, Ending]:
    """Answer the app's upgrade with the upstream's 101, then splice until either side ends (an app
    that hangs up ends it too: its handler is cancelled, which is an orderly end here)."""
    assert response.tunnel is not None
    out = PassThroughResponse(status=101, reason=response.reason, headers=response.headers)
    out.headers[ATTEMPTS_HEADER] = str(proxy_request.attempts)
    out.headers[REQUEST_ID_HEADER] = request_id
    name_upstream(out, proxy_request)
    splice: Splice | None = None
    try:
        writer = await out.prepare(request)
        assert writer is not None, "a fresh response always gets a writer"
        out.force_close()  # after the upgraded protocol ends, the connection ends too
        splice = Splice(request, writer, response.tunnel, proxy_request.settings.timeouts.idle)
        return out, await splice.run()
    finally:
        response.body.release()  # ends the attempt's span, frees the bulkhead slot
        if splice is not None:
            telemetry.record_tunnel(proxy_request.policy.name, None, splice.to_upstream, splice.to_app)
