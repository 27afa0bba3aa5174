"""Parsing what providers tell us about when to come back (Retry-After, RateLimit-*)."""

from __future__ import annotations

from email.utils import parsedate_to_datetime


def retry_after_seconds(value: str | None, wall_now: float) -> float | None:
    """Delay from ``Retry-After``: delta-seconds or an HTTP-date (RFC 9110 10.2.3); None if absent/invalid."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - wall_now)
