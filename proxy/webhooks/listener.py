"""The inbound webhook listener (SPEC 11): its own port, exact-path routes, POST only.

One request: find its route (404), refuse other methods (405), refuse a body above the route's
``max_body_bytes`` before reading it (Content-Length) or as soon as it grows past it (413, the
connection closed so the rest is never read), verify the raw bytes (401), hand the event to the
`EventSink` and answer from its `Acceptance` (200, or 503 ``store_unavailable``).

Routes and keys come from the current runtime on each request, so a reload swaps them without
touching the socket. The request line and headers obey the main ``limits`` (431).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiohttp import web

from proxy import errors
from proxy.config.defaults import WEBHOOK_BODY_TIMEOUT_S
from proxy.config.model import Limits, ListenAddress
from proxy.server.protocol import Handler, ProxyWebServer
from proxy.server.respond import error_response
from proxy.telemetry import REQUEST_ID_HEADER, Telemetry
from proxy.telemetry.tracing import recorded_traceparent
from proxy.telemetry.webhooks import WebhookObservation, WebhookOutcome, WebhookTelemetry
from proxy.webhooks.routes import WebhookRoute, WebhookRoutes
from proxy.webhooks.sink import Acceptance, EventSink, VerifiedEvent

log = logging.getLogger("outrigger.webhooks")

Current = Callable[[], tuple[WebhookRoutes, str]]
"""The routes of the running config and its version, read once per request."""

_RESULTS: dict[type[errors.OutriggerError], str] = {
    errors.SignatureInvalid: "signature_invalid",
    errors.SignatureExpired: "signature_expired",
    errors.BodyTooLarge: "too_large",
    errors.StoreUnavailable: "unavailable",
}
_REFUSED = (errors.WebhookRefused, errors.RequestTimeout, errors.BodyTooLarge, errors.StoreUnavailable)
"""What a webhook request may be refused with (the last three are shared with the proxy listener)."""
_ANSWERS = {Acceptance.STORED: "accepted", Acceptance.DUPLICATE: "duplicate"}
_CANCEL_GRACE_S = 0.2


class WebhookListener:
    def __init__(
        self,
        current: Current,
        sink: EventSink,
        telemetry: Telemetry,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._current = current
        self._sink = sink
        self._telemetry = WebhookTelemetry(telemetry)
        self._now = now
        """Unix time, for signed timestamps (injected: tests sign with a fixed clock)."""
        self._runner: web.ServerRunner | None = None
        self._site: web.TCPSite | None = None

    @property
    def listening(self) -> bool:
        return self._site is not None

    async def start(self, address: ListenAddress, limits: Limits, wrap: Callable[[Handler], Handler]) -> None:
        """Listen on `address`; `wrap` lets the owner track each request (drain)."""
        server = ProxyWebServer(
            wrap(self.handle),
            self._refused,
            max_line_size=limits.max_header_bytes,
            max_field_size=limits.max_header_bytes,
            max_headers=limits.max_headers,
            header_timeout=limits.header_timeout,  # this listener faces the internet: slowloris too
            auto_decompress=False,  # the signature covers the bytes as sent
            access_log=None,
            handler_cancellation=True,
            lingering_time=0,  # a refused body is not read on after the answer: the connection closes
        )
        self._runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=_CANCEL_GRACE_S)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, address.host, address.port, reuse_address=True)
        await self._site.start()
        log.info("webhooks listening on %s:%d", address.host, address.port)

    async def close(self) -> None:
        """Stop accepting; requests already in flight go on (the owner waits for them)."""
        if self._site is not None:
            await self._site.stop()
            self._site = None

    async def cleanup(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        routes, version = self._current()
        observation = self._telemetry.start(request.method, request.raw_path, request.headers)
        outcome = WebhookOutcome(499, "cancelled", None)  # until it gets further (client gone, drain)
        try:
            route = routes.get(request.raw_path.partition("?")[0])
            if route is None:
                outcome = WebhookOutcome(404, errors.WebhookNotFound.error_type, None)
                return self._refusal(errors.WebhookNotFound("no webhook route has this path"), observation)
            outcome = WebhookOutcome(499, "cancelled", route.name, route.scheme)
            try:
                outcome, response = await self._serve(request, route, observation)
            except _REFUSED as error:
                outcome = WebhookOutcome(
                    error.status, error.error_type, route.name, route.scheme, _RESULTS.get(type(error))
                )
                response = self._refusal(error, observation)
            return response
        except Exception:
            outcome = WebhookOutcome(500, errors.OutriggerError.error_type, outcome.route, outcome.scheme)
            raise
        finally:
            self._telemetry.finish(observation, outcome, version)

    async def _serve(
        self, request: web.BaseRequest, route: WebhookRoute, observation: WebhookObservation
    ) -> tuple[WebhookOutcome, web.StreamResponse]:
        if request.method != "POST":
            raise errors.WebhookMethodNotAllowed(f"webhook routes accept POST only, not {request.method}")
        received_at = self._now()
        body = await _read_body(request, route.settings.max_body_bytes)
        route.verify(body, request.headers, request.raw_path.partition("?")[2], received_at)
        event_id = route.event_id(body, request.headers)
        event = VerifiedEvent(
            route=route.name,
            scheme=route.scheme,
            event_id=event_id,
            body=body,
            headers=tuple(request.headers.items()),
            received_at=received_at,
            traceparent=recorded_traceparent(observation.span),
        )
        acceptance = await self._accept(route, event)
        if acceptance is Acceptance.UNAVAILABLE:
            raise errors.StoreUnavailable("the event could not be stored; send it again later")
        result = _ANSWERS[acceptance]
        response = web.json_response({"status": acceptance.value})
        response.headers[REQUEST_ID_HEADER] = observation.request_id
        return WebhookOutcome(200, None, route.name, route.scheme, result, event_id), response

    async def _accept(self, route: WebhookRoute, event: VerifiedEvent) -> Acceptance:
        try:
            return await self._sink.accept(route, event)
        except Exception:  # the provider retries a 503; a store bug must not become a 500 loop
            log.exception("webhooks: the event sink failed for route %s", route.name)
            return Acceptance.UNAVAILABLE

    def _refusal(self, error: errors.OutriggerError, observation: WebhookObservation) -> web.Response:
        response = error_response(error, "")
        response.headers[REQUEST_ID_HEADER] = observation.request_id
        if isinstance(error, errors.BodyTooLarge | errors.RequestTimeout):
            response.force_close()  # the unread rest of the body is never read
        return response

    def _refused(self, request: web.BaseRequest, error: errors.OutriggerError) -> str:
        """A request the HTTP parser refused (headers over the limits): logged and traced."""
        _, version = self._current()
        observation = self._telemetry.start(request.method, request.raw_path, request.headers)
        self._telemetry.finish(observation, WebhookOutcome(error.status, error.error_type, None), version)
        return observation.request_id


async def _read_body(request: web.BaseRequest, limit: int) -> bytes:
    """The body as sent, refused once it is known to exceed `limit` (nothing more is read)."""
    length = request.content_length
    if length is not None and length > limit:
        raise errors.BodyTooLarge(f"the body is {length} bytes; this route accepts at most {limit}")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(WEBHOOK_BODY_TIMEOUT_S):
            while chunk := await request.content.readany():
                size += len(chunk)
                if size > limit:
                    raise errors.BodyTooLarge(f"the body exceeds {limit} bytes, the most this route accepts")
                chunks.append(chunk)
    except TimeoutError:
        raise errors.RequestTimeout(f"the body did not arrive within {WEBHOOK_BODY_TIMEOUT_S:g}s") from None
    return b"".join(chunks)
