"""An in-memory `EventSink` for listener tests (test scaffolding: the product's store lives in
proxy/delivery/). It dedupes by (route, event id) like the store will, and can be told to be
unavailable, to fail, or to hold each event until a gate opens."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from proxy.webhooks.routes import WebhookRoute
from proxy.webhooks.sink import Acceptance, VerifiedEvent


@dataclass
class MemorySink:
    events: list[tuple[WebhookRoute, VerifiedEvent]] = field(default_factory=list)
    available: bool = True
    failing: bool = False
    """accept() raises, as a broken store would."""
    gate: asyncio.Event | None = None
    """When set, accept() waits (at most 10 s) for it before storing."""
    entered: asyncio.Event = field(default_factory=asyncio.Event)

    async def accept(self, route: WebhookRoute, event: VerifiedEvent) -> Acceptance:
        self.entered.set()
        if self.gate is not None:
            async with asyncio.timeout(10):
                await self.gate.wait()
        if self.failing:
            raise RuntimeError("store broken")
        if not self.available:
            return Acceptance.UNAVAILABLE
        if event.event_id is not None and any(
            (r.name, e.event_id) == (route.name, event.event_id) for r, e in self.events
        ):
            return Acceptance.DUPLICATE
        self.events.append((route, event))
        return Acceptance.STORED
