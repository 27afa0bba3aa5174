"""Retry budget with Linkerd's semantics: retries may add at most `ratio` of the request load.

Over a sliding `window`, a retry is allowed while
``retries + 1 <= ratio * requests + min_per_second * window``.
Counts are kept in ten time slots so memory is constant whatever the load.
"""

from __future__ import annotations

from proxy.clock import Clock
from proxy.config.model import RetryBudgetSettings

_SLOTS = 10


class RetryBudget:
    def __init__(self, settings: RetryBudgetSettings, clock: Clock) -> None:
        self.settings = settings
        self._clock = clock
        self._slot_length = settings.window / _SLOTS
        self._requests = [0] * _SLOTS
        self._retries = [0] * _SLOTS
        self._epoch = [-1] * _SLOTS

    def _slot(self) -> int:
        tick = int(self._clock.now() // self._slot_length)
        index = tick % _SLOTS
        if self._epoch[index] != tick:
            self._epoch[index] = tick
            self._requests[index] = 0
            self._retries[index] = 0
        return index

    def _live(self, counts: list[int]) -> int:
        oldest = int(self._clock.now() // self._slot_length) - _SLOTS + 1
        return sum(c for c, epoch in zip(counts, self._epoch, strict=True) if epoch >= oldest)

    def record_request(self) -> None:
        self._requests[self._slot()] += 1

    def try_withdraw(self) -> bool:
        """Take one retry from the budget if it allows one."""
        index = self._slot()
        allowance = self.settings.ratio * self._live(self._requests)
        allowance += self.settings.min_per_second * self.settings.window
        if self._live(self._retries) + 1 > allowance:
            return False
        self._retries[index] += 1
        return True

    def snapshot(self) -> dict[str, float]:
        """Current window counts, for /state."""
        self._slot()
        return {"requests": self._live(self._requests), "retries": self._live(self._retries)}
