"""Parsing what providers tell us about when to come back (Retry-After, RateLimit-*)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime


def retry_after_seconds(value: str | None, wall_now: float) -> float | None:
    """Delay from ``Retry-After``: delta-seconds or an HTTP-date (RFC 9110 10.2.3); None if absent/invalid."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        seconds = float(value)
        return seconds if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # asctime dates carry no zone; HTTP dates are GMT (RFC 9110 5.6.7)
    return max(0.0, when.timestamp() - wall_now)


_EPOCH_SECONDS = 1_000_000_000
"""Reset values this large are timestamps (GitHub style), not delays (IETF draft style)."""
_EPOCH_MILLIS = 1_000_000_000_000


def reset_seconds(value: str | None, wall_now: float) -> float | None:
    """Seconds until a rate-limit window resets: delta seconds, epoch seconds or epoch milliseconds."""
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    if not math.isfinite(number):
        return None
    if number >= _EPOCH_MILLIS:
        return max(0.0, number / 1000 - wall_now)
    if number >= _EPOCH_SECONDS:
        return max(0.0, number - wall_now)
    return max(0.0, number)


def _first(headers: Mapping[str, str], *names: str) -> str | None:
    return next((headers[name] for name in names if name in headers), None)


def _integer(value: str | None) -> int | None:
    try:
        return int(value.strip()) if value is not None else None
    except ValueError:
        return None


@dataclass(frozen=True)
class ProviderQuota:
    """The provider's own view of our quota, as last reported in (X-)RateLimit-* headers."""

    limit: int | None
    remaining: int | None
    reset_seconds: float | None
    observed_at: float
    """Wall-clock time of the response that reported it."""

    @classmethod
    def from_headers(cls, headers: Mapping[str, str], wall_now: float) -> ProviderQuota | None:
        limit = _integer(_first(headers, "X-RateLimit-Limit", "RateLimit-Limit"))
        remaining = _integer(_first(headers, "X-RateLimit-Remaining", "RateLimit-Remaining"))
        reset = reset_seconds(_first(headers, "X-RateLimit-Reset", "RateLimit-Reset"), wall_now)
        if limit is None and remaining is None:
            return None
        return cls(limit, remaining, reset, wall_now)

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "limit": self.limit,
            "remaining": self.remaining,
            "reset_seconds": self.reset_seconds,
            "observed_at": self.observed_at,
        }


def pause_requested(headers: Mapping[str, str], status: int, wall_now: float) -> tuple[float, str] | None:
    """How long the provider asked us to hold off, and why; None when it did not."""
    if status == 429:
        retry_after = retry_after_seconds(headers.get("Retry-After"), wall_now)
        if retry_after is not None:
            return retry_after, "429 with Retry-After"
    remaining = _integer(_first(headers, "X-RateLimit-Remaining", "RateLimit-Remaining"))
    reset = reset_seconds(_first(headers, "X-RateLimit-Reset", "RateLimit-Reset"), wall_now)
    if reset is not None and (remaining == 0 or status == 429):
        return reset, "quota exhausted (RateLimit-Remaining: 0)" if remaining == 0 else "429 with reset"
    return None
