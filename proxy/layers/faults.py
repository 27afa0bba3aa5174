"""Fault drills (SPEC 9): injected aborts and delays, to test the app's own resilience.

Right below the deadline layer, so an injected fault happens before any upstream
work: an abort is what the app sees (never retried, never counted by the
breaker, which it never reaches), and a delay counts against ``total`` like real
slowness would. One roll of the injected random source per eligible request
picks at most one fault: ``[0, abort.percent)`` aborts, the next
``delay.percent`` delays (so each happens at its own rate). With
``header_only``, only requests carrying ``x-outrigger-fault: on`` are eligible.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from proxy import errors
from proxy.clock import Clock
from proxy.config.model import Faults
from proxy.config.units import format_duration
from proxy.exchange import Handler, ProxyRequest, ProxyResponse

ABORT = "abort"
DELAY = "delay"


class FaultsLayer:
    def __init__(
        self,
        settings: Faults,
        clock: Clock,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.uniform = uniform
        self.abort_percent = settings.abort.percent if settings.abort else 0.0
        self.delay_percent = settings.delay.percent if settings.delay else 0.0

    def _pick(self) -> str | None:
        if self.abort_percent + self.delay_percent <= 0:
            return None
        roll = self.uniform(0.0, 100.0)
        if self.abort_percent >= 100 or roll < self.abort_percent:
            return ABORT
        if roll < self.abort_percent + self.delay_percent or self.delay_percent >= 100:
            return DELAY
        return None

    async def __call__(self, request: ProxyRequest, next: Handler) -> ProxyResponse:
        if self.settings.header_only and not request.fault_requested:
            return await next(request)
        fault = self._pick()
        if fault == ABORT:
            assert self.settings.abort is not None
            request.fault = ABORT
            raise errors.FaultInjected(
                f"fault drill: injected abort (faults.abort, {self.abort_percent:g}% of requests)",
                status=self.settings.abort.status,
            )
        if fault == DELAY:
            assert self.settings.delay is not None
            request.fault = DELAY
            await self._delay(request, self.settings.delay.duration)
        return await next(request)

    async def _delay(self, request: ProxyRequest, duration: float) -> None:
        """Sleep `duration`, but never past the request's deadline (then it is a timeout)."""
        if request.deadline is None:
            await self.clock.sleep(duration)
            return
        left = request.deadline - self.clock.now()
        if duration < left:
            await self.clock.sleep(duration)
            return
        await self.clock.sleep(max(0.0, left))
        raise errors.Timeout(
            f"no response within the deadline: a fault drill delayed the request {format_duration(duration)}"
        )
