"""The total deadline: bounds everything below it, retries and backoff included."""

from __future__ import annotations

import asyncio

from proxy import errors
from proxy.config.units import format_duration
from proxy.exchange import Handler, ProxyRequest, ProxyResponse


class DeadlineLayer:
    """Counts from the request's arrival, so time queued in the bulkhead is not free."""

    def __init__(self, total: float) -> None:
        self.total = total

    async def __call__(self, request: ProxyRequest, next: Handler) -> ProxyResponse:
        budget = self.total if request.timeout_override is None else min(self.total, request.timeout_override)
        request.deadline = request.received_at + budget
        try:
            async with asyncio.timeout_at(request.deadline):
                return await next(request)
        except TimeoutError:
            raise errors.Timeout(f"no response within {format_duration(budget)}") from None
