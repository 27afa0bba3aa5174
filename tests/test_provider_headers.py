"""Retry-After parsing (RFC 9110 10.2.3), and the quota header dialects, table by table."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
from multidict import CIMultiDict

from proxy.provider_headers import (
    DIALECTS,
    ProviderQuota,
    go_duration_seconds,
    pause_requested,
    retry_after_seconds,
    rfc3339_seconds,
)

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


# --------------------------------------------------------------------------- quota dialects
# Each table holds the provider's own documented example (the page is cited), then edge cases.

WALL_ISO = "2023-11-14T22:13:20Z"
"""NOW as an RFC 3339 time."""


def _quota(
    headers: dict[str, str], now: float = NOW
) -> tuple[str, int | None, int | None, float | None] | None:
    quota = ProviderQuota.from_headers(CIMultiDict(headers), now)
    return None if quota is None else (quota.dialect, quota.limit, quota.remaining, quota.reset_seconds)


IETF_STRUCTURED = [
    # draft-ietf-httpapi-ratelimit-headers-10, sections 3 and 4 (current drafts: List of named quotas)
    # https://datatracker.ietf.org/doc/draft-ietf-httpapi-ratelimit-headers/
    pytest.param(
        {"RateLimit": '"default";r=50;t=30', "RateLimit-Policy": '"default";q=100;w=60'},
        ("ietf", 100, 50, 30.0),
        id="draft-10-example",
    ),
    pytest.param(
        {"RateLimit-Policy": '"burst";q=100;w=60,"daily";q=1000;w=86400', "RateLimit": '"daily";r=1;t=5000'},
        ("ietf", 1000, 1, 5000.0),
        id="draft-10-two-policies",
    ),
    pytest.param(
        {"RateLimit": '"burst";r=40;t=20, "daily";r=3;t=4000'},
        ("ietf", None, 3, 4000.0),
        id="fewest-left-counts-no-policy-header",
    ),
    pytest.param({"RateLimit": "default;r=5;t=1"}, ("ietf", None, 5, 1.0), id="draft-08-token-name"),
    pytest.param({"RateLimit": '"default";r=7'}, ("ietf", None, 7, None), id="no-reset"),
    # draft-ietf-httpapi-ratelimit-headers-07, section 5 (older drafts: one Dictionary)
    # https://datatracker.ietf.org/doc/html/draft-ietf-httpapi-ratelimit-headers-07
    pytest.param({"RateLimit": "limit=100, remaining=50, reset=30"}, ("ietf", 100, 50, 30.0), id="draft-07"),
    pytest.param({"RateLimit": "remaining=0, reset=4"}, ("ietf", None, 0, 4.0), id="draft-07-partial"),
]


@pytest.mark.parametrize(("headers", "expected"), IETF_STRUCTURED)
def test_ietf_structured_ratelimit(headers: dict[str, str], expected: tuple[object, ...]) -> None:
    assert _quota(headers) == expected


@pytest.mark.parametrize(
    "value",
    ['"default";r=-1;t=3', '"default";r=1.5', "garbage;;", '"unterminated', "limit=ten", "ä=1", "default"],
)
def test_malformed_structured_ratelimit_is_no_quota(value: str) -> None:
    assert _quota({"RateLimit": value}) is None


SEPARATE_FIELDS = [
    # draft-ietf-httpapi-ratelimit-headers-03 section 7 and GitLab's documented example
    # (https://docs.gitlab.com/administration/settings/user_and_ip_rate_limits/): RateLimit-*
    pytest.param(
        {"RateLimit-Limit": "10", "RateLimit-Remaining": "9", "RateLimit-Reset": "1"},
        ("ratelimit", 10, 9, 1.0),
        id="draft-03",
    ),
    pytest.param(
        {"RateLimit-Limit": "60", "RateLimit-Remaining": "0", "RateLimit-Reset": str(int(NOW) + 40)},
        ("ratelimit", 60, 0, 40.0),
        id="gitlab-epoch",
    ),
    # GitHub (https://docs.github.com/en/rest/using-the-rest-api/rate-limits-for-the-rest-api):
    # x-ratelimit-limit: 60, x-ratelimit-remaining: 56, x-ratelimit-used: 4, x-ratelimit-reset: epoch
    pytest.param(
        {
            "x-ratelimit-limit": "60",
            "x-ratelimit-remaining": "56",
            "x-ratelimit-used": "4",
            "x-ratelimit-reset": str(int(NOW) + 1800),
        },
        ("x-ratelimit", 60, 56, 1800.0),
        id="github",
    ),
    pytest.param(
        {"X-RateLimit-Limit": "20", "X-RateLimit-Remaining": "7", "X-RateLimit-Reset": "2"},
        ("x-ratelimit", 20, 7, 2.0),
        id="x-delta",
    ),
]


@pytest.mark.parametrize(("headers", "expected"), SEPARATE_FIELDS)
def test_ratelimit_and_x_ratelimit_fields(headers: dict[str, str], expected: tuple[object, ...]) -> None:
    assert _quota(headers) == expected


OPENAI = [
    # https://platform.openai.com/docs/guides/rate-limits#rate-limits-in-headers (its sample values)
    pytest.param(
        {
            "x-ratelimit-limit-requests": "60",
            "x-ratelimit-limit-tokens": "150000",
            "x-ratelimit-remaining-requests": "59",
            "x-ratelimit-remaining-tokens": "149984",
            "x-ratelimit-reset-requests": "1s",
            "x-ratelimit-reset-tokens": "6m0s",
        },
        ("openai", 60, 59, 1.0),
        id="openai-docs",
    ),
    pytest.param(
        {"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "20ms"},
        ("openai", None, 3, 0.02),
        id="milliseconds",
    ),
    pytest.param(
        {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6m0s"},
        ("openai", None, 0, 360.0),
        id="minutes",
    ),
]


@pytest.mark.parametrize(("headers", "expected"), OPENAI)
def test_openai_request_quota(headers: dict[str, str], expected: tuple[object, ...]) -> None:
    assert _quota(headers) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1h2m3.5s", 3723.5),
        ("0s", 0.0),
        ("250us", 0.00025),
        ("1.5s", 1.5),
    ],
)
def test_go_durations(value: str, expected: float) -> None:
    assert go_duration_seconds(value) == pytest.approx(expected)


@pytest.mark.parametrize("value", [None, "", "1", "s", "1x", "-1s", "1 s", "1s2"])
def test_invalid_go_durations(value: str | None) -> None:
    assert go_duration_seconds(value) is None


ANTHROPIC = [
    # https://docs.anthropic.com/en/api/rate-limits#response-headers: limit, remaining, and the
    # reset as an RFC 3339 time
    pytest.param(
        {
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "49",
            "anthropic-ratelimit-requests-reset": "2023-11-14T22:14:20Z",
            "anthropic-ratelimit-tokens-limit": "40000",
        },
        ("anthropic", 50, 49, 60.0),
        id="anthropic-docs",
    ),
    pytest.param(
        {
            "anthropic-ratelimit-requests-remaining": "0",
            "anthropic-ratelimit-requests-reset": "2023-11-14T23:13:21+01:00",
        },
        ("anthropic", None, 0, 1.0),
        id="offset",
    ),
    pytest.param(
        {
            "anthropic-ratelimit-requests-remaining": "5",
            "anthropic-ratelimit-requests-reset": "2023-11-14T22:13:20",
        },
        ("anthropic", None, 5, None),
        id="no-offset-is-no-reset",
    ),
]


@pytest.mark.parametrize(("headers", "expected"), ANTHROPIC)
def test_anthropic_request_quota(headers: dict[str, str], expected: tuple[object, ...]) -> None:
    assert _quota(headers) == expected


def test_rfc3339_in_the_past_means_now() -> None:
    assert rfc3339_seconds("2023-11-14T22:13:00Z", NOW) == 0.0
    assert rfc3339_seconds(WALL_ISO, NOW) == 0.0
    assert rfc3339_seconds("tomorrow", NOW) is None


def test_the_first_dialect_that_reports_wins() -> None:
    headers = {"RateLimit": '"default";r=5;t=3', "X-RateLimit-Remaining": "99", "X-RateLimit-Reset": "60"}
    assert _quota(headers) == ("ietf", None, 5, 3.0)
    assert [name for name, _ in DIALECTS] == ["ietf", "ratelimit", "x-ratelimit", "openai", "anthropic"]


@pytest.mark.parametrize(
    ("headers", "status", "expected"),
    [
        pytest.param({"RateLimit": '"default";r=0;t=12'}, 200, 12.0, id="ietf"),
        pytest.param({"RateLimit": "limit=10, remaining=0, reset=5"}, 200, 5.0, id="ietf-older"),
        pytest.param(
            {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1.5s"},
            200,
            1.5,
            id="openai",
        ),
        pytest.param(
            {
                "anthropic-ratelimit-requests-remaining": "0",
                "anthropic-ratelimit-requests-reset": "2023-11-14T22:13:30Z",
            },
            429,
            10.0,
            id="anthropic-429",
        ),
    ],
)
def test_every_dialect_at_zero_asks_for_a_pause(
    headers: dict[str, str], status: int, expected: float
) -> None:
    fields = CIMultiDict(headers)
    pause = pause_requested(ProviderQuota.from_headers(fields, NOW), fields, status, NOW)
    assert pause is not None
    assert pause[0] == pytest.approx(expected)
