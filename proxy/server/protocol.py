"""aiohttp's HTTP/1.1 server, taught to answer what its parser refuses with our error bodies, and to
answer 408 to a connection whose first request head does not arrive in time (slowloris)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from proxy import errors
from proxy.server.respond import error_response
from proxy.telemetry import REQUEST_ID_HEADER

log = logging.getLogger("outrigger.server")

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
"""What a listener serves each request with (the proxy's, the webhook listener's)."""


class HeadTimeout(Exception):
    """The connection's first request head was not complete within `limits.header_timeout`."""


class RefusingRequestHandler(RequestHandler):
    """Answers requests the HTTP parser rejects with the SPEC 5 JSON body, not aiohttp's text.

    One timer per connection, armed when it opens, bounds the wait for its first request head:
    when it fires and no head has been parsed, a 408 goes through aiohttp's own error path (so it
    is logged and counted like a parser refusal) and the connection closes. The timer costs nothing
    per request; later heads on a kept-alive connection are bounded by the keep-alive timeout.
    """

    __slots__ = ("_head_timer", "_header_timeout")

    def __init__(self, manager: web.Server, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._head_timer = self._loop.call_later(self._header_timeout, self._head_overdue)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def _head_overdue(self) -> None:
        self._head_timer = None
        if self._request_count or self._force_close or self._close or self.transport is None:
            return
        message = f"no complete request head within {self._header_timeout:g}s of connecting"
        self._request_count += 1
        self._messages.append(
            (_ErrInfo(status=408, exc=HeadTimeout(message), message=message), EMPTY_PAYLOAD)
        )
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        error: errors.OutriggerError
        if isinstance(exc, HeadTimeout):
            error = errors.RequestTimeout(str(exc))
        elif isinstance(exc, LineTooLong) or (
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
        if isinstance(manager, ProxyWebServer):
            response.headers[REQUEST_ID_HEADER] = manager.on_refused(request, error)
        return response


class ProxyWebServer(web.Server):
    def __init__(
        self,
        handler: Handler,
        on_refused: Callable[[web.BaseRequest, errors.OutriggerError], str],
        *,
        header_timeout: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self.on_refused = on_refused
        """Records a request the HTTP parser refused (log line, metrics, span); returns its request id."""
        self.header_timeout = header_timeout

    def __call__(self) -> RequestHandler:
        return RefusingRequestHandler(
            self, loop=self._loop, header_timeout=self.header_timeout, **self._kwargs
        )
