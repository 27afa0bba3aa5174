"""Where the listener hands a verified event: the one interface between webhooks and the store.

The listener verifies; an `EventSink` stores (and later forwards, retries, dedupes). The
listener answers the provider from the sink's `Acceptance`: stored or duplicate -> 200 (a
redelivery of an event already stored is acknowledged, not stored twice), unavailable -> 503
``store_unavailable`` (the provider retries later). A sink that raises counts as unavailable.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

from proxy.webhooks.routes import WebhookRoute


class Acceptance(enum.Enum):
    STORED = "stored"
    """Committed: the event will be forwarded to the route's app."""
    DUPLICATE = "duplicate"
    """The route already holds this event id (within ``dedupe``): acknowledged, not forwarded again."""
    UNAVAILABLE = "unavailable"
    """Not stored (store down, full, shutting down): the provider must send it again."""


@dataclass(frozen=True)
class VerifiedEvent:
    """One authentic webhook request, exactly as it arrived."""

    route: str
    """The route's name (its path): the ``source`` of its deliveries."""
    scheme: str
    """The scheme that verified it; forwarded as ``x-outrigger-webhook-verified``."""
    event_id: str | None
    """The provider's id of the event (the same on each redelivery), when its scheme has one."""
    body: bytes = field(repr=False)
    """The raw body bytes as received, never re-encoded."""
    headers: tuple[tuple[str, str], ...] = field(repr=False)
    """Every request header in arrival order, repeats kept (signature headers included)."""
    received_at: float
    """Unix time the request arrived."""
    traceparent: str | None = None
    """The webhook request's SERVER span (when it records), linked from every forward attempt."""


class EventSink(Protocol):
    async def accept(self, route: WebhookRoute, event: VerifiedEvent) -> Acceptance:
        """Store `event` for `route` (durably, before returning STORED), or say why not."""
        ...
