"""Exponential backoff with full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter")."""

from __future__ import annotations

import random
from collections.abc import Callable


def full_jitter(retry: int, base: float, cap: float, uniform: Callable[[float, float], float]) -> float:
    """Delay before retry number `retry` (1 = first retry): uniform in [0, min(cap, base * 2**(retry-1))]."""
    ceiling = min(cap, base * 2.0 ** min(retry - 1, 62))
    return uniform(0.0, ceiling)


DEFAULT_UNIFORM: Callable[[float, float], float] = random.SystemRandom().uniform
