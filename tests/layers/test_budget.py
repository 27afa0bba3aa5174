"""Retry budget (Linkerd semantics) on a fake clock: ratio, allowance, sliding window, invariant."""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config.model import RetryBudgetSettings
from proxy.layers.budget import RetryBudget
from proxy.layers.retry import RetryLayer
from tests.fakes import FakeClock, RecordingUniform, fake_upstream, make_request, settings_from


def _budget(ratio: float, min_per_second: float, window: float, clock: FakeClock) -> RetryBudget:
    return RetryBudget(RetryBudgetSettings(ratio=ratio, min_per_second=min_per_second, window=window), clock)


def _withdraw_all(budget: RetryBudget, limit: int = 10_000) -> int:
    granted = 0
    while granted < limit and budget.try_withdraw():
        granted += 1
    return granted


def test_min_per_second_allowance_without_any_request() -> None:
    budget = _budget(ratio=0.2, min_per_second=1, window=10, clock=FakeClock())
    assert _withdraw_all(budget) == 10


def test_ratio_of_requests_on_top_of_the_allowance() -> None:
    budget = _budget(ratio=0.2, min_per_second=0, window=10, clock=FakeClock())
    for _ in range(50):
        budget.record_request()
    assert _withdraw_all(budget) == 10
    assert budget.snapshot() == {"requests": 50, "retries": 10}
    budget.record_request()  # 51 * 0.2 = 10.2: still no room for an 11th
    assert not budget.try_withdraw()
    for _ in range(4):
        budget.record_request()  # 55 * 0.2 = 11
    assert budget.try_withdraw()
    assert not budget.try_withdraw()


def test_zero_budget_refuses_every_retry() -> None:
    budget = _budget(ratio=0, min_per_second=0, window=10, clock=FakeClock())
    for _ in range(100):
        budget.record_request()
    assert not budget.try_withdraw()


def test_window_slides_old_requests_stop_counting() -> None:
    clock = FakeClock()
    budget = _budget(ratio=0.5, min_per_second=0, window=10, clock=clock)
    for _ in range(20):
        budget.record_request()
    clock.advance(10.5)  # every slot of those requests has left the window
    assert budget.snapshot() == {"requests": 0, "retries": 0}
    assert not budget.try_withdraw()


def test_window_slides_old_retries_stop_counting() -> None:
    clock = FakeClock()
    budget = _budget(ratio=0, min_per_second=0.5, window=10, clock=clock)
    assert _withdraw_all(budget) == 5
    clock.advance(5)
    assert not budget.try_withdraw(), "half a window later the old retries still count"
    clock.advance(5.5)
    assert _withdraw_all(budget) == 5


def test_requests_inside_the_window_keep_counting() -> None:
    clock = FakeClock()
    budget = _budget(ratio=1, min_per_second=0, window=10, clock=clock)
    for _ in range(4):
        budget.record_request()
    clock.advance(8)
    assert budget.snapshot()["requests"] == 4
    assert _withdraw_all(budget) == 4


def _worst_window(events: list[tuple[float, bool]], window: float) -> float:
    """Max over retries at time t of: retries in [t - 0.9 window, t] - ratio-free slack, as
    (retries_short - 0.2 * requests_in_window); the budget promises this is <= the allowance."""
    request_times = sorted(t for t, is_retry in events if not is_retry)
    retry_times = sorted(t for t, is_retry in events if is_retry)
    worst = float("-inf")
    for t in retry_times:
        retries_short = bisect_right(retry_times, t) - bisect_left(retry_times, t - 0.9 * window)
        requests = bisect_right(request_times, t) - bisect_right(request_times, t - window)
        worst = max(worst, retries_short - 0.2 * requests)
    return worst


async def test_steady_failing_load_stays_within_ratio_measured() -> None:
    """100 requests/s for 60 s against an always-503 upstream, max_attempts 3, ratio 0.2."""
    clock = FakeClock()
    settings = settings_from(
        retries={
            "max_attempts": 3,
            "on": ["5xx"],
            "backoff": {"base": "1ms", "max": "1ms"},
            "budget": {"ratio": 0.2, "min_per_second": 1, "window": "10s"},
        }
    )
    assert settings.retries is not None
    assert settings.retries.budget is not None
    budget = RetryBudget(settings.retries.budget, clock)
    layer = RetryLayer(settings.retries, "Idempotency-Key", budget, clock, uniform=RecordingUniform(0.0))
    upstream = fake_upstream(503)
    events: list[tuple[float, bool]] = []
    requests = 6000
    for _ in range(requests):
        request = make_request("GET", settings=settings)
        response = await layer(request, upstream)
        assert response.status == 503
        events.append((clock.now(), False))
        events.extend((clock.now(), True) for _ in request.retries)
        clock.advance(0.01)
    retries = upstream.calls - requests
    ratio = retries / requests
    allowance = 1 * 10 / (100 * 10)  # min_per_second * window over the requests of one window
    assert 0.15 < ratio <= 0.2 + allowance, f"measured retries/requests = {ratio:.4f}"
    assert _worst_window(events, 10.0) <= 1 * 10 + 1e-9


@dataclass
class _Step:
    advance_ms: int
    action: str  # "request" | "retry"


_STEPS = st.lists(
    st.builds(
        _Step,
        advance_ms=st.integers(min_value=0, max_value=3_000),
        action=st.sampled_from(["request", "request", "retry", "retry", "retry"]),
    ),
    max_size=300,
)


@settings(max_examples=200, deadline=None)
@given(
    steps=_STEPS,
    ratio=st.sampled_from([0.0, 0.1, 0.2, 0.5, 1.0, 2.0]),
    min_per_second=st.sampled_from([0.0, 0.1, 1.0, 3.0]),
)
def test_budget_invariant_under_random_sequences(
    steps: list[_Step], ratio: float, min_per_second: float
) -> None:
    """At every granted retry: retries in the last 0.9 window <= ratio * requests in the last window
    + min_per_second * window (the ten slots cover between 0.9 and 1 window).

    Times are whole milliseconds so slot boundaries are exact.
    """
    window_ms = 10_000
    clock = FakeClock(now=0.0)
    budget = _budget(ratio, min_per_second, window_ms / 1000, clock)
    now_ms = 0
    requests: list[int] = []
    retries: list[int] = []
    for step in steps:
        now_ms += step.advance_ms
        clock.set(now_ms / 1000)
        if step.action == "request":
            budget.record_request()
            requests.append(now_ms)
            continue
        recent_retries = sum(1 for t in retries if t > now_ms - window_ms)
        if budget.try_withdraw():
            retries.append(now_ms)
            in_short_window = sum(1 for t in retries if t >= now_ms - window_ms * 9 // 10)
            in_window = sum(1 for t in requests if t > now_ms - window_ms)
            assert in_short_window <= ratio * in_window + min_per_second * window_ms / 1000
        else:
            # Refusing is only allowed when the budget really is spent.
            live_requests = sum(1 for t in requests if t >= now_ms - window_ms * 9 // 10)
            assert recent_retries + 1 > ratio * live_requests + min_per_second * window_ms / 1000
