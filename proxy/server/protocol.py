"""aiohttp's HTTP/1.1 server, taught to answer what its parser refuses with our error bodies."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler

from proxy import errors
from proxy.server.respond import error_response
from proxy.telemetry import REQUEST_ID_HEADER

log = logging.getLogger("outrigger.server")


class RefusingRequestHandler(RequestHandler):
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
        if isinstance(manager, ProxyWebServer):
            response.headers[REQUEST_ID_HEADER] = manager.on_refused(request, error)
        return response


class ProxyWebServer(web.Server):
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
        return RefusingRequestHandler(self, loop=self._loop, **self._kwargs)
