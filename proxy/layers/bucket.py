"""The token bucket behind the rate limiter: one decision, "when may the next attempt go?".

The limiter's queue (priorities, eviction, deadlines) only ever asks a `TokenBucket`
to reserve the next token and, when nobody is left to use it, to give it back. A
fleet-wide bucket (SPEC 12: one atomic GCRA script in Redis) plugs in behind the same
two calls without touching the queue.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Protocol

Outcome = Literal["granted", "refused", "paused"]


class Reservation(NamedTuple):
    """A fleet bucket's answer: `granted` (the token is ours, usable after `wait` seconds),
    `refused` (it would take `wait`, more than allowed) or `paused` (a provider pause has `wait`
    seconds left)."""

    outcome: Outcome
    wait: float


class SharedBucket(Protocol):
    """A bucket every sidecar of the fleet draws from (SPEC 12); asynchronous, unlike the local one."""

    @property
    def up(self) -> bool:
        """False while its store is unreachable: the limiter uses its own local bucket meanwhile."""

    async def reserve(self, max_wait: float) -> Reservation | None:
        """Take a token if it comes within `max_wait` seconds; None when the store did not answer."""

    def give_back(self) -> None:
        """Return a granted token that was not used."""

    def share_pause(self, seconds: float) -> None:
        """Tell the fleet of a provider pause this sidecar learned."""


class TokenBucket(Protocol):
    @property
    def interval(self) -> float:
        """Seconds between two tokens at the sustained rate."""

    def reserve(self, now: float) -> float:
        """Take the next token; seconds from `now` until it may be used (0: at once)."""

    def cancel(self, now: float) -> None:
        """Give back the latest reserved token, unused."""

    def tokens(self, now: float) -> float:
        """Tokens that could be taken at once (for /state)."""


class LocalTokenBucket:
    """GCRA (the generic cell rate algorithm, as in redis-cell and Envoy): `burst` tokens at
    once, then one every `interval`. One number of state, the theoretical arrival time, and every
    reservation's due time is computed from it exactly (no polling, no drift)."""

    def __init__(self, per_second: float, burst: int) -> None:
        self.interval = 1.0 / per_second
        self._tolerance = (burst - 1) * self.interval
        self._burst = burst
        self._tat = float("-inf")

    def reserve(self, now: float) -> float:
        tat = max(self._tat, now)
        self._tat = tat + self.interval
        return max(0.0, tat - self._tolerance - now)

    def cancel(self, now: float) -> None:
        self._tat -= self.interval

    def tokens(self, now: float) -> float:
        spare = (now + self._tolerance - max(self._tat, now)) / self.interval + 1
        return min(float(self._burst), max(0.0, spare))
