"""A policy's circuit breaker in Redis (``circuit_breaker.scope: fleet``).

Every admission and every outcome is one script on the shared state, so a breaker opened by
one sidecar's failures fails fast in all, and half-open trials are limited fleet-wide. Outcomes
are reported without holding up the response. What the last answer said is kept here, for
/state, metrics and the retry layer's "is it open?". While Redis is unreachable the breaker
works as a local one (`CircuitBreaker`), starting from what this sidecar saw on its own.
"""

from __future__ import annotations

import logging

from proxy import errors
from proxy.clock import Clock
from proxy.config.model import CircuitBreakerSettings
from proxy.fleet import scripts
from proxy.fleet.backend import FleetBackend
from proxy.layers.breaker import CLOSED, HALF_OPEN, OPEN, Admission, CircuitBreaker

log = logging.getLogger("outrigger.breaker")

_MICROS = 1_000_000
_STATES = {scripts.CLOSED: CLOSED, scripts.HALF_OPEN: HALF_OPEN, scripts.OPEN: OPEN}
_CODES = {name: code for code, name in _STATES.items()}
_HALF_OPEN_BUSY_RETRY_S = 1.0


class FleetBreaker(CircuitBreaker):
    def __init__(
        self, backend: FleetBackend, name: str, settings: CircuitBreakerSettings, clock: Clock
    ) -> None:
        super().__init__(name, settings, clock)
        self._backend = backend
        self._keys = (backend.key("breaker", name),)
        self._reset_micros = int(settings.reset_timeout * _MICROS)
        self._expiry_ms = int(max(settings.reset_timeout * 10, 3600) * 1000)
        """Breaker state unused this long is forgotten (a closed breaker with no failures)."""
        self._admit = backend.script(scripts.BREAKER_ADMIT)
        self._finish = backend.script(scripts.BREAKER_FINISH)
        self._shared_state = CLOSED
        self._shared_failures = 0
        self._half_open_at = 0.0
        """When the shared breaker, open, lets a trial through (on this sidecar's clock)."""

    @property
    def state(self) -> str:
        return self._shared_state if self._backend.up else super().state

    @property
    def consecutive_failures(self) -> int:
        return self._shared_failures if self._backend.up else super().consecutive_failures

    def seconds_until_half_open(self) -> float:
        if self._backend.up:
            return max(0.0, self._half_open_at - self._clock.now())
        return super().seconds_until_half_open()

    async def admit_async(self) -> Admission:
        answer = await self._backend.run(
            self._admit, self._keys, (self._reset_micros, self.settings.half_open_max, self._expiry_ms)
        )
        if answer is None:
            return self.admit()
        admitted, state, failures, micros, version, moved = (int(item) for item in answer)
        self._learn(state, failures, micros, moved)
        if admitted:
            return Admission(self._shared_state, shared=True, round=version)
        if self._shared_state == OPEN:
            raise errors.CircuitOpen(
                f"circuit breaker for {self.name} is open after {self.settings.failure_threshold}"
                " consecutive failures (fleet-wide)",
                retry_after=micros / _MICROS,
            )
        raise errors.CircuitOpen(
            f"circuit breaker for {self.name} is half-open and its fleet's trial requests are in flight",
            retry_after=_HALF_OPEN_BUSY_RETRY_S,
        )

    def finish(self, admission: Admission, failed: bool | None) -> None:
        if not admission.shared:
            super().finish(admission, failed)
            return
        outcome = -1 if failed is None else int(failed)
        args = (
            _CODES[admission.state],
            outcome,
            self.settings.failure_threshold,
            self._reset_micros,
            admission.round,
            self._expiry_ms,
        )
        self._backend.report(self._report(args))

    async def _report(self, args: tuple[int, ...]) -> None:
        answer = await self._backend.run(self._finish, self._keys, args)
        if answer is None:
            return
        state, failures, micros, _, moved = (int(item) for item in answer)
        self._learn(state, failures, micros, moved)

    def _learn(self, state: int, failures: int, micros: int, moved: int) -> None:
        """Keep what Redis answered; `moved`: this sidecar's call made a transition (others' are
        counted and logged where they happened)."""
        self._shared_state = _STATES[state]
        self._shared_failures = failures
        if self._shared_state == OPEN:
            self._half_open_at = self._clock.now() + micros / _MICROS
        if moved:
            self.transitions += 1
            log.warning("circuit breaker %s (fleet): now %s", self.name, self._shared_state)

    def snapshot(self) -> dict[str, object]:
        return {
            **super().snapshot(),
            "fleet_backend": "up" if self._backend.up else "down",
        }
