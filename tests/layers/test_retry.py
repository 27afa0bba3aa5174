"""The retry layer with a fake clock, a deterministic random source and a scripted fake upstream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict

from proxy import errors
from proxy.clock import Clock
from proxy.exchange import Handler, ProxyRequest, ProxyResponse, RetryRecord
from proxy.layers import retry as retry_module
from proxy.layers.attempt import AttemptLayer
from proxy.layers.budget import RetryBudget
from proxy.layers.retry import RetryLayer
from proxy.pipeline import compose
from tests.fakes import (
    WALL_START,
    FakeClock,
    FakeUpstream,
    RecordingUniform,
    Script,
    TrackedBody,
    fake_upstream,
    make_request,
    make_response,
    read_body,
    settings_from,
)

FAILURES: list[tuple[type[errors.OutriggerError], str]] = [
    (errors.ConnectFailure, "connect-failure"),
    (errors.ConnectionReset, "reset"),
    (errors.AttemptTimeout, "timeout"),
]


class Harness:
    """A RetryLayer built from a `retries:` dict the way the pipeline builds it."""

    def __init__(
        self,
        budget: dict[str, Any] | None = None,
        fraction: float = 1.0,
        idempotency: dict[str, Any] | None = None,
        **retries: Any,
    ) -> None:
        retries.setdefault("backoff", {"base": "100ms", "max": "10s"})
        retries["budget"] = budget
        sections: dict[str, Any] = {"retries": retries}
        if idempotency is not None:
            sections["idempotency"] = idempotency
        self.settings = settings_from(**sections)
        assert self.settings.retries is not None
        self.clock = FakeClock()
        self.uniform = RecordingUniform(fraction)
        budget_settings = self.settings.retries.budget
        self.budget = RetryBudget(budget_settings, self.clock) if budget_settings else None
        self.layer = RetryLayer(
            self.settings.retries,
            self.settings.idempotency_header,
            self.budget,
            self.clock,
            uniform=self.uniform,
        )

    def request(self, method: str = "GET", **kwargs: Any) -> Any:
        return make_request(method, settings=self.settings, **kwargs)

    async def run(self, *script: Script, method: str = "GET", **kwargs: Any) -> tuple[Any, FakeUpstream]:
        upstream = fake_upstream(*script)
        request = self.request(method, **kwargs)
        response = await self.layer(request, upstream)
        return response, upstream


# --- conditions -------------------------------------------------------------------------------


@pytest.mark.parametrize(("failure", "condition"), FAILURES)
async def test_each_failure_condition_is_retried(
    failure: type[errors.OutriggerError], condition: str
) -> None:
    h = Harness(on=[condition])
    request = h.request("GET")
    upstream = fake_upstream(failure, 200)
    response = await h.layer(request, upstream)
    assert response.status == 200
    assert upstream.calls == 2
    assert [r.reason for r in request.retries] == [condition]


@pytest.mark.parametrize(("failure", "condition"), FAILURES)
async def test_failure_not_in_on_is_raised_at_once(
    failure: type[errors.OutriggerError], condition: str
) -> None:
    others = [c for _, c in FAILURES if c != condition]
    h = Harness(on=[*others, "5xx"])
    upstream = fake_upstream(failure, 200)
    with pytest.raises(failure):
        await h.layer(h.request("GET"), upstream)
    assert upstream.calls == 1
    assert h.clock.sleeps == []


@pytest.mark.parametrize(
    ("on", "status", "retried"),
    [
        (["503"], 503, True),
        (["503"], 502, False),
        (["500-504"], 500, True),
        (["500-504"], 502, True),
        (["500-504"], 504, True),
        (["500-504"], 505, False),
        (["500-504"], 499, False),
        (["5xx"], 500, True),
        (["5xx"], 599, True),
        (["5xx"], 429, False),
        (["429"], 429, True),
        (["5xx", "429"], 400, False),
        (["5xx", "429"], 401, False),
        (["5xx", "429"], 403, False),
        (["5xx", "429"], 404, False),
        (["5xx", "429"], 409, False),
        (["5xx", "429"], 422, False),
        (["5xx", "429"], 200, False),
    ],
)
async def test_status_conditions(on: list[str], status: int, retried: bool) -> None:
    h = Harness(on=on)
    request = h.request("GET")
    upstream = fake_upstream(status, 200)
    response = await h.layer(request, upstream)
    if retried:
        assert (response.status, upstream.calls) == (200, 2)
        assert request.retries[0].reason == str(status)
    else:
        assert (response.status, upstream.calls) == (status, 1)
        assert request.retries == []
        assert h.clock.sleeps == []


async def test_default_conditions_do_not_retry_plain_4xx() -> None:
    h = Harness()  # on: [connect-failure, reset, timeout, 502, 503, 504, 429]
    for status in (400, 401, 403, 404, 405, 409, 410, 422, 500):
        response, upstream = await h.run(status, 200)
        assert (response.status, upstream.calls) == (status, 1)
    for status in (429, 502, 503, 504):
        response, upstream = await h.run(status, 200)
        assert (response.status, upstream.calls) == (200, 2)


async def test_attempts_stop_at_max_attempts_and_the_last_response_is_returned() -> None:
    h = Harness(max_attempts=4, on=["5xx"])
    responses = [make_response(503, {"X-Seq": str(i)}) for i in range(1, 6)]
    request = h.request("GET")
    upstream = fake_upstream(*responses)
    response = await h.layer(request, upstream)
    assert upstream.calls == 4
    assert response is responses[3]
    assert len(request.retries) == 3
    assert [isinstance(r.body, TrackedBody) and r.body.released for r in responses] == [
        True,
        True,
        True,
        False,
        False,
    ]


async def test_max_attempts_one_never_retries() -> None:
    h = Harness(max_attempts=1, on=["5xx", "connect-failure"])
    response, upstream = await h.run(503, 200)
    assert (response.status, upstream.calls) == (503, 1)


async def test_last_failure_is_raised_when_attempts_run_out() -> None:
    h = Harness(max_attempts=3, on=["connect-failure"])
    upstream = fake_upstream(errors.ConnectFailure)
    with pytest.raises(errors.ConnectFailure) as raised:
        await h.layer(h.request("GET"), upstream)
    assert upstream.calls == 3
    assert raised.value is upstream.raised[-1]


async def test_attempts_are_counted_per_try() -> None:
    h = Harness(max_attempts=3, on=["5xx"])
    attempt = AttemptLayer(headers=h.settings.headers, base_dir=Path.cwd())
    upstream = fake_upstream(503, 503, 200)
    request = h.request("GET")
    response = await compose([h.layer, attempt], upstream)(request)
    assert response.status == 200
    assert request.attempts == 3 == upstream.calls


# --- method safety ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"])
async def test_safe_methods_are_retried(method: str) -> None:
    h = Harness(on=["503"])
    response, upstream = await h.run(503, 200, method=method)
    assert (response.status, upstream.calls) == (200, 2)


@pytest.mark.parametrize("method", ["POST", "PATCH"])
@pytest.mark.parametrize(
    "outcome", [503, 500, 429, errors.ConnectFailure, errors.ConnectionReset, errors.AttemptTimeout]
)
async def test_post_and_patch_without_key_are_sent_exactly_once(method: str, outcome: Script) -> None:
    h = Harness(on=["connect-failure", "reset", "timeout", "5xx", "429"], hint_header="X-Should-Retry")
    upstream = fake_upstream(outcome, 200)
    request = h.request(method, body=b'{"amount": 100}')
    if isinstance(outcome, int):
        response = await h.layer(request, upstream)
        assert response.status == outcome
    else:
        with pytest.raises(errors.OutriggerError):
            await h.layer(request, upstream)
    assert upstream.calls == 1
    assert upstream.attempts[0].body == b'{"amount": 100}'
    assert h.clock.sleeps == []


async def test_post_without_key_is_not_retried_even_when_the_hint_says_so() -> None:
    h = Harness(on=["5xx"], hint_header="X-Should-Retry")
    response, upstream = await h.run((503, {"X-Should-Retry": "true"}), 200, method="POST", body=b"x")
    assert (response.status, upstream.calls) == (503, 1)


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_post_and_patch_with_idempotency_key_are_retried(method: str) -> None:
    h = Harness(on=["503", "connect-failure"])
    upstream = fake_upstream(503, errors.ConnectFailure, 200)
    request = h.request(method, headers={"Idempotency-Key": "k-1"}, body=b"amount=100")
    response = await h.layer(request, upstream)
    assert (response.status, upstream.calls) == (200, 3)
    assert [a.headers["Idempotency-Key"] for a in upstream.attempts] == ["k-1"] * 3


@pytest.mark.parametrize("blank", ["", "  "])
async def test_a_blank_idempotency_key_does_not_make_a_post_retryable(blank: str) -> None:
    h = Harness(on=["503"])
    response, upstream = await h.run(503, 200, method="POST", headers={"Idempotency-Key": blank}, body=b"x")
    assert (response.status, upstream.calls) == (503, 1)


async def test_idempotency_key_header_name_comes_from_the_idempotency_settings() -> None:
    h = Harness(on=["503"], idempotency={"header": "X-Request-Key"})
    response, upstream = await h.run(503, 200, method="POST", headers={"x-request-key": "abc"}, body=b"x")
    assert (response.status, upstream.calls) == (200, 2)
    # The default header name no longer marks a request as safe to retry.
    response, upstream = await h.run(503, 200, method="POST", headers={"Idempotency-Key": "abc"}, body=b"x")
    assert (response.status, upstream.calls) == (503, 1)


async def test_custom_methods_list() -> None:
    h = Harness(on=["503"], methods=["GET"])
    response, upstream = await h.run(503, 200, method="DELETE")
    assert (response.status, upstream.calls) == (503, 1)
    response, upstream = await h.run(503, 200, method="GET")
    assert (response.status, upstream.calls) == (200, 2)


# --- backoff ------------------------------------------------------------------------------------


async def test_backoff_is_exponential_full_jitter_and_capped() -> None:
    h = Harness(max_attempts=6, on=["5xx"], backoff={"base": "100ms", "max": "500ms"}, fraction=0.5)
    request = h.request("GET")
    await h.layer(request, fake_upstream(503))
    ceilings = [0.1, 0.2, 0.4, 0.5, 0.5]
    assert [hi for _, hi in h.uniform.calls] == pytest.approx(ceilings)
    assert h.clock.sleeps == pytest.approx([c / 2 for c in ceilings])
    assert [r.delay for r in request.retries] == h.clock.sleeps
    assert all(0 <= d <= 0.5 for d in h.clock.sleeps)


async def test_backoff_with_maximal_jitter_never_exceeds_max() -> None:
    h = Harness(max_attempts=10, on=["5xx"], backoff={"base": "1s", "max": "3s"}, fraction=1.0)
    await h.layer(h.request("GET"), fake_upstream(503))
    assert h.clock.sleeps == pytest.approx([1, 2, 3, 3, 3, 3, 3, 3, 3])


async def test_retries_record_reason_and_delay() -> None:
    h = Harness(max_attempts=4, on=["503", "connect-failure", "timeout"], fraction=1.0)
    request = h.request("GET")
    await h.layer(request, fake_upstream(503, errors.ConnectFailure, errors.AttemptTimeout, 200))
    assert all(isinstance(r, RetryRecord) for r in request.retries)
    assert [r.reason for r in request.retries] == ["503", "connect-failure", "timeout"]
    assert [r.delay for r in request.retries] == pytest.approx([0.1, 0.2, 0.4])
    assert [r.delay for r in request.retries] == h.clock.sleeps


# --- retry at once (another key took over) -------------------------------------------------------


def _key_rests(step: int | tuple[int, dict[str, str]]) -> Any:
    """A fake attempt answering `step` that leaves ``retry_at_once`` set, as the key pool layer does."""

    async def attempt(request: ProxyRequest, next: Handler) -> ProxyResponse:
        response = await next(request)
        request.retry_at_once = response.status == 429
        return response

    return attempt


async def test_retry_at_once_skips_backoff_and_retry_after() -> None:
    h = Harness(on=["429"])
    request = h.request("GET")
    upstream = fake_upstream((429, {"Retry-After": "30"}), 429, 200)
    response = await compose([h.layer, _key_rests(429)], upstream)(request)
    assert response.status == 200
    assert upstream.calls == 3
    assert h.clock.sleeps == [0.0, 0.0]
    assert h.uniform.calls == []
    assert request.retries == [RetryRecord("429", 0.0), RetryRecord("429", 0.0)]


async def test_retry_at_once_still_needs_the_condition_attempts_and_budget() -> None:
    h = Harness(on=["503"])
    upstream = fake_upstream(429, 200)
    response = await compose([h.layer, _key_rests(429)], upstream)(h.request("GET"))
    assert response.status == 429  # 429 is not in `on`: no retry, however fast it could be
    assert upstream.calls == 1

    h = Harness(on=["429"], max_attempts=2)
    upstream = fake_upstream((429, {"Retry-After": "30"}))
    assert (await compose([h.layer, _key_rests(429)], upstream)(h.request("GET"))).status == 429
    assert upstream.calls == 2
    assert h.clock.sleeps == [0.0]  # at once, and then no attempt is left

    h = Harness(on=["429"], budget={"ratio": 0, "min_per_second": 0})
    upstream = fake_upstream(429, 200)
    assert (await compose([h.layer, _key_rests(429)], upstream)(h.request("GET"))).status == 429
    assert upstream.calls == 1


async def test_retry_at_once_is_reset_before_each_attempt() -> None:
    """An attempt that does not set it (a 503 after a 429) gets the normal backoff."""
    h = Harness(on=["429", "503"], fraction=0.5)
    request = h.request("GET")
    upstream = fake_upstream(429, (503, {"Retry-After": "3"}), 200)

    async def only_first(request: ProxyRequest, next: Handler) -> ProxyResponse:
        response = await next(request)
        if upstream.calls == 1:
            request.retry_at_once = True
        return response

    assert (await compose([h.layer, only_first], upstream)(request)).status == 200
    assert h.clock.sleeps == [0.0, 3.0]


# --- Retry-After ----------------------------------------------------------------------------------


async def test_retry_after_seconds_replace_the_backoff() -> None:
    h = Harness(on=["503"])
    request = h.request("GET")
    await h.layer(request, fake_upstream((503, {"Retry-After": "7"}), 200))
    assert h.clock.sleeps == [7.0]
    assert h.uniform.calls == []
    assert request.retries == [RetryRecord("503", 7.0)]


async def test_retry_after_http_date_uses_the_wall_clock() -> None:
    h = Harness(on=["429"])
    when = format_datetime(datetime.fromtimestamp(WALL_START + 30, tz=UTC), usegmt=True)
    response, upstream = await h.run((429, {"Retry-After": when}), 200)
    assert (response.status, upstream.calls) == (200, 2)
    assert h.clock.sleeps == [30.0]


async def test_retry_after_date_in_the_past_means_now() -> None:
    h = Harness(on=["503"])
    when = format_datetime(datetime.fromtimestamp(WALL_START - 3600, tz=UTC), usegmt=True)
    response, _ = await h.run((503, {"Retry-After": when}), 200)
    assert response.status == 200
    assert h.clock.sleeps == [0.0]


async def test_invalid_retry_after_falls_back_to_the_backoff() -> None:
    h = Harness(on=["503"], fraction=1.0)
    response, _ = await h.run((503, {"Retry-After": "soon"}), 200)
    assert response.status == 200
    assert h.clock.sleeps == pytest.approx([0.1])


# Regression: 'Retry-After: \u00b2' once raised ValueError out of the retry layer (fixed in 0382a82).
async def test_non_ascii_digit_retry_after_is_ignored() -> None:
    h = Harness(on=["503"], fraction=1.0)
    response, _ = await h.run((503, {"Retry-After": "\u00b2"}), 200)
    assert response.status == 200
    assert h.clock.sleeps == pytest.approx([0.1])


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_above_max_is_not_retried_and_the_response_passes_through(status: int) -> None:
    h = Harness(on=["429", "503"], retry_after={"honour": True, "max": "60s"})
    original = make_response(status, {"Retry-After": "61", "X-Upstream": "yes"}, b"slow down")
    request = h.request("GET")
    upstream = fake_upstream(original, 200)
    response = await h.layer(request, upstream)
    assert response is original
    assert upstream.calls == 1
    assert h.clock.sleeps == []
    assert await read_body(response) == b"slow down"
    assert isinstance(original.body, TrackedBody)
    assert not original.body.released


async def test_retry_after_equal_to_max_is_taken() -> None:
    h = Harness(on=["503"], retry_after={"max": "60s"})
    response, _ = await h.run((503, {"Retry-After": "60"}), 200)
    assert response.status == 200
    assert h.clock.sleeps == [60.0]


async def test_honour_off_uses_the_computed_delay() -> None:
    h = Harness(on=["503"], retry_after={"honour": False, "max": "1s"}, fraction=1.0)
    response, upstream = await h.run((503, {"Retry-After": "120"}), 200)
    assert (response.status, upstream.calls) == (200, 2)
    assert h.clock.sleeps == pytest.approx([0.1])
    assert len(h.uniform.calls) == 1


# --- hint header ----------------------------------------------------------------------------------


async def test_hint_true_allows_a_status_not_in_on() -> None:
    h = Harness(on=["503"], hint_header="Stripe-Should-Retry")
    request = h.request("GET")
    upstream = fake_upstream((400, {"Stripe-Should-Retry": "true"}), 200)
    response = await h.layer(request, upstream)
    assert (response.status, upstream.calls) == (200, 2)
    assert request.retries[0].reason == "hint"


async def test_hint_true_still_needs_a_safe_method_or_a_key() -> None:
    h = Harness(on=["503"], hint_header="Stripe-Should-Retry")
    hinted = (409, {"Stripe-Should-Retry": "true"})
    response, upstream = await h.run(hinted, 200, method="POST", body=b"a=1")
    assert (response.status, upstream.calls) == (409, 1)
    response, upstream = await h.run(
        hinted, 200, method="POST", body=b"a=1", headers={"Idempotency-Key": "k"}
    )
    assert (response.status, upstream.calls) == (200, 2)


async def test_hint_false_forbids_a_listed_status() -> None:
    h = Harness(on=["5xx"], hint_header="X-Should-Retry")
    response, upstream = await h.run((503, {"x-should-retry": " False "}), 200)
    assert (response.status, upstream.calls) == (503, 1)


async def test_hint_header_is_ignored_unless_configured() -> None:
    h = Harness(on=["503"])
    response, upstream = await h.run((400, {"Stripe-Should-Retry": "true"}), 200)
    assert (response.status, upstream.calls) == (400, 1)
    response, upstream = await h.run((503, {"Stripe-Should-Retry": "false"}), 200)
    assert (response.status, upstream.calls) == (200, 2)


# --- budget, deadline ----------------------------------------------------------------------------


async def test_budget_refusal_returns_the_last_response_at_once() -> None:
    # min_per_second 0.1 over a 10 s window and ratio 0: exactly one retry in the whole window.
    h = Harness(max_attempts=3, on=["503"], budget={"ratio": 0, "min_per_second": 0.1, "window": "10s"})
    first = [make_response(503, {"X-Seq": str(i)}, f"body {i}".encode()) for i in (1, 2, 3)]
    request = h.request("GET")
    upstream = fake_upstream(*first)
    response = await h.layer(request, upstream)
    assert upstream.calls == 2
    assert response is first[1]
    assert await read_body(response) == b"body 2"
    assert len(h.clock.sleeps) == 1
    # The next request finds the budget spent: one attempt, no sleep.
    response, upstream = await h.run(503, 200)
    assert (response.status, upstream.calls) == (503, 1)
    assert len(h.clock.sleeps) == 1


async def test_budget_refusal_raises_the_last_error() -> None:
    h = Harness(on=["connect-failure"], budget={"ratio": 0, "min_per_second": 0, "window": "10s"})
    upstream = fake_upstream(errors.ConnectFailure, 200)
    with pytest.raises(errors.ConnectFailure) as raised:
        await h.layer(h.request("GET"), upstream)
    assert raised.value is upstream.raised[0]
    assert upstream.calls == 1
    assert h.clock.sleeps == []


async def test_budget_counts_requests_and_retries() -> None:
    h = Harness(on=["503"], budget={"ratio": 0.5, "min_per_second": 0, "window": "10s"})
    assert h.budget is not None
    for _ in range(4):
        await h.run(200)
    _, upstream = await h.run(503, 503, 503)  # 5 requests -> 2.5 retries
    assert upstream.calls == 3
    assert h.budget.snapshot() == {"requests": 5, "retries": 2}


async def test_backoff_that_would_cross_the_deadline_is_not_taken() -> None:
    h = Harness(on=["503"], backoff={"base": "1s", "max": "1s"}, fraction=1.0)
    request = h.request("GET", deadline=h.clock.now() + 0.5)
    upstream = fake_upstream(503, 200)
    response = await h.layer(request, upstream)
    assert (response.status, upstream.calls) == (503, 1)
    assert h.clock.sleeps == []


async def test_retry_after_that_would_cross_the_deadline_is_not_taken() -> None:
    h = Harness(on=["503"])
    request = h.request("GET", deadline=h.clock.now() + 5)
    upstream = fake_upstream((503, {"Retry-After": "6"}), 200)
    response = await h.layer(request, upstream)
    assert (response.status, upstream.calls) == (503, 1)


async def test_backoff_within_the_deadline_is_taken() -> None:
    h = Harness(on=["503"], backoff={"base": "1s", "max": "1s"}, fraction=1.0)
    request = h.request("GET", deadline=h.clock.now() + 1.5)
    upstream = fake_upstream(503, 503, 200)
    response = await h.layer(request, upstream)
    # The first backoff (1 s) fits; the second would end at 2 s > 1.5 s.
    assert (response.status, upstream.calls) == (503, 2)
    assert h.clock.sleeps == [1.0]


# --- bodies -------------------------------------------------------------------------------------


@pytest.mark.parametrize("known_length", [True, False])
async def test_every_attempt_gets_the_full_buffered_body(known_length: bool) -> None:
    h = Harness(on=["503"], max_replay_bytes="1KiB")
    body = bytes(range(256)) * 3  # 768 bytes in 100-byte chunks
    request = h.request("PUT", body=body, chunk_size=100, known_length=known_length)
    upstream = fake_upstream(503, 503, 200)
    response = await h.layer(request, upstream)
    assert (response.status, upstream.calls) == (200, 3)
    assert [a.body for a in upstream.attempts] == [body] * 3


@pytest.mark.parametrize("known_length", [True, False])
@pytest.mark.parametrize("method", ["PUT", "POST"])
async def test_body_above_max_replay_bytes_is_sent_once_and_whole(method: str, known_length: bool) -> None:
    h = Harness(on=["503", "connect-failure"], max_replay_bytes="1KiB")
    body = b"0123456789abcdef" * 256  # 4 KiB
    request = h.request(
        method, body=body, chunk_size=300, known_length=known_length, headers={"Idempotency-Key": "k"}
    )
    upstream = fake_upstream(503, 200)
    response = await h.layer(request, upstream)
    assert (response.status, upstream.calls) == (503, 1)
    assert upstream.attempts[0].body == body
    assert h.clock.sleeps == []


async def test_body_above_max_replay_bytes_failure_is_raised_after_one_attempt() -> None:
    h = Harness(on=["connect-failure"], max_replay_bytes="10B")
    upstream = fake_upstream(errors.ConnectFailure, 200)
    with pytest.raises(errors.ConnectFailure):
        await h.layer(h.request("PUT", body=b"x" * 11, known_length=False), upstream)
    assert upstream.calls == 1
    assert upstream.attempts[0].body == b"x" * 11


async def test_body_exactly_max_replay_bytes_is_replayed() -> None:
    h = Harness(on=["503"], max_replay_bytes="10B")
    request = h.request("PUT", body=b"x" * 10, chunk_size=3, known_length=False)
    upstream = fake_upstream(503, 200)
    response = await h.layer(request, upstream)
    assert (response.status, upstream.calls) == (200, 2)
    assert [a.body for a in upstream.attempts] == [b"x" * 10] * 2


# ------------------------------------------------------ discarded responses settled before the backoff


class OrderClock(FakeClock):
    """A FakeClock that notes, at each sleep, whether the discarded response was already released."""

    def __init__(self, body: TrackedBody) -> None:
        super().__init__()
        self.body = body
        self.released_at_sleep: list[bool] = []

    async def sleep(self, seconds: float) -> None:
        self.released_at_sleep.append(self.body.released)
        await super().sleep(seconds)


async def test_retry_releases_a_small_discarded_response_before_the_backoff() -> None:
    first = TrackedBody(b"busy, come back later")
    clock = OrderClock(first)
    clock_as_protocol: Clock = clock
    settings = settings_from(retries={"on": [503]})
    assert settings.retries is not None
    layer = RetryLayer(settings.retries, settings.idempotency_header, None, clock_as_protocol)
    upstream_next = fake_upstream(
        ProxyResponse(503, CIMultiDict({"Retry-After": "1", "Content-Length": "21"}), first), 200
    )
    response = await layer(make_request("GET"), upstream_next)
    assert response.status == 200
    assert clock.sleeps == [1.0]
    assert clock.released_at_sleep == [True], "the 503's connection must be freed before sleeping"


async def test_settled_response_is_returned_when_the_retry_is_refused() -> None:
    """Settling reads the body early: that copy is what the app gets when the retry is refused."""
    first = TrackedBody(b"busy, come back later")
    clock = OrderClock(first)
    settings = settings_from(retries={"on": [503]})
    assert settings.retries is not None
    layer = RetryLayer(settings.retries, settings.idempotency_header, None, clock)
    refused = errors.CircuitOpen("circuit breaker for api.test is open")
    upstream_next = fake_upstream(ProxyResponse(503, CIMultiDict({"Retry-After": "1"}), first), refused)
    response = await layer(make_request("GET"), upstream_next)
    assert clock.released_at_sleep == [True]
    assert response.status == 503
    assert await read_body(response) == b"busy, come back later"


async def test_a_stalled_discarded_body_does_not_delay_the_retry() -> None:
    class Stalling:
        released = False

        async def chunks(self) -> AsyncIterator[bytes]:
            yield b"0123456789"
            await asyncio.sleep(30)

        def whole(self) -> bytes | None:
            return None

        def release(self) -> None:
            self.released = True

    body = Stalling()
    response = ProxyResponse(503, CIMultiDict({"Content-Length": "100", "Retry-After": "1"}), body)
    started = asyncio.get_running_loop().time()
    settled = await retry_module._settle(response)
    assert asyncio.get_running_loop().time() - started < 1.5
    assert body.released
    assert settled.status == 503
    assert settled.headers["Retry-After"] == "1"
    assert settled.headers["Content-Length"] == "0"
    assert b"".join([c async for c in settled.body.chunks()]) == b""
