"""What providers say about when to come back: Retry-After, (X-)RateLimit-* and the quota kept from them."""

from __future__ import annotations

import math
from email.utils import formatdate

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy.provider_headers import ProviderQuota, pause_requested, reset_seconds, retry_after_seconds

WALL = 1_700_000_000.0


# --------------------------------------------------------------------------- Retry-After


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", 0.0),
        ("1", 1.0),
        ("120", 120.0),
        (" 7 ", 7.0),
        (formatdate(WALL + 90, usegmt=True), 90.0),
        (formatdate(WALL - 90, usegmt=True), 0.0),  # a date in the past: come back now
    ],
)
def test_retry_after_delta_seconds_and_http_date(value: str, expected: float) -> None:
    assert retry_after_seconds(value, WALL) == pytest.approx(expected)


@pytest.mark.parametrize("value", [None, "", "soon", "-5", "1.5", "Wed, 99 Foo 2024 00:00:00 GMT"])
def test_retry_after_invalid_is_none(value: str | None) -> None:
    assert retry_after_seconds(value, WALL) is None


def test_retry_after_with_non_ascii_digits_is_invalid_not_an_exception() -> None:
    assert retry_after_seconds("\u00b2", WALL) is None


# --------------------------------------------------------------------------- reset


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("30", 30.0, id="delta"),
        pytest.param("0", 0.0, id="delta-zero"),
        pytest.param("1.5", 1.5, id="delta-fraction"),
        pytest.param("86400", 86400.0, id="delta-a-day"),
        pytest.param(str(int(WALL) + 45), 45.0, id="epoch-seconds"),
        pytest.param(str(int(WALL) - 45), 0.0, id="epoch-seconds-past"),
        pytest.param(str(int(WALL + 12) * 1000), 12.0, id="epoch-millis"),
    ],
)
def test_reset_delta_and_epoch_are_told_apart(value: str, expected: float) -> None:
    assert reset_seconds(value, WALL) == pytest.approx(expected)


@given(st.integers(min_value=0, max_value=999_999_999))
def test_any_reset_below_the_epoch_threshold_is_a_delta(delta: int) -> None:
    assert reset_seconds(str(delta), WALL) == delta


@given(st.integers(min_value=-(10**6), max_value=10**8))
def test_any_epoch_reset_is_time_left(offset: int) -> None:
    assert reset_seconds(str(int(WALL) + offset), WALL) == max(0, offset)


@pytest.mark.parametrize("value", [None, "", "later", "1,5"])
def test_reset_invalid_is_none(value: str | None) -> None:
    assert reset_seconds(value, WALL) is None


@pytest.mark.parametrize("value", ["inf", "1e400", "Infinity"])
def test_reset_non_finite_is_invalid(value: str) -> None:
    result = reset_seconds(value, WALL)
    assert result is None or math.isfinite(result)


# --------------------------------------------------------------------------- quota


def test_quota_from_x_ratelimit_headers() -> None:
    headers = CIMultiDict(
        {
            "X-RateLimit-Limit": "5000",
            "X-RateLimit-Remaining": "4000",
            "X-RateLimit-Reset": str(int(WALL) + 60),
        }
    )
    quota = ProviderQuota.from_headers(headers, WALL)
    assert quota == ProviderQuota(
        limit=5000, remaining=4000, reset_seconds=60.0, observed_at=WALL, dialect="x-ratelimit"
    )
    assert quota.as_dict() == {
        "limit": 5000,
        "remaining": 4000,
        "reset_seconds": 60.0,
        "observed_at": WALL,
        "dialect": "x-ratelimit",
    }


def test_quota_from_ietf_ratelimit_headers() -> None:
    headers = CIMultiDict({"RateLimit-Limit": "100", "RateLimit-Remaining": "3", "RateLimit-Reset": "17"})
    quota = ProviderQuota.from_headers(headers, WALL)
    assert quota == ProviderQuota(
        limit=100, remaining=3, reset_seconds=17.0, observed_at=WALL, dialect="ratelimit"
    )


def test_quota_header_names_are_case_insensitive() -> None:
    headers = CIMultiDict({"x-ratelimit-limit": "10", "x-ratelimit-remaining": "9"})
    quota = ProviderQuota.from_headers(headers, WALL)
    assert quota is not None
    assert (quota.limit, quota.remaining, quota.reset_seconds) == (10, 9, None)


def test_quota_with_only_remaining() -> None:
    quota = ProviderQuota.from_headers(CIMultiDict({"RateLimit-Remaining": "0"}), WALL)
    assert quota is not None
    assert (quota.limit, quota.remaining) == (None, 0)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Content-Type": "text/plain"},
        {"X-RateLimit-Reset": "30"},
        {"X-RateLimit-Limit": "many", "X-RateLimit-Remaining": "some"},
    ],
)
def test_no_quota_without_limit_or_remaining(headers: dict[str, str]) -> None:
    assert ProviderQuota.from_headers(CIMultiDict(headers), WALL) is None


# --------------------------------------------------------------------------- pause_requested


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        pytest.param(429, {"Retry-After": "3"}, 3.0, id="429-retry-after"),
        pytest.param(429, {"Retry-After": formatdate(WALL + 8, usegmt=True)}, 8.0, id="429-retry-after-date"),
        pytest.param(200, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1"}, 1.0, id="x-delta"),
        pytest.param(
            200,
            {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(int(WALL) + 40)},
            40.0,
            id="x-epoch",
        ),
        pytest.param(200, {"RateLimit-Remaining": "0", "RateLimit-Reset": "7"}, 7.0, id="ietf"),
        pytest.param(403, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "5"}, 5.0, id="github-403"),
        pytest.param(429, {"RateLimit-Reset": "4"}, 4.0, id="429-reset-only"),
        pytest.param(
            429,
            {"Retry-After": "2", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "50"},
            2.0,
            id="retry-after-wins",
        ),
    ],
)
def test_pause_requested(status: int, headers: dict[str, str], expected: float) -> None:
    fields = CIMultiDict(headers)
    pause = pause_requested(ProviderQuota.from_headers(fields, WALL), fields, status, WALL)
    assert pause is not None
    assert pause[0] == pytest.approx(expected)
    assert pause[1]


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        pytest.param(200, {}, id="nothing"),
        pytest.param(200, {"Retry-After": "3"}, id="retry-after-on-200"),
        pytest.param(503, {"Retry-After": "3"}, id="retry-after-on-503"),
        pytest.param(200, {"X-RateLimit-Remaining": "1", "X-RateLimit-Reset": "30"}, id="quota-left"),
        pytest.param(200, {"X-RateLimit-Remaining": "0"}, id="no-reset"),
        pytest.param(429, {}, id="bare-429"),
    ],
)
def test_no_pause_requested(status: int, headers: dict[str, str]) -> None:
    fields = CIMultiDict(headers)
    assert pause_requested(ProviderQuota.from_headers(fields, WALL), fields, status, WALL) is None
