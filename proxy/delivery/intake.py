"""Fire-and-forget intake (SPEC 11): ``Prefer: respond-async`` (RFC 7240) on a policy with a
``delivery`` section. The request gets its idempotency key first (so every delivery attempt sends
the same one), its body is read up to ``max_body_bytes``, and it becomes a `NewDelivery`.
"""

from __future__ import annotations

from multidict import CIMultiDict
from opentelemetry import trace

from proxy import errors
from proxy.config.defaults import KEYED_METHODS
from proxy.config.model import Delivery as DeliverySettings
from proxy.config.units import format_size
from proxy.delivery.store import NewDelivery
from proxy.exchange import ProxyRequest
from proxy.layers.idempotency import ensure_key
from proxy.telemetry.tracing import recorded_traceparent

PREFER_HEADER = "Prefer"
RESPOND_ASYNC = "respond-async"


def _preferences(value: str) -> list[str]:
    return [part for part in value.split(",") if part.strip()]


def _name(preference: str) -> str:
    return preference.split(";", 1)[0].split("=", 1)[0].strip().lower()


def wants_async(headers: CIMultiDict[str]) -> bool:
    """The app asked for ``respond-async`` (preference names are case-insensitive, RFC 7240 2)."""
    return any(
        _name(pref) == RESPOND_ASYNC
        for value in headers.getall(PREFER_HEADER, ())
        for pref in _preferences(value)
    )


def drop_respond_async(headers: CIMultiDict[str]) -> None:
    """Outrigger honoured ``respond-async`` itself: the upstream gets the app's other preferences only."""
    kept = [
        pref.strip()
        for value in headers.popall(PREFER_HEADER, [])
        for pref in _preferences(value)
        if _name(pref) != RESPOND_ASYNC
    ]
    if kept:
        headers[PREFER_HEADER] = ", ".join(kept)


def _traceparent(request: ProxyRequest) -> str | None:
    """The accepting request's SERVER span, for the link on every delivery attempt's span."""
    if not request.traced or request.trace_context is None:
        return None
    return recorded_traceparent(trace.get_current_span(request.trace_context))


async def to_delivery(request: ProxyRequest, settings: DeliverySettings, now: float) -> NewDelivery:
    """The request as it will be stored. Raises BodyTooLarge (nothing read past the limit)."""
    methods = request.settings.idempotency.methods if request.settings.idempotency else KEYED_METHODS
    if request.method in methods:
        ensure_key(request, request.settings.idempotency_header)
    limit = settings.max_body_bytes
    if not await request.body.buffer(limit):
        raise errors.BodyTooLarge(
            f"a fire-and-forget body may be at most {format_size(limit)} (delivery.max_body_bytes);"
            " send it without Prefer: respond-async, or raise the limit",
            host=request.host,
        )
    body = request.body.for_attempt()
    assert body is None or isinstance(body, bytes)
    drop_respond_async(request.headers)
    return NewDelivery(
        kind="policy",
        source=request.policy.name,
        method=request.method,
        host=request.host,
        path_qs=request.path_qs,
        headers=tuple(request.headers.items()),
        body=body or b"",
        expires_at=now + settings.ttl,
        target=str(request.target),
        traceparent=_traceparent(request),
    )
