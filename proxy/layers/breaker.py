"""Circuit breaker per policy, counting attempts: pybreaker's state machine, driven for asyncio.

pybreaker keeps the counts and the closed/open/half-open transitions; this
wrapper adds what it lacks for a proxy (ARCHITECTURE.md): admission is
decided here with an injected clock (open -> half-open after
`reset_timeout`), half-open admits at most `half_open_max` concurrent trials,
and an outcome is reported to pybreaker only after the attempt completes, so a
cancelled attempt (client gone, deadline hit) is neither success nor failure.

A breaker with ``scope: fleet`` (`proxy.fleet.breaker.FleetBreaker`) keeps its state in Redis;
its admission needs a round trip, so layers admit through `admit_async`, which for this local
breaker is `admit` itself.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, NamedTuple

import pybreaker

from proxy import errors
from proxy.clock import Clock
from proxy.config.model import CircuitBreakerSettings, OutcomeSet
from proxy.exchange import Handler, ProxyRequest, ProxyResponse

log = logging.getLogger("outrigger.breaker")

CLOSED, HALF_OPEN, OPEN = pybreaker.STATE_CLOSED, pybreaker.STATE_HALF_OPEN, pybreaker.STATE_OPEN


class Admission(NamedTuple):
    """The state an attempt was let through in, and whether the fleet's breaker did it."""

    state: str
    shared: bool = False
    round: int = 0
    """For the fleet's breaker: which state change it was admitted after (a trial's result
    from an earlier half-open round counts for nothing)."""


_LOCAL = {state: Admission(state) for state in (CLOSED, HALF_OPEN)}


class _AttemptFailed(Exception):
    """Carries a failed outcome into pybreaker so it counts it."""


def _report_success() -> None:
    return None


def _report_failure() -> None:
    raise _AttemptFailed


class _Transitions(pybreaker.CircuitBreakerListener):
    def __init__(self, owner: CircuitBreaker) -> None:
        self.owner = owner

    def state_change(self, breaker: Any, old: Any, new: Any) -> None:
        self.owner.on_state_change(old.name if old else None, new.name)


class CircuitBreaker:
    """One per policy; its state carries over a reload when the section is unchanged."""

    def __init__(self, name: str, settings: CircuitBreakerSettings, clock: Clock) -> None:
        self.name = name
        self.settings = settings
        self._clock = clock
        outcomes = OutcomeSet(settings.failure_on)
        self._failure_statuses = outcomes.statuses
        self._failure_errors = outcomes.errors
        self._breaker = pybreaker.CircuitBreaker(
            fail_max=settings.failure_threshold,
            reset_timeout=settings.reset_timeout,
            throw_new_error_on_trip=False,
            listeners=[_Transitions(self)],
            name=name,
        )
        self._opened_at = 0.0
        self._trials = 0
        self.transitions = 0
        """How many state changes so far (for /state and tests)."""

    @property
    def state(self) -> str:
        return str(self._breaker.current_state)

    @property
    def consecutive_failures(self) -> int:
        return int(self._breaker.fail_counter)

    def is_open(self) -> bool:
        return self.state == OPEN

    def seconds_until_half_open(self) -> float:
        return max(0.0, self._opened_at + self.settings.reset_timeout - self._clock.now())

    def on_state_change(self, old: str | None, new: str) -> None:
        self.transitions += 1
        if new == OPEN:
            self._opened_at = self._clock.now()
        log.warning("circuit breaker %s: %s -> %s", self.name, old, new)

    async def admit_async(self) -> Admission:
        """`admit`, for callers that may hold a fleet breaker."""
        return self.admit()

    def admit(self) -> Admission:
        """Let an attempt through or raise CircuitOpen; the caller must then call `finish`."""
        if self.state == OPEN:
            wait = self.seconds_until_half_open()
            if wait > 0:
                raise errors.CircuitOpen(
                    f"circuit breaker for {self.name} is open after {self.settings.failure_threshold}"
                    " consecutive failures",
                    retry_after=wait,
                )
            self._breaker.half_open()
        if self.state == HALF_OPEN:
            if self._trials >= self.settings.half_open_max:
                raise errors.CircuitOpen(
                    f"circuit breaker for {self.name} is half-open and its trial requests are in flight",
                    retry_after=1.0,
                )
            self._trials += 1
            return _LOCAL[HALF_OPEN]
        return _LOCAL[CLOSED]

    def finish(self, admission: Admission, failed: bool | None) -> None:
        """Report one admitted attempt: failed True/False, or None for neutral (cancelled)."""
        admitted_state = admission.state
        if admitted_state == HALF_OPEN:
            self._trials -= 1
        state = self.state
        if failed is None or state == OPEN or (state == HALF_OPEN and admitted_state != HALF_OPEN):
            return  # neutral, or a late result from before the trial: only trials decide half-open
        with contextlib.suppress(_AttemptFailed):
            self._breaker.call(_report_failure if failed else _report_success)

    def is_failure(self, response: ProxyResponse | None, error: errors.OutriggerError | None) -> bool | None:
        """True/False for a counted outcome; None (neutral) for errors not listed in failure_on."""
        if response is not None:
            return response.status in self._failure_statuses
        return True if error is not None and error.condition in self._failure_errors else None

    def snapshot(self) -> dict[str, object]:
        return {
            "scope": self.settings.scope,
            "state": self.state,
            "consecutive_failures": self.consecutive_failures,
            "transitions": self.transitions,
            "seconds_until_half_open": round(self.seconds_until_half_open(), 3) if self.is_open() else 0,
        }


class BreakerLayer:
    def __init__(self, breaker: CircuitBreaker) -> None:
        self.breaker = breaker
        self._shared = breaker.settings.scope == "fleet"

    async def __call__(self, request: ProxyRequest, next: Handler) -> ProxyResponse:
        breaker = self.breaker
        admission = await breaker.admit_async() if self._shared else breaker.admit()
        return await guarded(breaker, admission, request, next)


async def guarded(
    breaker: CircuitBreaker, admission: Admission, request: ProxyRequest, next: Handler
) -> ProxyResponse:
    """One attempt `breaker` has just admitted, its outcome reported back to it."""
    failed: bool | None = None
    try:
        response = await next(request)
        failed = breaker.is_failure(response, None)
        return response
    except errors.OutriggerError as error:
        failed = breaker.is_failure(None, error)
        raise
    finally:
        breaker.finish(admission, failed)
