"""The declared fallback: which failures it answers, what it answers, and what stays visible.

Fallback is outermost, so the fake `next` raising an Outrigger error stands for
any layer below (bulkhead, deadline, breaker, limiter, transport after retries).
"""

from __future__ import annotations

import json

import pytest

from proxy import errors
from proxy.config.model import Fallback
from proxy.exchange import ProxyResponse
from proxy.layers.fallback import FallbackLayer
from tests.fakes import TrackedBody, fake_upstream, make_request, make_response, read_body

DEGRADED = b'{"degraded": true}'


def _layer(**settings: object) -> FallbackLayer:
    return FallbackLayer(Fallback.model_validate(settings))


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (errors.CircuitOpen("open", retry_after=3), "circuit_open"),
        (errors.Overloaded("full"), "overloaded"),
        (errors.RateLimited("slow down"), "rate_limited"),
        (errors.Timeout("total"), "timeout"),
        (errors.AttemptTimeout("per_try"), "timeout"),
        (errors.ConnectFailure("refused"), "upstream_unreachable"),
        (errors.ConnectionReset("reset"), "upstream_unreachable"),
        (errors.UpstreamUnreachable("gone"), "upstream_unreachable"),
    ],
)
async def test_default_conditions_answer_the_declared_response(
    failure: errors.OutriggerError, reason: str
) -> None:
    request = make_request()

    response = await _layer()(request, fake_upstream(failure))

    assert response.status == 503
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["x-outrigger-fallback"] == "true"
    assert response.headers["x-outrigger-error"] == reason
    assert response.headers["Content-Length"] == str(len(DEGRADED))
    assert await read_body(response) == DEGRADED
    assert request.fallback == reason


async def test_declared_status_headers_and_body() -> None:
    layer = _layer(
        on=["circuit_open"], status=200, headers={"Content-Type": "text/plain", "X-Mode": "cached"}, body="[]"
    )

    response = await layer(make_request(), fake_upstream(errors.CircuitOpen("open")))

    assert response.status == 200
    assert response.headers["Content-Type"] == "text/plain"
    assert response.headers["X-Mode"] == "cached"
    assert response.headers["x-outrigger-error"] == "circuit_open"
    assert await read_body(response) == b"[]"


@pytest.mark.parametrize(
    "failure",
    [
        errors.CircuitOpen("open"),  # not in `on` below
        errors.BadRequest("bad"),
        errors.IdempotencyKeyReused("reused"),
        errors.AddressNotAllowed("ssrf"),
        errors.ClientDisconnected("gone"),
        errors.FaultInjected("drill", status=503),
    ],
)
async def test_failures_not_in_on_pass_through(failure: errors.OutriggerError) -> None:
    request = make_request()

    with pytest.raises(type(failure)):
        await _layer(on=["timeout", "upstream_unreachable", "5xx"])(request, fake_upstream(failure))
    assert request.fallback is None


async def test_default_on_does_not_answer_an_injected_fault() -> None:
    with pytest.raises(errors.FaultInjected):
        await _layer()(make_request(), fake_upstream(errors.FaultInjected("drill", status=503)))


@pytest.mark.parametrize(("on", "status"), [(["5xx"], 503), (["500-504"], 502), ([503], 503), (["503"], 503)])
async def test_matching_upstream_status_is_discarded_and_replaced(on: list[object], status: int) -> None:
    upstream_body = TrackedBody(b"upstream error page")
    request = make_request()

    response = await _layer(on=on)(
        request, fake_upstream(ProxyResponse(status, make_response(status).headers, upstream_body))
    )

    assert upstream_body.released, "the discarded upstream response must give its connection back"
    assert not upstream_body.read
    assert response.status == 503
    assert response.headers["x-outrigger-error"] == str(status)
    assert response.headers["x-outrigger-fallback"] == "true"
    assert await read_body(response) == DEGRADED
    assert request.fallback == str(status)


@pytest.mark.parametrize("status", [200, 404, 429, 500])
async def test_statuses_not_in_on_pass_through_untouched(status: int) -> None:
    request = make_request()
    upstream = fake_upstream((status, {"X-Up": "1"}, b"theirs"))

    response = await _layer(on=["circuit_open", "502-504"])(request, upstream)

    assert response is upstream.responses[0]
    assert await read_body(response) == b"theirs"
    assert "x-outrigger-fallback" not in response.headers
    assert request.fallback is None


async def test_each_answer_is_a_fresh_copy() -> None:
    layer = _layer()
    first = await layer(make_request(), fake_upstream(errors.CircuitOpen("open")))
    second = await layer(make_request(), fake_upstream(errors.Timeout("late")))

    assert first.headers["x-outrigger-error"] == "circuit_open"
    assert second.headers["x-outrigger-error"] == "timeout"
    assert json.loads(await read_body(first)) == {"degraded": True}


def test_conditions_reuse_the_status_syntax_and_refuse_retry_kinds() -> None:
    assert Fallback.model_validate({"on": ["5XX", 502, "500-504", "Circuit_Open"]}).on == (
        "5xx",
        "502",
        "500-504",
        "circuit_open",
    )
    for bad in ("connect-failure", "reset", "bogus", "600", "99"):
        with pytest.raises(ValueError, match="fallback condition"):
            Fallback.model_validate({"on": [bad]})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"status": 150}, "greater than or equal to 200"),
        ({"status": 600}, "less than or equal to 599"),
        ({"body": "x" * (64 * 1024 + 1)}, "at most 65536"),
        ({"headers": {"Bad Name": "x"}}, "invalid header name"),
        ({"headers": {"Content-Length": "3"}}, "set by Outrigger"),
        ({"headers": {"x-outrigger-error": "x"}}, "set by Outrigger"),
        ({"status": 204}, "has no body"),
    ],
)
def test_invalid_fallbacks_are_refused(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Fallback.model_validate(settings)
