"""Parsing what providers tell us about their quota and when to come back.

Retry-After, and the rate-limit header dialects of the providers our users call
(`DIALECTS`: the IETF draft's structured ``RateLimit``, ``RateLimit-*``,
``X-RateLimit-*``, OpenAI's and Anthropic's), each read into one `ProviderQuota`.
Structured fields are parsed by http-sf (RFC 9651), wrapped in `_structured`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import http_sf
from multidict import MultiMapping


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


def _integer(value: str | None) -> int | None:
    try:
        return int(value.strip()) if value is not None else None
    except ValueError:
        return None


@dataclass(frozen=True)
class ProviderQuota:
    """The provider's own view of our quota, as last reported in its rate-limit headers."""

    limit: int | None
    remaining: int | None
    reset_seconds: float | None
    observed_at: float
    """Wall-clock time of the response that reported it."""
    dialect: str = ""
    """Which headers said so (a name of `DIALECTS`)."""

    @classmethod
    def from_headers(cls, headers: MultiMapping[str], wall_now: float) -> ProviderQuota | None:
        """The first dialect that finds a limit or a remaining count; None when none does."""
        for name, parse in DIALECTS:
            found = parse(headers, wall_now)
            if found is not None and (found[0] is not None or found[1] is not None):
                return cls(*found, observed_at=wall_now, dialect=name)
        return None

    def as_dict(self) -> dict[str, float | int | str | None]:
        return {
            "limit": self.limit,
            "remaining": self.remaining,
            "reset_seconds": self.reset_seconds,
            "observed_at": self.observed_at,
            "dialect": self.dialect,
        }


_Reading = tuple[int | None, int | None, float | None]
"""limit, remaining, seconds until the reset."""


def _structured(headers: MultiMapping[str], name: str, kind: str) -> Any:
    """One structured field (RFC 9651), every line of it; None when absent or malformed."""
    lines = headers.getall(name, [])
    if not lines:
        return None
    try:
        return http_sf.parse(", ".join(lines).encode("ascii"), tltype=kind)
    except (UnicodeEncodeError, http_sf.StructuredFieldError):
        return None


def _sf_integer(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def ietf_structured(headers: MultiMapping[str], wall_now: float) -> _Reading | None:
    """``RateLimit`` (+ ``RateLimit-Policy``) of draft-ietf-httpapi-ratelimit-headers.

    Current drafts (-08 and later; https://datatracker.ietf.org/doc/draft-ietf-httpapi-ratelimit-headers/):
    a List of named quotas, ``RateLimit: "default";r=50;t=30`` with the policy's size in
    ``RateLimit-Policy: "default";q=100;w=60``; the most constraining quota (fewest left) counts.
    Older drafts (-05 to -07): one Dictionary, ``RateLimit: limit=100, remaining=50, reset=30``.
    """
    if "RateLimit" not in headers:
        return None
    members = _structured(headers, "RateLimit", "list")
    if members is not None:
        quotas = [
            (str(name), _sf_integer(params.get("r")), _sf_integer(params.get("t")))
            for name, params in members
            if not isinstance(name, list) and _sf_integer(params.get("r")) is not None
        ]
        if quotas:
            name, remaining, reset = min(quotas, key=lambda quota: quota[1] or 0)  # fewest left
            policies = _structured(headers, "RateLimit-Policy", "list") or []
            sizes = {
                str(p): _sf_integer(params.get("q")) for p, params in policies if not isinstance(p, list)
            }
            return sizes.get(name), remaining, None if reset is None else float(reset)
    fields = _structured(headers, "RateLimit", "dictionary")
    if not fields:
        return None
    limit, remaining, reset = (
        _sf_integer(fields.get(key, (None,))[0]) for key in ("limit", "remaining", "reset")
    )
    return limit, remaining, None if reset is None else float(reset)


def ietf_separate(headers: MultiMapping[str], wall_now: float) -> _Reading | None:
    """``RateLimit-Limit`` / ``-Remaining`` / ``-Reset`` (drafts -00 to -04, and many APIs;
    e.g. GitLab: https://docs.gitlab.com/administration/settings/user_and_ip_rate_limits/)."""
    return (
        _integer(headers.get("RateLimit-Limit")),
        _integer(headers.get("RateLimit-Remaining")),
        reset_seconds(headers.get("RateLimit-Reset"), wall_now),
    )


def x_ratelimit(headers: MultiMapping[str], wall_now: float) -> _Reading | None:
    """``X-RateLimit-Limit`` / ``-Remaining`` / ``-Reset``: GitHub sends epoch seconds
    (https://docs.github.com/en/rest/using-the-rest-api/rate-limits-for-the-rest-api), most
    others delta seconds; `reset_seconds` tells them apart by size."""
    return (
        _integer(headers.get("X-RateLimit-Limit")),
        _integer(headers.get("X-RateLimit-Remaining")),
        reset_seconds(headers.get("X-RateLimit-Reset"), wall_now),
    )


_GO_PART = r"(\d+(?:\.\d*)?|\.\d+)(h|ms|m|s|us|µs|ns)"
_GO_PARTS = re.compile(_GO_PART)
_GO_DURATION = re.compile(f"(?:{_GO_PART})+")
_GO_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def go_duration_seconds(value: str | None) -> float | None:
    """A Go ``time.Duration`` string (``6m0s``, ``1s``, ``20ms``, ``1h2m3.5s``); None if not one."""
    if value is None:
        return None
    text = value.strip()
    if not _GO_DURATION.fullmatch(text):
        return None
    return sum(float(number) * _GO_UNITS[unit] for number, unit in _GO_PARTS.findall(text))


def openai(headers: MultiMapping[str], wall_now: float) -> _Reading | None:
    """``x-ratelimit-{limit,remaining,reset}-requests`` (reset a Go duration), as documented
    at https://platform.openai.com/docs/guides/rate-limits#rate-limits-in-headers. The token
    quota (``-tokens``) is not paced: Outrigger counts requests, not tokens."""
    return (
        _integer(headers.get("x-ratelimit-limit-requests")),
        _integer(headers.get("x-ratelimit-remaining-requests")),
        go_duration_seconds(headers.get("x-ratelimit-reset-requests")),
    )


def rfc3339_seconds(value: str | None, wall_now: float) -> float | None:
    """Seconds from `wall_now` until an RFC 3339 time (``2024-04-01T00:00:05Z``); None if invalid."""
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if when.tzinfo is None:
        return None  # RFC 3339 always names the offset
    return max(0.0, when.timestamp() - wall_now)


def anthropic(headers: MultiMapping[str], wall_now: float) -> _Reading | None:
    """``anthropic-ratelimit-requests-{limit,remaining,reset}`` (reset an RFC 3339 time), as
    documented at https://docs.anthropic.com/en/api/rate-limits#response-headers (the token
    families are not paced, as for OpenAI)."""
    return (
        _integer(headers.get("anthropic-ratelimit-requests-limit")),
        _integer(headers.get("anthropic-ratelimit-requests-remaining")),
        rfc3339_seconds(headers.get("anthropic-ratelimit-requests-reset"), wall_now),
    )


DIALECTS: tuple[tuple[str, Callable[[MultiMapping[str], float], _Reading | None]], ...] = (
    ("ietf", ietf_structured),
    ("ratelimit", ietf_separate),
    ("x-ratelimit", x_ratelimit),
    ("openai", openai),
    ("anthropic", anthropic),
)
"""Tried in this order; the first that reports a limit or a remaining count wins (docs/policies.md)."""


def pause_requested(
    quota: ProviderQuota | None, headers: MultiMapping[str], status: int, wall_now: float
) -> tuple[float, str] | None:
    """How long the provider asked us to hold off, and why; None when it did not. `quota` is
    what `ProviderQuota.from_headers` read from the same response."""
    if status == 429:
        retry_after = retry_after_seconds(headers.get("Retry-After"), wall_now)
        if retry_after is not None:
            return retry_after, "429 with Retry-After"
    if quota is None:
        reset = _first_reset(headers, wall_now) if status == 429 else None
        return (reset, "429 with reset") if reset is not None else None
    if quota.reset_seconds is not None and (quota.remaining == 0 or status == 429):
        if quota.remaining == 0:
            return quota.reset_seconds, f"quota exhausted ({quota.dialect}: 0 remaining)"
        return quota.reset_seconds, "429 with reset"
    return None


def _first_reset(headers: MultiMapping[str], wall_now: float) -> float | None:
    """A reset without a count (a bare ``RateLimit-Reset`` on a 429)."""
    for _, parse in DIALECTS:
        found = parse(headers, wall_now)
        if found is not None and found[2] is not None:
            return found[2]
    return None
