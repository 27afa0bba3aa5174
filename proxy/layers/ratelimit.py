"""Rate limit per policy: every attempt takes a token (providers count retries too).

The token bucket is aiolimiter's leaky bucket sized so that `burst` requests
may go at once and `rate` per `per` drain after. With `adaptive`, the
provider's own signals pause the whole bucket: a 429 with Retry-After, or
``(X-)RateLimit-Remaining: 0`` with a reset header. The last reported quota is
kept for /state and metrics so SREs can alert before the provider refuses.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from aiolimiter import AsyncLimiter
from multidict import CIMultiDict

from proxy import errors
from proxy.clock import Clock
from proxy.config.model import RateLimit
from proxy.exchange import Handler, ProxyRequest, ProxyResponse
from proxy.provider_headers import ProviderQuota, pause_requested

log = logging.getLogger("outrigger.ratelimit")


@dataclass
class _Pause:
    until: float
    reason: str


class RateLimiter:
    """State of one policy's limiter: the bucket, any provider-imposed pause, the last quota seen."""

    def __init__(self, name: str, settings: RateLimit, clock: Clock) -> None:
        self.name = name
        self.settings = settings
        self._clock = clock
        self._bucket = AsyncLimiter(max_rate=settings.burst, time_period=settings.burst / settings.per_second)
        self._pause: _Pause | None = None
        self.quota: ProviderQuota | None = None

    def adopt_provider_view(self, previous: RateLimiter) -> None:
        """Keep what the provider told us (pause, quota) when only our own limits changed on reload."""
        self._pause = previous._pause
        self.quota = previous.quota

    def pause_remaining(self) -> float:
        if self._pause is None:
            return 0.0
        remaining = self._pause.until - self._clock.now()
        if remaining <= 0:
            self._pause = None
            return 0.0
        return remaining

    async def acquire(self, deadline: float | None = None) -> float:
        """Wait for a token (and out any provider pause) up to max_wait, and never past `deadline`
        (a wait that cannot end before the request's own deadline is refused at once rather than
        waited in vain); returns the seconds waited."""
        started = self._clock.now()
        max_wait = self.settings.max_wait
        if deadline is not None:
            max_wait = max(0.0, min(max_wait, deadline - started))
        paused = self.pause_remaining()
        if paused > max_wait:
            raise errors.RateLimited(
                f"{self.name} asked us to slow down ({self._pause.reason if self._pause else 'paused'})",
                retry_after=paused,
            )
        if paused:
            await self._clock.sleep(paused)
        try:
            async with asyncio.timeout(max(0.0, max_wait - (self._clock.now() - started))):
                await self._bucket.acquire()
        except TimeoutError:
            raise errors.RateLimited(
                f"local rate limit for {self.name}: {self.settings.rate:g} per"
                f" {self.settings.per:g}s exceeded",
                retry_after=max(1.0, 1.0 / self.settings.per_second),
            ) from None
        return self._clock.now() - started

    def observe(self, headers: CIMultiDict[str], status: int) -> None:
        """Learn from the provider's answer: remember its quota; pause when it says so (adaptive)."""
        now_wall = self._clock.wall()
        quota = ProviderQuota.from_headers(headers, now_wall)
        if quota is not None:
            self.quota = quota
        if not self.settings.adaptive:
            return
        pause = pause_requested(headers, status, now_wall)
        if pause is not None:
            seconds, reason = pause
            if seconds > self.settings.max_pause:
                log.warning("%s asked for a %.0fs pause; capped at max_pause", self.name, seconds)
                seconds = self.settings.max_pause
            until = self._clock.now() + seconds
            if self._pause is None or until > self._pause.until:
                self._pause = _Pause(until, reason)
                log.warning("pausing %s for %.1fs: %s", self.name, seconds, reason)

    def snapshot(self) -> dict[str, object]:
        return {
            "has_capacity": self._bucket.has_capacity(),
            "paused_for_seconds": round(self.pause_remaining(), 3),
            "provider_quota": self.quota.as_dict() if self.quota else None,
        }


class RateLimitLayer:
    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter

    async def __call__(self, request: ProxyRequest, next: Handler) -> ProxyResponse:
        request.ratelimit_wait += await self.limiter.acquire(request.deadline)
        response = await next(request)
        self.limiter.observe(response.headers, response.status)
        return response
