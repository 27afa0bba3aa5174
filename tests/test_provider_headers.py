"""Retry-After parsing (RFC 9110 10.2.3): delta-seconds or an HTTP-date, relative to the wall clock."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from proxy.provider_headers import retry_after_seconds

NOW = 1_700_000_000.0


def _http_date(timestamp: float) -> str:
    return format_datetime(datetime.fromtimestamp(timestamp, tz=UTC), usegmt=True)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0", 0.0), ("1", 1.0), ("120", 120.0), (" 7 ", 7.0), ("86400", 86400.0)],
)
def test_delta_seconds(value: str, expected: float) -> None:
    assert retry_after_seconds(value, NOW) == expected


def test_imf_fixdate_in_the_future() -> None:
    assert retry_after_seconds(_http_date(NOW + 30), NOW) == 30.0
    assert retry_after_seconds(_http_date(NOW + 3600), NOW) == 3600.0


def test_the_wall_clock_is_the_reference() -> None:
    date = _http_date(NOW + 30)
    assert retry_after_seconds(date, NOW + 10) == 20.0


def test_date_in_the_past_means_now() -> None:
    assert retry_after_seconds(_http_date(NOW - 30), NOW) == 0.0


def test_rfc850_date() -> None:
    # Sunday, 06-Nov-94 08:49:37 GMT == 784111777
    assert retry_after_seconds("Sunday, 06-Nov-94 08:49:37 GMT", 784111777.0 - 10) == 10.0


def test_asctime_date() -> None:
    assert retry_after_seconds("Sun Nov  6 08:49:37 1994", 784111777.0 - 10) == 10.0


@pytest.mark.parametrize("value", [None, "", "soon", "-1", "1.5", "1e3", "Mon, 99 Foo 2024 99:99:99 GMT"])
def test_invalid_or_absent_is_none(value: str | None) -> None:
    assert retry_after_seconds(value, NOW) is None


# Regression: fixed in 0382a82 (str.isdigit() accepted superscripts and crashed float()).
@pytest.mark.parametrize("value", ["\u00b2", "\u0661\u0662", "9" * 400])
def test_non_ascii_or_infinite_values_are_invalid_not_a_crash(value: str) -> None:
    assert retry_after_seconds(value, NOW) is None
