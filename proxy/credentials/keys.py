"""A pool of API keys: one per attempt, each with its own provider pause and cooldown.

A key that met ``cooldown_on`` rests for the response's Retry-After (or its
rate-limit reset), else `KEY_COOLDOWN_S`; a provider's "quota exhausted"
headers on any response rest that key alone. When every key rests, an
attempt waits for the first to wake up, within ``max_wait`` and the request's
deadline, or is refused ``429 rate_limited``. Keys are named by their index
(never their value) wherever state is shown.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from multidict import MultiMapping

from proxy import errors
from proxy.clock import Clock
from proxy.config import defaults
from proxy.config.model import KeyPoolSettings, OutcomeSet
from proxy.provider_headers import ProviderQuota, pause_requested, retry_after_seconds

READY = "ready"
RESTING = "resting"
"""The `state` label values of ``outrigger_credential_keys``."""


@dataclass
class _KeyState:
    """What one key has been through; carried over a reload while the key's value is unchanged."""

    uses: int = 0
    rest_until: float = 0.0
    """Loop-clock time before which the key is not used."""
    reason: str = ""


class KeyPool:
    def __init__(
        self,
        name: str,
        settings: KeyPoolSettings,
        values: Sequence[str],
        clock: Clock,
        previous: KeyPool | None = None,
    ) -> None:
        self.name = name
        self.header = settings.header
        self._values = tuple(values)
        self._header_values = tuple(settings.format.replace("{key}", value) for value in values)
        self._least_used = settings.strategy == "least_used"
        self._cooldown_on = OutcomeSet(settings.cooldown_on).statuses
        self._clock = clock
        kept = previous._by_value() if previous is not None else {}
        floor = min((state.uses for state in kept.values()), default=0)
        # a key that joins (new or rotated) starts level with the others, so least_used does not
        # send it every request until it has caught up
        self._states = [kept.get(value) or _KeyState(uses=floor) for value in self._values]
        self._cursor: int = previous._cursor % len(self._values) if previous is not None else 0

    def _by_value(self) -> dict[str, _KeyState]:
        return dict(zip(self._values, self._states, strict=True))

    def header_value(self, index: int) -> str:
        return self._header_values[index]

    def _rest_left(self, index: int, now: float) -> float:
        return max(0.0, self._states[index].rest_until - now)

    def _pick(self, now: float) -> int | None:
        ready = [i for i in range(len(self._states)) if self._states[i].rest_until <= now]
        if not ready:
            return None
        if self._least_used:
            return min(ready, key=lambda i: self._states[i].uses)
        count = len(self._states)
        index = min(ready, key=lambda i: (i - self._cursor) % count)
        self._cursor = (index + 1) % count
        return index

    def any_ready(self) -> bool:
        now = self._clock.now()
        return any(state.rest_until <= now for state in self._states)

    async def acquire(self, max_wait: float, deadline: float | None) -> int:
        """The index of a key to use now, waiting for a resting one within `max_wait` and never
        past `deadline`; `RateLimited` (with the earliest wake-up as Retry-After) otherwise."""
        started = self._clock.now()
        limit = max_wait if deadline is None else max(0.0, min(max_wait, deadline - started))
        while True:
            now = self._clock.now()
            index = self._pick(now)
            if index is not None:
                self._states[index].uses += 1
                return index
            wake = min(self._rest_left(i, now) for i in range(len(self._states)))
            if now + wake - started > limit:
                raise errors.RateLimited(
                    f"every API key of {self.name} is resting (provider rate limits)", retry_after=wake
                )
            await self._clock.sleep(wake)

    def observe(self, index: int, status: int, headers: MultiMapping[str], max_pause: float) -> bool:
        """Rest key `index` when the response asks for it; True when it met ``cooldown_on``."""
        wall = self._clock.wall()
        pause = pause_requested(ProviderQuota.from_headers(headers, wall), headers, status, wall)
        cooldown = status in self._cooldown_on
        if cooldown:
            asked = pause[0] if pause else retry_after_seconds(headers.get("Retry-After"), wall)
            seconds = asked if asked is not None else defaults.KEY_COOLDOWN_S
            reason = f"answered {status}"
        elif pause is not None:
            seconds, reason = pause
        else:
            return False
        until = self._clock.now() + min(seconds, max_pause)
        state = self._states[index]
        if until > state.rest_until:
            state.rest_until, state.reason = until, reason
        return cooldown

    def counts(self) -> dict[str, int]:
        """Keys per state, for ``outrigger_credential_keys{state}``."""
        now = self._clock.now()
        resting = sum(1 for state in self._states if state.rest_until > now)
        return {READY: len(self._states) - resting, RESTING: resting}

    def snapshot(self) -> list[dict[str, object]]:
        now = self._clock.now()
        return [
            {
                "index": index,
                "state": RESTING if state.rest_until > now else READY,
                "rest_seconds": round(self._rest_left(index, now), 3),
                "reason": state.reason if state.rest_until > now else None,
                "uses": state.uses,
            }
            for index, state in enumerate(self._states)
        ]
