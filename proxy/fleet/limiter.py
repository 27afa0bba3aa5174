"""A policy's rate-limit bucket in Redis (``rate_limit.scope: fleet``): one GCRA for the fleet."""

from __future__ import annotations

from proxy.config.model import RateLimit
from proxy.fleet import scripts
from proxy.fleet.backend import FleetBackend
from proxy.layers.bucket import Outcome, Reservation

_MICROS = 1_000_000

_OUTCOMES: dict[int, Outcome] = {
    scripts.GRANTED: "granted",
    scripts.REFUSED: "refused",
    scripts.PAUSED: "paused",
}


class FleetBucket:
    def __init__(self, backend: FleetBackend, name: str, settings: RateLimit) -> None:
        self._backend = backend
        self._keys = (backend.key("ratelimit", name), backend.key("pause", name))
        self._interval = max(1, round(_MICROS / settings.per_second))
        self._burst = settings.burst
        self._reserve = backend.script(scripts.BUCKET_RESERVE)
        self._give_back = backend.script(scripts.BUCKET_GIVE_BACK)
        self._pause = backend.script(scripts.PAUSE)

    @property
    def up(self) -> bool:
        return self._backend.up

    async def reserve(self, max_wait: float) -> Reservation | None:
        budget = max(0, int(max_wait * _MICROS))
        answer = await self._backend.run(self._reserve, self._keys, (self._interval, self._burst, budget))
        if answer is None:
            return None
        outcome, micros = answer
        return Reservation(_OUTCOMES[int(outcome)], int(micros) / _MICROS)

    def give_back(self) -> None:
        self._backend.report(self._backend.run(self._give_back, self._keys[:1], (self._interval,)))

    def share_pause(self, seconds: float) -> None:
        micros = max(1, int(seconds * _MICROS))
        self._backend.report(self._backend.run(self._pause, self._keys[1:], (micros,)))
