"""The ``webhook`` source (SPEC 11): a verified event is stored, answered 200, then forwarded.

`WebhookSink` is the listener's `EventSink`. It stores the event (committed before the listener
answers 200) with the provider's event id as its dedupe key: a redelivery within the route's
``dedupe`` window is acknowledged but neither stored nor forwarded again.

`WebhookDispatcher` forwards a stored event to the route's ``forward`` URL with the original body
bytes and headers, hop-by-hop ones, Host and Expect removed, and any ``x-outrigger-*`` the sender
made up removed too, so only Outrigger's own reach the app. Content-Type and the provider's
signature headers are kept, so the app can verify the event again. Outrigger adds
``x-outrigger-webhook-verified: <scheme>`` (the scheme that verified it, stored with the event)
and ``x-outrigger-delivery-id``. The route is looked up by path in the config running at
delivery time, so after a reload the new ``forward`` and ``delivery`` settings apply to events
already stored. An event whose route is gone waits (worker.py).

Every answer except a 2xx is retried, 4xx included. The provider was told 200 and will not send
the event again, so giving up on the first refusal would lose it. An app that keeps refusing
leaves the event ``dead`` after ``max_attempts`` or ``ttl``: it is kept, can be looked at, and
can be retried once the app is fixed. A ``Retry-After`` from the app is honoured up to
``backoff.max``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from multidict import CIMultiDict
from opentelemetry.context import Context
from yarl import URL

from proxy import errors
from proxy.config.defaults import WEBHOOK_FORWARD_CONNECT_S, WEBHOOK_FORWARD_TIMEOUT_S
from proxy.config.model import DeliveryRetries, Policy, PolicySettings, Timeouts, UpstreamTarget
from proxy.delivery.store import Delivery, NewDelivery
from proxy.delivery.worker import Attempt, settle
from proxy.exchange import REQUEST_DROP, ProxyRequest, RequestBody, end_to_end_headers
from proxy.provider_headers import retry_after_seconds
from proxy.telemetry.names import DELIVERY_ID_HEADER, WEBHOOK_VERIFIED_HEADER
from proxy.webhooks.routes import WebhookRoute
from proxy.webhooks.sink import Acceptance, VerifiedEvent

if TYPE_CHECKING:
    from proxy.delivery.service import DeliveryService
    from proxy.server.runtime import Runtime

log = logging.getLogger("outrigger.webhooks")

FORWARD_SETTINGS = PolicySettings(
    # the app is on loopback (or in the pod) by design, and `forward` is the operator's, never a sender's
    allow_private_addresses=True,
    timeouts=Timeouts(
        connect=WEBHOOK_FORWARD_CONNECT_S,
        per_try=WEBHOOK_FORWARD_TIMEOUT_S,
        total=WEBHOOK_FORWARD_TIMEOUT_S,
        idle=WEBHOOK_FORWARD_TIMEOUT_S,
    ),
)
"""How the transport reaches the app: no policy layers, the worker does the retrying."""


def stored_headers(event: VerifiedEvent) -> tuple[tuple[str, str], ...]:
    """The headers the app will get, as they are stored: the sender's end-to-end headers in arrival
    order (repeats kept) without Host, Expect or ``x-outrigger-*``, plus the verifying scheme."""
    kept, _ = end_to_end_headers(event.headers, REQUEST_DROP)
    return (*kept.items(), (WEBHOOK_VERIFIED_HEADER, event.scheme))


def forward_request(route: WebhookRoute, delivery: Delivery, context: Context, traced: bool) -> ProxyRequest:
    """One forward attempt of a stored event to the route's current ``forward`` URL."""
    url = URL(route.settings.forward)
    target = UpstreamTarget.of_url(url)
    headers = CIMultiDict(delivery.headers)
    headers[DELIVERY_ID_HEADER] = delivery.id
    policy = Policy(
        hosts=(target.host,),
        upstream=target,
        listen=None,
        settings=FORWARD_SETTINGS,
        routes=(),
        source=f"webhooks.routes {route.name}",
    )
    return ProxyRequest(
        method=delivery.method,
        host=target.host,
        target=target,
        path_qs=url.raw_path_qs,
        headers=headers,
        body=RequestBody.held(delivery.body),
        policy=policy,
        settings=FORWARD_SETTINGS,
        request_id=delivery.id,
        trace_context=context,
        traced=traced,
        delivery_id=delivery.id,
    )


class WebhookSink:
    """The listener's `EventSink`: verified events go into the delivery store."""

    def __init__(self, service: DeliveryService) -> None:
        self._service = service

    async def accept(self, route: WebhookRoute, event: VerifiedEvent) -> Acceptance:
        settings = route.settings
        forward = URL(settings.forward)
        delivery = NewDelivery(
            kind="webhook",
            source=route.name,
            method="POST",
            host=forward.host or "",
            path_qs=forward.raw_path_qs,
            headers=stored_headers(event),
            body=event.body,
            expires_at=self._service.clock.wall() + settings.delivery.ttl,
            target=settings.forward,
            traceparent=event.traceparent,
            dedupe_key=event.event_id,
            dedupe_window=settings.dedupe,
        )
        try:
            stored = await self._service.enqueue(delivery)
        except errors.StoreUnavailable as error:
            log.warning("webhooks: event for route %s not stored: %s", route.name, error)
            return Acceptance.UNAVAILABLE
        return Acceptance.DUPLICATE if stored.duplicate else Acceptance.STORED


class WebhookDispatcher:
    def __init__(self, runtime: Callable[[], Runtime], wall: Callable[[], float]) -> None:
        self._runtime = runtime
        self._wall = wall

    def settings(self, delivery: Delivery) -> DeliveryRetries | str:
        runtime = self._runtime()
        route = _route(runtime, delivery.source)
        if route is None:
            return (
                f"webhook route {delivery.source} is not in the current config (version"
                f" {runtime.config.version}); waiting for it until the delivery's ttl ends"
            )
        return route.settings.delivery

    async def send(self, delivery: Delivery, context: Context, traced: bool) -> Attempt:
        runtime = self._runtime()
        route = _route(runtime, delivery.source)
        assert route is not None  # settings() found it just before, with no await in between
        try:
            response = await runtime.pipelines.forward(forward_request(route, delivery, context, traced))
        except errors.OutriggerError as error:  # connect failure, reset, timeout: the app never answered
            return Attempt(None, error.condition or error.error_type, retryable=True)
        await settle(response)
        if 200 <= response.status < 300:
            return Attempt(response.status)
        retry_after = retry_after_seconds(response.headers.get("Retry-After"), self._wall())
        if retry_after is not None:
            retry_after = min(retry_after, route.settings.delivery.backoff.max)
        return Attempt(response.status, None, retryable=True, retry_after=retry_after)


def _route(runtime: Runtime, path: str) -> WebhookRoute | None:
    return runtime.webhooks.get(path) if runtime.webhooks is not None else None
