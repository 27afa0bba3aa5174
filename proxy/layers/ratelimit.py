"""Rate limit per policy: every attempt takes a token (providers count retries too).

Three things decide when an attempt may go, checked in this order:

- a provider pause (`adaptive`): a 429 with Retry-After, or a quota at 0 with a reset;
- learned pacing (`adaptive`): a provider that says N requests are left for T seconds has
  them spread over T (one every T/N), instead of a burst into its 429;
- our own bucket (`TokenBucket`: `burst` at once, then `rate` per `per`).

An attempt that can go at once goes without queueing, a timer or a task (the fast
path). The others wait in a queue served by priority (``x-outrigger-priority``:
high, normal, low; first come first served within one), bounded by `max_queued`.
One timer per limiter wakes the queue when the next token is due; the token goes to
whoever is first in the queue by then. A request whose expected wait is longer than
`max_wait` or its own deadline is refused at once (429 with Retry-After), never
waited in vain. When the quota came through a pooled key (`credential_key`), the
pause and pacing belong to that key (the credentials layer), not to the whole host;
the quota is still kept for /state and metrics.

With ``scope: fleet`` the bucket is shared (`SharedBucket`, in Redis): each attempt asks it for
a token and waits out what it answers, and a provider pause learned here is told to the fleet.
The fleet hands out tokens in arrival order (priorities order only a local queue). While the
fleet's store is unreachable the limiter works as above with its own bucket (fails open).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass

from multidict import CIMultiDict

from proxy import errors
from proxy.clock import Clock, Timer
from proxy.config.model import RateLimit
from proxy.exchange import PRIORITIES, Handler, ProxyRequest, ProxyResponse
from proxy.layers.bucket import LocalTokenBucket, SharedBucket, TokenBucket
from proxy.provider_headers import ProviderQuota, pause_requested

log = logging.getLogger("outrigger.ratelimit")

_RANK = {priority: rank for rank, priority in enumerate(PRIORITIES)}

_FLEET_ROUNDS = 8
"""Bounds the asks of one attempt to the fleet bucket (each after a provider pause ran out)."""


@dataclass
class _Pause:
    until: float
    reason: str


@dataclass
class _Pacing:
    """One attempt every `interval` until `until` (the provider's reset)."""

    interval: float
    until: float
    remaining: int


class _Waiter:
    __slots__ = ("expiry", "future", "gone", "rank")

    def __init__(self, future: asyncio.Future[None], rank: int) -> None:
        self.future = future
        self.rank = rank
        self.expiry: Timer | None = None
        self.gone = False
        """Left the queue: served, refused, evicted or cancelled."""


class RateLimiter:
    """State of one policy's limiter: the bucket, the queue, the provider's pause and pacing, and
    the last quota seen."""

    def __init__(
        self,
        name: str,
        settings: RateLimit,
        clock: Clock,
        bucket: TokenBucket | None = None,
        shared: SharedBucket | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self._clock = clock
        self._bucket = bucket or LocalTokenBucket(settings.per_second, settings.burst)
        self.shared = shared
        """The fleet's bucket (``scope: fleet``), used while it is up; the local one otherwise."""
        self._fleet_waiting = [0 for _ in PRIORITIES]
        self._queues: tuple[deque[_Waiter], ...] = tuple(deque() for _ in PRIORITIES)
        self._queued = 0
        """Waiters in all the queues (the fast path's one check)."""
        self._due: float | None = None
        """Due time of the token reserved for whoever is first in the queue when it comes."""
        self._timer: Timer | None = None
        self._timer_at = 0.0
        self._pause: _Pause | None = None
        self._pacing: _Pacing | None = None
        self._last_sent = float("-inf")
        self.in_flight = 0
        """Attempts that took a token and have no response yet (their quota is spoken for)."""
        self.quota: ProviderQuota | None = None

    def adopt_provider_view(self, previous: RateLimiter) -> None:
        """Keep what the provider told us (pause, pacing, quota) when only our own limits changed."""
        self._pause = previous._pause
        self._pacing, self._last_sent = previous._pacing, previous._last_sent
        self.quota = previous.quota

    # ------------------------------------------------------------------ taking a token

    async def acquire(self, deadline: float | None = None, priority: str = "normal") -> float:
        """Wait for a token up to max_wait and never past `deadline`; returns the seconds waited."""
        if self.shared is not None and self.shared.up:
            return await self._acquire_shared(self.shared, deadline, _RANK[priority])
        now = self._clock.now()
        if not self._queued and self._gate(now) <= now:
            delay = self._bucket.reserve(now)
            if delay == 0.0:
                self._last_sent = now
                return 0.0
            self._due = now + delay
        return await self._wait(now, deadline, _RANK[priority])

    async def _wait(self, now: float, deadline: float | None, rank: int) -> float:
        budget = self.settings.max_wait if deadline is None else min(self.settings.max_wait, deadline - now)
        expected = self._expected_wait(now, rank)
        if expected > budget:
            self._release_if_idle(now)
            raise self._refusal(now, expected)
        if self._queued >= self.settings.max_queued and not self._evict_for(rank):
            self._release_if_idle(now)
            raise errors.RateLimited(
                f"the rate limit queue for {self.name} is full ({self.settings.max_queued} waiting)",
                retry_after=expected,
            )
        waiter = _Waiter(asyncio.get_running_loop().create_future(), rank)
        self._queues[rank].append(waiter)
        self._queued += 1
        waiter.expiry = self._clock.call_later(max(0.0, budget), lambda: self._expire(waiter))
        self._schedule()
        try:
            await waiter.future
        except asyncio.CancelledError:
            if not waiter.gone:
                self._leave(waiter)
                self._schedule()
            elif waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                self._bucket.cancel(self._clock.now())  # served, but gone before using the token
            raise
        return self._clock.now() - now

    async def _acquire_shared(self, shared: SharedBucket, deadline: float | None, rank: int) -> float:
        """A token from the fleet's bucket, waited for here; the local bucket if the fleet is gone."""
        clock = self._clock
        start = now = clock.now()
        ends = now + (
            self.settings.max_wait if deadline is None else min(self.settings.max_wait, deadline - now)
        )
        for _ in range(_FLEET_ROUNDS):
            gate = self._gate(now)
            if gate > now:  # a pause or pacing known here: no need to ask the fleet yet
                if gate > ends:
                    raise self._refusal(now, gate - now)
                await self._wait_in_line(rank, gate - now)
                now = clock.now()
                continue
            reservation = await shared.reserve(ends - now)
            if reservation is None:  # the fleet's store is gone: this sidecar's own bucket
                break
            now = clock.now()
            if reservation.outcome == "granted":
                if reservation.wait > 0:
                    try:
                        await self._wait_in_line(rank, reservation.wait)
                    except (asyncio.CancelledError, errors.RateLimited):
                        shared.give_back()
                        raise
                self._last_sent = clock.now()
                return self._last_sent - start
            if reservation.outcome == "refused":
                raise errors.RateLimited(self._exceeded("fleet"), retry_after=reservation.wait)
            self._adopt_pause(now + reservation.wait)
        else:
            raise self._refusal(now, self._bucket.interval)
        return clock.now() - start + await self.acquire(deadline, PRIORITIES[rank])

    async def _wait_in_line(self, rank: int, seconds: float) -> None:
        """Sleep `seconds` as one of this sidecar's waiters for the fleet, bounded by max_queued
        (an attempt whose token is due at once never counts)."""
        if sum(self._fleet_waiting) >= self.settings.max_queued:
            raise errors.RateLimited(
                f"the rate limit queue for {self.name} is full ({self.settings.max_queued} waiting)",
                retry_after=seconds,
            )
        self._fleet_waiting[rank] += 1
        try:
            await self._clock.sleep(seconds)
        finally:
            self._fleet_waiting[rank] -= 1

    def _adopt_pause(self, until: float) -> None:
        """A provider pause another sidecar learned (the fleet told us), kept here too."""
        self._extend_pause(until, "a pause the provider asked of another sidecar")

    def _extend_pause(self, until: float, reason: str) -> bool:
        """Pause until `until` unless a pause already lasts longer; True if this one is new."""
        if self._pause is not None and until <= self._pause.until:
            return False
        self._pause = _Pause(until, reason)
        return True

    def _gate(self, now: float) -> float:
        """Earliest time the provider lets the next attempt go (its pause, its pacing)."""
        pause, pacing = self._pause, self._pacing
        gate = pause.until if pause is not None else 0.0
        if pacing is not None:
            if now >= pacing.until:
                self._pacing = None
            else:
                gate = max(gate, self._last_sent + pacing.interval)
        return gate

    def _interval(self, now: float) -> float:
        pacing = self._pacing
        if pacing is not None and now < pacing.until:
            return max(self._bucket.interval, pacing.interval)
        return self._bucket.interval

    def _expected_wait(self, now: float, rank: int) -> float:
        """Until this arrival's token: the next one due, then one per waiter served before it."""
        start = max(now, self._gate(now), self._due or now)
        ahead = sum(len(queue) for queue in self._queues[: rank + 1])
        return start - now + ahead * self._interval(now)

    def _refusal(self, now: float, expected: float) -> errors.RateLimited:
        if self._pause is not None and self._pause.until > now:
            message = f"{self.name} asked us to slow down ({self._pause.reason})"
        elif self._pacing is not None and self._gate(now) > now:
            message = f"pacing {self.name} to its quota ({self._pacing.remaining} left until its reset)"
        else:
            message = self._exceeded("local")
        return errors.RateLimited(message, retry_after=expected)

    def _exceeded(self, scope: str) -> str:
        limit = f"{self.settings.rate:g} per {self.settings.per:g}s"
        return f"{scope} rate limit for {self.name}: {limit} exceeded"

    def _evict_for(self, rank: int) -> bool:
        """Make room for an arrival of `rank`: the newest waiter of the lowest priority present
        goes, if that priority is lower than the arrival's. False when the arrival is the lowest."""
        lowest = next((r for r in reversed(range(len(PRIORITIES))) if self._queues[r]), None)
        if lowest is None or lowest <= rank:
            return False
        victim = self._queues[lowest].pop()
        self._leave(victim, queued=False)
        if victim.future.done():  # cancelled, its task not yet resumed: it was leaving anyway
            return True
        victim.future.set_exception(
            errors.RateLimited(
                f"the rate limit queue for {self.name} is full: a higher priority request took its place",
                retry_after=self._expected_wait(self._clock.now(), lowest),
            )
        )
        return True

    def _leave(self, waiter: _Waiter, queued: bool = True) -> None:
        """Out of the queue (`queued`: still in its deque, else already popped)."""
        waiter.gone = True
        if queued:
            self._queues[waiter.rank].remove(waiter)
        self._queued -= 1
        if waiter.expiry is not None:
            waiter.expiry.cancel()

    def _expire(self, waiter: _Waiter) -> None:
        """max_wait (or the deadline) ran out while others were served first."""
        if waiter.gone or waiter.future.done():  # done: cancelled, and its task leaves on resuming
            return
        waiter.expiry = None
        self._leave(waiter)
        now = self._clock.now()
        waiter.future.set_exception(self._refusal(now, self._expected_wait(now, waiter.rank)))
        self._schedule()

    def _release_if_idle(self, now: float) -> None:
        """Nobody waits: give the reserved token back (a refused request must cost no token)."""
        if not self._queued and self._due is not None:
            self._due = None
            self._bucket.cancel(now)

    def _schedule(self) -> None:
        """Serve the queue as far as the tokens allow now; set the one timer for the next token."""
        now = self._clock.now()
        while self._queued:
            gate = self._gate(now)
            if gate > now:
                return self._wake_at(gate, now)
            if self._due is None:
                self._due = now + self._bucket.reserve(now)
            if self._due > now:
                return self._wake_at(self._due, now)
            waiter = next(queue for queue in self._queues if queue).popleft()
            self._leave(waiter, queued=False)
            if waiter.future.done():  # cancelled, its task not yet resumed: the token is the next's
                continue
            self._due = None
            self._last_sent = now
            waiter.future.set_result(None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._release_if_idle(now)

    def _wake_at(self, when: float, now: float) -> None:
        if self._timer is not None:
            if self._timer_at == when:
                return
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._clock.call_later(when - now, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._schedule()

    # ------------------------------------------------------------------ learning from the provider

    def pause_remaining(self) -> float:
        if self._pause is None:
            return 0.0
        remaining = self._pause.until - self._clock.now()
        if remaining <= 0:
            self._pause = None
            return 0.0
        return remaining

    def observe(self, headers: CIMultiDict[str], status: int, pooled: bool = False) -> None:
        """Learn from the provider's answer: remember its quota; with `adaptive`, pause or pace the
        host as it says (unless the quota was a pooled key's own: that key's business)."""
        now_wall = self._clock.wall()
        quota = ProviderQuota.from_headers(headers, now_wall)
        if quota is not None:
            self.quota = quota
        if not self.settings.adaptive or pooled:
            return
        pause = pause_requested(quota, headers, status, now_wall)
        if pause is not None:
            self._pause_for(*pause)
        elif quota is not None and quota.remaining is not None and quota.reset_seconds:
            self._pace(quota.remaining, quota.reset_seconds)

    def _pause_for(self, seconds: float, reason: str) -> None:
        if seconds > self.settings.max_pause:
            log.warning("%s asked for a %.0fs pause; capped at max_pause", self.name, seconds)
            seconds = self.settings.max_pause
        if self._extend_pause(self._clock.now() + seconds, reason):
            log.warning("pausing %s for %.1fs: %s", self.name, seconds, reason)
            if self.shared is not None and self.shared.up:
                self.shared.share_pause(seconds)

    def _pace(self, remaining: int, reset: float) -> None:
        """`remaining` requests for `reset` seconds, less those already on their way: one every
        reset/left. Slower than our own bucket only; none left at all is a pause until the reset."""
        reset = min(reset, self.settings.max_pause)
        left = remaining - self.in_flight
        if left <= 0:
            self._pause_for(reset, f"quota spoken for ({remaining} left, {self.in_flight} in flight)")
            return
        interval = reset / left
        if interval <= self._bucket.interval:
            self._pacing = None
            return
        self._pacing = _Pacing(interval, self._clock.now() + reset, left)

    # ------------------------------------------------------------------ /state and metrics

    def queue_lengths(self) -> dict[str, int]:
        return {
            priority: len(queue) + fleet
            for priority, queue, fleet in zip(PRIORITIES, self._queues, self._fleet_waiting, strict=True)
        }

    def snapshot(self) -> dict[str, object]:
        now = self._clock.now()
        tokens = self._bucket.tokens(now)
        self._gate(now)  # drops pacing that has run out
        pacing = self._pacing
        return {
            "scope": self.settings.scope,
            **({} if self.shared is None else {"fleet_backend": "up" if self.shared.up else "down"}),
            "has_capacity": tokens >= 1,
            "tokens": round(tokens, 3),
            "paused_for_seconds": round(self.pause_remaining(), 3),
            "queued": self.queue_lengths(),
            "pacing": None
            if pacing is None
            else {
                "rate_per_second": round(1 / pacing.interval, 3),
                "until_seconds": round(pacing.until - now, 3),
                "remaining": pacing.remaining,
            },
            "provider_quota": self.quota.as_dict() if self.quota else None,
        }


class RateLimitLayer:
    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter

    async def __call__(self, request: ProxyRequest, next: Handler) -> ProxyResponse:
        limiter = self.limiter
        request.ratelimit_wait += await limiter.acquire(request.deadline, request.priority)
        limiter.in_flight += 1
        try:
            response = await next(request)
        finally:
            limiter.in_flight -= 1
        limiter.observe(response.headers, response.status, pooled=request.credential_key is not None)
        return response
