"""The total deadline: bounds everything below it, retries and backoff included."""

from __future__ import annotations

import asyncio

from proxy import errors
from proxy.config.units import format_duration
from proxy.exchange import Handler, ProxyRequest, ProxyResponse


def total_budget(request: ProxyRequest, total: float) -> float:
    """`total`, or less when the app asked for less (x-outrigger-timeout-ms never raises it)."""
    return total if request.timeout_override is None else min(total, request.timeout_override)


def deadline_of(request: ProxyRequest, total: float) -> float:
    """Loop time by which the response head must be back: counted from arrival, so time queued in
    the bulkhead (which runs before this layer) is not free."""
    return request.received_at + total_budget(request, total)


class DeadlineLayer:
    """Counts from the request's arrival, so time queued in the bulkhead is not free."""

    def __init__(self, total: float) -> None:
        self.total = total

    async def __call__(self, request: ProxyRequest, next: Handler) -> ProxyResponse:
        budget = total_budget(request, self.total)
        request.deadline = request.received_at + budget
        try:
            async with asyncio.timeout_at(request.deadline):
                return await next(request)
        except TimeoutError:
            raise errors.Timeout(f"no response within {format_duration(budget)}") from None
