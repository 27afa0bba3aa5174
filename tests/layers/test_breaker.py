"""Circuit breaker on a fake clock: every state transition, trial gating, and how retries stop.

The breaker counts attempts. Outcomes are decided by `failure_on`; a cancelled
attempt or an error kind not listed is neutral (neither resets nor counts).
Open means fail fast with `CircuitOpen` whose `retry_after` is the time left
until half-open; half-open admits `half_open_max` concurrent trials only.
"""

from __future__ import annotations

import asyncio

import pytest

from proxy import errors
from proxy.config.model import CircuitBreakerSettings
from proxy.exchange import ProxyRequest, ProxyResponse
from proxy.layers.breaker import CLOSED, HALF_OPEN, OPEN, BreakerLayer, CircuitBreaker
from proxy.layers.retry import RetryLayer
from proxy.pipeline import compose
from tests.fakes import (
    FakeClock,
    RecordingUniform,
    Script,
    TrackedBody,
    fake_upstream,
    make_request,
    settings_from,
)

RESET = 30.0


def _breaker(
    clock: FakeClock,
    *,
    threshold: int = 3,
    reset: float = RESET,
    half_open_max: int = 1,
    failure_on: tuple[str, ...] = ("connect-failure", "timeout", "5xx"),
) -> CircuitBreaker:
    settings = CircuitBreakerSettings(
        failure_threshold=threshold,
        reset_timeout=reset,
        half_open_max=half_open_max,
        failure_on=failure_on,
    )
    return CircuitBreaker("api.test", settings, clock)


async def _attempt(breaker: CircuitBreaker, *script: Script) -> ProxyResponse:
    """One attempt through the BreakerLayer with a fake `next` answering `script`."""
    return await BreakerLayer(breaker)(make_request(), fake_upstream(*script))


async def _outcome(breaker: CircuitBreaker, step: Script) -> ProxyResponse | BaseException:
    try:
        return await _attempt(breaker, step)
    except (errors.OutriggerError, asyncio.CancelledError) as exc:
        return exc


async def _trip(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.settings.failure_threshold):
        await _attempt(breaker, 503)
    assert breaker.state == OPEN


# --------------------------------------------------------------------------- closed -> open


FAILURES = [
    pytest.param(("5xx",), 503, id="5xx-503"),
    pytest.param(("5xx",), 500, id="5xx-500"),
    pytest.param(("5xx",), 599, id="5xx-599"),
    pytest.param(("429",), 429, id="exact-429"),
    pytest.param(("500-504",), 502, id="range-502"),
    pytest.param(("connect-failure",), errors.ConnectFailure, id="connect-failure"),
    pytest.param(("timeout",), errors.AttemptTimeout, id="timeout"),
    pytest.param(("reset",), errors.ConnectionReset, id="reset"),
]


@pytest.mark.parametrize(("failure_on", "step"), FAILURES)
async def test_opens_after_threshold_consecutive_failures(failure_on: tuple[str, ...], step: Script) -> None:
    clock = FakeClock()
    breaker = _breaker(clock, threshold=3, failure_on=failure_on)
    for count in (1, 2):
        await _outcome(breaker, step)
        assert breaker.state == CLOSED
        assert breaker.consecutive_failures == count
    await _outcome(breaker, step)
    assert breaker.state == OPEN
    assert breaker.is_open()
    upstream = fake_upstream(200)
    with pytest.raises(errors.CircuitOpen):
        await BreakerLayer(breaker)(make_request(), upstream)
    assert upstream.calls == 0, "an open breaker must not reach the upstream"


@pytest.mark.parametrize(
    ("failure_on", "step"),
    [
        pytest.param(("5xx",), 429, id="429-not-listed"),
        pytest.param(("5xx",), 404, id="404"),
        pytest.param(("429",), 503, id="503-not-listed"),
        pytest.param(("connect-failure", "5xx"), 200, id="200"),
    ],
)
async def test_unlisted_statuses_count_as_success_and_reset_the_count(
    failure_on: tuple[str, ...], step: int
) -> None:
    clock = FakeClock()
    breaker = _breaker(clock, threshold=3, failure_on=failure_on)
    failing = 503 if "5xx" in failure_on else 429
    await _attempt(breaker, failing)
    await _attempt(breaker, failing)
    assert breaker.consecutive_failures == 2
    response = await _attempt(breaker, step)
    assert response.status == step
    assert breaker.consecutive_failures == 0
    await _attempt(breaker, failing)
    await _attempt(breaker, failing)
    assert breaker.state == CLOSED, "the success reset the count: two more failures must not open it"
    await _attempt(breaker, failing)
    assert breaker.state == OPEN


async def test_success_in_between_resets_the_count() -> None:
    breaker = _breaker(FakeClock(), threshold=3)
    for step in (503, errors.ConnectFailure, 200, 503, errors.AttemptTimeout, 200, 500, 502):
        await _outcome(breaker, step)
    assert breaker.state == CLOSED
    assert breaker.consecutive_failures == 2


@pytest.mark.parametrize(
    "neutral",
    [
        pytest.param(asyncio.CancelledError, id="cancelled"),
        pytest.param(errors.ConnectionReset, id="reset-not-listed"),
        pytest.param(errors.RateLimited, id="rejected-below"),
        pytest.param(errors.ConnectFailure, id="connect-failure-not-listed"),
    ],
)
async def test_neutral_outcomes_neither_count_nor_reset(neutral: type[BaseException]) -> None:
    breaker = _breaker(FakeClock(), threshold=3, failure_on=("5xx",))
    await _attempt(breaker, 503)
    await _attempt(breaker, 503)
    transitions = breaker.transitions
    for _ in range(5):
        with pytest.raises(neutral):
            await _attempt(breaker, neutral)
    assert breaker.state == CLOSED
    assert breaker.consecutive_failures == 2, "a neutral outcome must not reset the count"
    assert breaker.transitions == transitions
    await _attempt(breaker, 503)
    assert breaker.state == OPEN, "the third real failure opens it: neutrals did not reset"


async def test_a_cancelled_attempt_in_flight_is_neutral() -> None:
    """A request cancelled while the upstream is still working (client gone, deadline) is not a failure."""
    breaker = _breaker(FakeClock(), threshold=1)
    gate = asyncio.Event()
    upstream = fake_upstream(503, gate=gate)
    task = asyncio.create_task(BreakerLayer(breaker)(make_request(), upstream))
    for _ in range(10):
        await asyncio.sleep(0)
    assert upstream.calls == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.state == CLOSED
    assert breaker.consecutive_failures == 0


async def test_the_tripping_response_is_returned_to_the_caller() -> None:
    breaker = _breaker(FakeClock(), threshold=2)
    await _attempt(breaker, 503)
    upstream = fake_upstream((503, {"X-From": "upstream"}, b"storm"))
    response = await BreakerLayer(breaker)(make_request(), upstream)
    assert breaker.state == OPEN
    assert response is upstream.responses[0]
    assert response.status == 503
    assert response.headers["X-From"] == "upstream"


async def test_the_tripping_error_is_re_raised_not_replaced() -> None:
    breaker = _breaker(FakeClock(), threshold=1)
    with pytest.raises(errors.ConnectFailure) as raised:
        await _attempt(breaker, errors.ConnectFailure)
    assert not isinstance(raised.value, errors.CircuitOpen)
    assert breaker.state == OPEN


# --------------------------------------------------------------------------- open


async def test_open_fails_fast_with_time_left_until_half_open() -> None:
    clock = FakeClock()
    breaker = _breaker(clock, threshold=2, reset=RESET)
    await _trip(breaker)
    upstream = fake_upstream(200)
    layer = BreakerLayer(breaker)
    with pytest.raises(errors.CircuitOpen) as first:
        await layer(make_request(), upstream)
    assert first.value.retry_after == pytest.approx(RESET)
    clock.advance(12.5)
    with pytest.raises(errors.CircuitOpen) as later:
        await layer(make_request(), upstream)
    assert later.value.retry_after == pytest.approx(RESET - 12.5)
    assert later.value.headers()["Retry-After"] == "18"
    assert later.value.status == 503
    assert later.value.error_type == "circuit_open"
    clock.advance(RESET - 12.5 - 0.001)
    with pytest.raises(errors.CircuitOpen) as last:
        await layer(make_request(), upstream)
    assert last.value.retry_after == pytest.approx(0.001)
    assert last.value.headers()["Retry-After"] == "1"
    assert upstream.calls == 0
    assert breaker.state == OPEN


async def test_open_to_half_open_after_reset_timeout_then_a_successful_trial_closes() -> None:
    clock = FakeClock()
    breaker = _breaker(clock, threshold=2, reset=RESET)
    await _trip(breaker)
    clock.advance(RESET)
    upstream = fake_upstream(200)
    states: list[str] = []

    async def observe(request: ProxyRequest) -> ProxyResponse:
        states.append(breaker.state)
        return await upstream(request)

    response = await BreakerLayer(breaker)(make_request(), observe)
    assert response.status == 200
    assert states == [HALF_OPEN], "the trial runs in half-open"
    assert breaker.state == CLOSED
    assert breaker.consecutive_failures == 0
    # closed again: the full threshold is needed to re-open
    await _attempt(breaker, 503)
    assert breaker.state == CLOSED


async def test_failed_trial_reopens_and_restarts_the_timer() -> None:
    clock = FakeClock()
    breaker = _breaker(clock, threshold=2, reset=RESET)
    await _trip(breaker)
    clock.advance(RESET + 5)
    response = await _attempt(breaker, 503)
    assert response.status == 503, "the failed trial's response still goes back"
    assert breaker.state == OPEN
    assert breaker.seconds_until_half_open() == pytest.approx(RESET)
    clock.advance(RESET - 1)
    with pytest.raises(errors.CircuitOpen) as raised:
        await _attempt(breaker, 200)
    assert raised.value.retry_after == pytest.approx(1)
    clock.advance(1)
    assert (await _attempt(breaker, 200)).status == 200
    assert breaker.state == CLOSED


@pytest.mark.parametrize("error", [errors.ConnectFailure, errors.AttemptTimeout])
async def test_failed_trial_by_error_reopens(error: type[errors.OutriggerError]) -> None:
    clock = FakeClock()
    breaker = _breaker(clock, threshold=1)
    with pytest.raises(error):
        await _attempt(breaker, error)
    clock.advance(RESET)
    with pytest.raises(error):
        await _attempt(breaker, error)
    assert breaker.state == OPEN
    assert breaker.seconds_until_half_open() == pytest.approx(RESET)


@pytest.mark.parametrize("half_open_max", [1, 2, 5])
async def test_half_open_admits_exactly_half_open_max_concurrent_trials(half_open_max: int) -> None:
    clock = FakeClock()
    breaker = _breaker(clock, threshold=1, half_open_max=half_open_max)
    await _trip(breaker)
    clock.advance(RESET)
    gate = asyncio.Event()
    upstream = fake_upstream(200, gate=gate)
    layer = BreakerLayer(breaker)
    tasks = [asyncio.create_task(layer(make_request(), upstream)) for _ in range(20)]
    for _ in range(20):
        await asyncio.sleep(0)
    rejected = [t for t in tasks if t.done()]
    assert upstream.calls == half_open_max
    assert len(rejected) == 20 - half_open_max
    for task in rejected:
        exc = task.exception()
        assert isinstance(exc, errors.CircuitOpen)
        assert exc.retry_after is not None
        assert exc.retry_after > 0
    assert breaker.state == HALF_OPEN
    gate.set()
    admitted = await asyncio.gather(*(t for t in tasks if t not in rejected))
    assert [r.status for r in admitted] == [200] * half_open_max
    assert breaker.state == CLOSED
    assert upstream.calls == half_open_max


async def test_a_cancelled_trial_frees_its_slot_and_stays_half_open() -> None:
    clock = FakeClock()
    breaker = _breaker(clock, threshold=1)
    await _trip(breaker)
    clock.advance(RESET)
    gate = asyncio.Event()
    upstream = fake_upstream(200, gate=gate)
    trial = asyncio.create_task(BreakerLayer(breaker)(make_request(), upstream))
    for _ in range(5):
        await asyncio.sleep(0)
    with pytest.raises(errors.CircuitOpen):
        await _attempt(breaker, 200)
    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial
    assert breaker.state == HALF_OPEN
    response = await _attempt(breaker, 200)
    assert response.status == 200
    assert breaker.state == CLOSED


async def test_transitions_are_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    breaker = _breaker(clock, threshold=1)
    caplog.set_level("WARNING", logger="outrigger.breaker")
    await _attempt(breaker, 503)  # closed -> open
    clock.advance(RESET)
    await _attempt(breaker, 503)  # open -> half-open -> open
    clock.advance(RESET)
    await _attempt(breaker, 200)  # open -> half-open -> closed
    assert breaker.transitions == 5
    messages = [r.getMessage() for r in caplog.records if r.name == "outrigger.breaker"]
    assert messages == [
        "circuit breaker api.test: closed -> open",
        "circuit breaker api.test: open -> half-open",
        "circuit breaker api.test: half-open -> open",
        "circuit breaker api.test: open -> half-open",
        "circuit breaker api.test: half-open -> closed",
    ]


async def test_snapshot() -> None:
    clock = FakeClock()
    breaker = _breaker(clock, threshold=3, reset=10)
    assert breaker.snapshot() == {
        "scope": "local",
        "state": CLOSED,
        "consecutive_failures": 0,
        "transitions": 0,
        "seconds_until_half_open": 0,
    }
    await _attempt(breaker, 503)
    await _attempt(breaker, 503)
    assert breaker.snapshot() == {
        "scope": "local",
        "state": CLOSED,
        "consecutive_failures": 2,
        "transitions": 0,
        "seconds_until_half_open": 0,
    }
    await _attempt(breaker, 503)
    clock.advance(2.25)
    snapshot = breaker.snapshot()
    assert snapshot["state"] == OPEN
    assert snapshot["seconds_until_half_open"] == pytest.approx(7.75)
    clock.advance(8)
    assert breaker.snapshot()["seconds_until_half_open"] == 0


# --------------------------------------------------------------------------- retry + breaker


def _retry_over_breaker(
    breaker: CircuitBreaker, clock: FakeClock, *, max_attempts: int = 5, wired: bool = True
) -> RetryLayer:
    retries = settings_from(retries={"max_attempts": max_attempts, "on": ["503", "connect-failure"]}).retries
    assert retries is not None
    return RetryLayer(
        retries,
        "Idempotency-Key",
        None,
        clock,
        circuit_open=breaker.is_open if wired else None,
        uniform=RecordingUniform(0.0),
    )


async def test_retries_stop_as_soon_as_the_breaker_opens_and_the_tripping_response_goes_back() -> None:
    clock = FakeClock()
    breaker = _breaker(clock, threshold=3, failure_on=("5xx",))
    upstream = fake_upstream((503, {"X-Attempt": "1"}), (503, {"X-Attempt": "2"}), (503, {"X-Attempt": "3"}))
    handler = compose([_retry_over_breaker(breaker, clock), BreakerLayer(breaker)], upstream)
    response = await handler(make_request())
    assert upstream.calls == 3, "the third failure opened the breaker: no fourth attempt"
    assert response.status == 503
    assert response.headers["X-Attempt"] == "3", "the tripping response itself, not circuit_open"
    assert response is upstream.responses[-1]
    assert breaker.state == OPEN


async def test_retries_stop_on_an_opening_connect_failure_and_raise_it() -> None:
    clock = FakeClock()
    breaker = _breaker(clock, threshold=2)
    upstream = fake_upstream(errors.ConnectFailure)
    handler = compose([_retry_over_breaker(breaker, clock), BreakerLayer(breaker)], upstream)
    with pytest.raises(errors.ConnectFailure):
        await handler(make_request())
    assert upstream.calls == 2
    assert len(clock.sleeps) == 1


class _TripDuringBackoff(FakeClock):
    """A clock whose first sleep lets "other requests" open the breaker (a concurrent storm)."""

    def __init__(self) -> None:
        super().__init__()
        self.breaker: CircuitBreaker | None = None

    async def sleep(self, seconds: float) -> None:
        await super().sleep(seconds)
        breaker = self.breaker
        assert breaker is not None
        while breaker.state != OPEN:
            breaker.finish(breaker.admit(), True)


async def test_a_retry_refused_by_an_open_breaker_returns_the_previous_upstream_response() -> None:
    clock = _TripDuringBackoff()
    breaker = clock.breaker = _breaker(clock, threshold=3)
    upstream = fake_upstream((503, {"X-Attempt": "1"}, b"first"), 200)
    handler = compose([_retry_over_breaker(breaker, clock), BreakerLayer(breaker)], upstream)
    response = await handler(make_request())
    assert upstream.calls == 1, "the retry was refused by the breaker, not sent"
    assert response.status == 503
    assert response.headers["X-Attempt"] == "1"
    assert b"".join([chunk async for chunk in response.body.chunks()]) == b"first"
    first = upstream.responses[0].body
    assert isinstance(first, TrackedBody)
    assert first.released, "the small body was read and its connection freed before the backoff"


async def test_a_retry_refused_on_the_first_attempt_raises_circuit_open() -> None:
    clock = FakeClock()
    breaker = _breaker(clock, threshold=1)
    await _trip(breaker)
    upstream = fake_upstream(200)
    handler = compose([_retry_over_breaker(breaker, clock), BreakerLayer(breaker)], upstream)
    with pytest.raises(errors.CircuitOpen):
        await handler(make_request())
    assert upstream.calls == 0


async def test_without_the_wiring_retries_would_hit_the_open_breaker() -> None:
    """Control: unwired, the retry reaches the open breaker and the previous response stands."""
    clock = FakeClock()
    breaker = _breaker(clock, threshold=2)
    upstream = fake_upstream((503, {"X-Attempt": "1"}), (503, {"X-Attempt": "2"}), 200)
    handler = compose([_retry_over_breaker(breaker, clock, wired=False), BreakerLayer(breaker)], upstream)
    response = await handler(make_request())
    assert upstream.calls == 2
    assert response.headers["X-Attempt"] == "2"
    assert len(clock.sleeps) == 2, "unwired it slept once more before being refused"
