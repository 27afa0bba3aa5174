"""Bulkhead: at most `max_in_flight` requests per policy, a bounded FIFO queue, then 503.

A slot is held until the response body has been streamed to the app (the
upstream connection is busy until then), so the layer hands its release to
the response body rather than releasing when the head arrives.
"""

from __future__ import annotations

import asyncio
from collections import deque

from proxy import errors
from proxy.config.model import Concurrency
from proxy.config.units import format_duration
from proxy.exchange import Handler, ProxyRequest, ProxyResponse, ReleasingBody
from proxy.layers.deadline import deadline_of


class Bulkhead:
    def __init__(self, name: str, settings: Concurrency) -> None:
        self.name = name
        self.settings = settings
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self, deadline: float | None = None) -> None:
        """A slot, waiting at most `queue_timeout` and never past `deadline` (loop time): a request
        whose total runs out in the queue is answered 504 then, not later."""
        if self.in_flight < self.settings.max_in_flight and not self._waiters:
            self.in_flight += 1
            return
        if len(self._waiters) >= self.settings.max_queued:
            raise errors.Overloaded(
                f"{self.name}: {self.in_flight} requests in flight and {len(self._waiters)} queued",
                retry_after=self.settings.queue_timeout,
            )
        slot: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(slot)
        loop = asyncio.get_running_loop()
        queue_until = loop.time() + self.settings.queue_timeout
        until = queue_until if deadline is None else min(queue_until, deadline)
        try:
            async with asyncio.timeout_at(until):
                await slot
        except BaseException as exc:
            if slot.done() and not slot.cancelled():
                self.release()  # the slot was handed over just as we gave up: pass it on
            elif slot in self._waiters:  # release() may already have dropped a cancelled waiter
                self._waiters.remove(slot)
            if isinstance(exc, TimeoutError) and until < queue_until:
                raise errors.Timeout("the request's total ran out while it queued for a slot") from None
            if isinstance(exc, TimeoutError):
                raise errors.Overloaded(
                    f"{self.name}: no free slot within queue_timeout"
                    f" {format_duration(self.settings.queue_timeout)}",
                    retry_after=self.settings.queue_timeout,
                ) from None
            raise

    def release(self) -> None:
        """Hand the slot to the oldest waiter, or free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.in_flight -= 1

    def snapshot(self) -> dict[str, int]:
        return {"in_flight": self.in_flight, "queued": self.queued}


class ConcurrencyLayer:
    def __init__(self, bulkhead: Bulkhead, total: float) -> None:
        self.bulkhead = bulkhead
        self.total = total

    async def __call__(self, request: ProxyRequest, next: Handler) -> ProxyResponse:
        await self.bulkhead.acquire(deadline_of(request, self.total))
        try:
            response = await next(request)
        except BaseException:
            self.bulkhead.release()
            raise
        response.body = ReleasingBody(response.body, self.bulkhead.release)
        return response
