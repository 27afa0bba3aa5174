"""Time as a dependency, so backoff, budgets, breakers and buckets are tested without sleeping."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds, on the same scale as the event loop's time() (request deadlines)."""

    def wall(self) -> float:
        """Seconds since the epoch, for HTTP dates and epoch-style reset headers."""

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK = SystemClock()
