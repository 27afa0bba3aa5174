"""Durable delivery for one process: the store, the worker, the fire-and-forget intake and the
dispatchers of both sources (policy requests and webhook events).

Built only when the config needs it (`wanted`): with no ``delivery`` section anywhere and no
``webhooks`` section there is no store file, no thread and no worker task.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from multidict import CIMultiDict
from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from proxy import errors
from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.config.loader import Config
from proxy.config.model import Delivery as DeliverySettings
from proxy.delivery.intake import to_delivery
from proxy.delivery.policy import PolicyDispatcher
from proxy.delivery.sqlite import SqliteStore
from proxy.delivery.store import STATES, Delivery, DeliveryStore, Enqueued, Kind, NewDelivery, State
from proxy.delivery.webhook import WebhookDispatcher
from proxy.delivery.worker import DeliveryWorker, Dispatcher
from proxy.exchange import BytesBody, ProxyRequest, ProxyResponse
from proxy.telemetry import Telemetry
from proxy.telemetry.names import DELIVERY_ID_HEADER

if TYPE_CHECKING:
    from proxy.server.runtime import Runtime

log = logging.getLogger("outrigger.delivery")


def wanted(config: Config) -> bool:
    """Whether anything in `config` stores deliveries: a policy's ``delivery`` section, or the
    ``webhooks`` section (its listener lives as long as the process, and a reload may add routes
    to it, so the store is there whenever the listener is)."""
    return (
        any(policy.settings.delivery is not None for policy in config.policies)
        or config.main.defaults.delivery is not None
        or config.main.webhooks is not None
    )


def location(delivery_id: str) -> str:
    return f"/deliveries/{delivery_id}"


class _DeliveryCollector(Collector):
    """``outrigger_deliveries{source,state}`` (from the last `refresh`) and the store's size."""

    def __init__(self, service: DeliveryService) -> None:
        self._service = service

    def collect(self) -> Iterable[GaugeMetricFamily]:
        gauge = GaugeMetricFamily(
            "outrigger_deliveries", "Stored deliveries by source and state", labels=["source", "state"]
        )
        for (source, state), count in sorted(self._service.counts.items()):
            gauge.add_metric([source, state], count)
        size = GaugeMetricFamily(
            "outrigger_delivery_store_bytes", "Size of the delivery store on disk (database and WAL)"
        )
        size.add_metric([], self._service.store.size_bytes())
        yield from (gauge, size)


class DeliveryService:
    def __init__(
        self,
        data_dir: Path,
        runtime: Callable[[], Runtime],
        telemetry: Telemetry,
        clock: Clock = SYSTEM_CLOCK,
        store: DeliveryStore | None = None,
    ) -> None:
        self.store: DeliveryStore = store if store is not None else SqliteStore(data_dir)
        self.clock = clock
        self.telemetry = telemetry
        self.dispatchers: dict[Kind, Dispatcher] = {
            "policy": PolicyDispatcher(runtime, telemetry, clock.wall),
            "webhook": WebhookDispatcher(runtime, clock.wall),
        }
        """By delivery kind."""
        self.worker = DeliveryWorker(self.store, self.dispatchers, clock, telemetry.tracer, self)
        self.counts: dict[tuple[str, State], int] = {}
        self._collector = _DeliveryCollector(self)
        self._results = Counter(
            "outrigger_deliveries",
            "Durable deliveries by what happened: accepted, duplicate, delivered, rejected (a"
            " non-retryable answer), retried, waiting (source not configured), dead",
            ["source", "result"],
            registry=None,  # registered by start(): with delivery off, /metrics has no such family
        )
        self._registered = False

    async def start(self) -> None:
        """Open the store (a failure is logged: requests then get 503 store_unavailable and every
        later call tries to open it again) and start the worker."""
        try:
            await self.store.open()
        except errors.StoreUnavailable as error:
            log.error("delivery store unavailable: %s", error)
        self.telemetry.metrics.registry.register(self._collector)
        self.telemetry.metrics.registry.register(self._results)
        self._registered = True
        self.worker.start()

    async def stop(self, grace: float) -> None:
        await self.worker.stop(grace)
        await self.store.close()
        if self._registered:
            self.telemetry.metrics.registry.unregister(self._collector)
            self.telemetry.metrics.registry.unregister(self._results)
            self._registered = False

    def delivery_result(self, source: str, result: str) -> None:
        """`outrigger_deliveries_total{source,result}` (sources and results are few)."""
        self._results.labels(source, result).inc()

    async def accept(self, request: ProxyRequest, settings: DeliverySettings) -> ProxyResponse:
        """Store the request (committed) and answer 202; BodyTooLarge and StoreUnavailable go to
        the app as Outrigger errors, with nothing stored."""
        stored = await self.enqueue(await to_delivery(request, settings, self.clock.wall()))
        request.delivery_id = stored.id
        where = location(stored.id)
        body = json.dumps({"id": stored.id, "state": "pending", "location": where}).encode()
        headers = CIMultiDict(
            {
                "Content-Type": "application/json",
                "Content-Length": str(len(body)),
                DELIVERY_ID_HEADER: stored.id,
                "Location": where,
            }
        )
        return ProxyResponse(202, headers, BytesBody(body), "Accepted")

    async def enqueue(self, delivery: NewDelivery) -> Enqueued:
        """Store a delivery from any source (committed when this returns), count it and wake the
        worker. A webhook redelivery within its dedupe window stores nothing (`duplicate`)."""
        stored = await self.store.enqueue(delivery, self.clock.wall())
        self.delivery_result(delivery.source, "duplicate" if stored.duplicate else "accepted")
        if not stored.duplicate:
            self.worker.wake()
        return stored

    async def refresh(self) -> None:
        """Read the per-(source, state) counts for the next scrape (the store answers off the loop)."""
        try:
            self.counts = await self.store.counts()
        except errors.StoreUnavailable as error:
            log.warning("delivery counts unavailable: %s", error)

    async def list(self, state: State | None, limit: int) -> Sequence[Delivery]:
        return await self.store.list(state, limit)

    async def get(self, delivery_id: str) -> Delivery | None:
        return await self.store.get(delivery_id)

    async def retry(self, delivery_id: str) -> Delivery | None:
        delivery = await self.store.retry(delivery_id, self.clock.wall())
        if delivery is not None:
            self.worker.wake()
        return delivery

    async def delete(self, delivery_id: str) -> bool:
        return await self.store.delete(delivery_id)


__all__ = ["STATES", "DeliveryService", "location", "wanted"]
