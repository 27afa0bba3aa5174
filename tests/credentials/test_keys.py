"""KeyPool on a FakeClock: strategies, per-key cooldown and provider pause, waiting when every key
rests, and per-key state carried over a reload (a rotated key starts afresh, the others keep theirs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict

from proxy import errors
from proxy.config import defaults
from proxy.config.model import KeyPoolSettings, Policy, PolicySettings
from proxy.credentials import KeyPool
from proxy.pipeline import PolicyState
from tests.fakes import FakeClock

NO_HEADERS: CIMultiDict[str] = CIMultiDict()
MAX_PAUSE = defaults.RATE_LIMIT_MAX_PAUSE_S


def _pool(clock: FakeClock, values: list[str] | None = None, **settings: Any) -> KeyPool:
    values = values or ["key-a", "key-b", "key-c"]
    parsed = KeyPoolSettings.model_validate({"values": values, **settings})
    return KeyPool("api.test", parsed, values, clock)


async def _picks(pool: KeyPool, count: int) -> list[int]:
    return [await pool.acquire(0.0, None) for _ in range(count)]


async def test_round_robin_takes_each_key_in_turn() -> None:
    pool = _pool(FakeClock())
    assert await _picks(pool, 7) == [0, 1, 2, 0, 1, 2, 0]
    assert pool.header == "Authorization"
    assert [pool.header_value(i) for i in range(3)] == ["Bearer key-a", "Bearer key-b", "Bearer key-c"]


async def test_format_and_header_are_the_configured_ones() -> None:
    pool = _pool(FakeClock(), header="X-Api-Key", format="{key}")
    assert (pool.header, pool.header_value(1)) == ("X-Api-Key", "key-b")


async def test_least_used_evens_out_usage_after_a_rest() -> None:
    clock = FakeClock()
    pool = _pool(clock, strategy="least_used")
    assert await _picks(pool, 3) == [0, 1, 2]
    pool.observe(0, 429, CIMultiDict({"Retry-After": "10"}), MAX_PAUSE)
    assert await _picks(pool, 4) == [1, 2, 1, 2]
    clock.advance(10)
    assert await _picks(pool, 3) == [0, 0, 0]  # key 0 has catching up to do


async def test_a_cooldown_status_rests_that_key_for_retry_after_only() -> None:
    clock = FakeClock()
    pool = _pool(clock)
    assert pool.observe(0, 429, CIMultiDict({"Retry-After": "2"}), MAX_PAUSE) is True
    assert await _picks(pool, 4) == [1, 2, 1, 2]
    assert pool.counts() == {"ready": 2, "resting": 1}
    clock.advance(2)
    assert pool.counts() == {"ready": 3, "resting": 0}
    assert 0 in await _picks(pool, 3)


@pytest.mark.parametrize(
    ("status", "headers", "rest"),
    [
        (429, {"RateLimit-Reset": "7"}, 7.0),
        (401, {}, defaults.KEY_COOLDOWN_S),
        (429, {}, defaults.KEY_COOLDOWN_S),
        (401, {"Retry-After": "4"}, 4.0),
        (429, {"Retry-After": "100000"}, MAX_PAUSE),
    ],
)
async def test_cooldown_length(status: int, headers: dict[str, str], rest: float) -> None:
    clock = FakeClock()
    pool = _pool(clock)
    assert pool.observe(1, status, CIMultiDict(headers), MAX_PAUSE) is True
    assert pool.snapshot()[1]["rest_seconds"] == rest
    assert pool.snapshot()[1]["reason"] == f"answered {status}"


async def test_a_provider_pause_on_a_success_rests_the_key_without_cooldown() -> None:
    clock = FakeClock()
    pool = _pool(clock)
    headers = CIMultiDict({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "5"})
    assert pool.observe(2, 200, headers, MAX_PAUSE) is False
    assert pool.snapshot()[2]["state"] == "resting"
    assert pool.snapshot()[2]["rest_seconds"] == 5.0
    assert pool.observe(2, 200, NO_HEADERS, MAX_PAUSE) is False


async def test_statuses_outside_cooldown_on_do_not_rest() -> None:
    pool = _pool(FakeClock(), cooldown_on=[429])
    assert pool.observe(0, 401, NO_HEADERS, MAX_PAUSE) is False
    assert pool.observe(0, 503, NO_HEADERS, MAX_PAUSE) is False
    assert pool.counts() == {"ready": 3, "resting": 0}


async def test_when_every_key_rests_an_attempt_waits_for_the_first_within_max_wait() -> None:
    clock = FakeClock()
    pool = _pool(clock, values=["a", "b"])
    pool.observe(0, 429, CIMultiDict({"Retry-After": "3"}), MAX_PAUSE)
    pool.observe(1, 429, CIMultiDict({"Retry-After": "1"}), MAX_PAUSE)
    assert await pool.acquire(max_wait=2.0, deadline=None) == 1
    assert clock.sleeps == [1.0]


async def test_when_every_key_rests_too_long_the_attempt_is_rate_limited() -> None:
    clock = FakeClock()
    pool = _pool(clock, values=["a", "b"])
    pool.observe(0, 429, CIMultiDict({"Retry-After": "3"}), MAX_PAUSE)
    pool.observe(1, 429, CIMultiDict({"Retry-After": "5"}), MAX_PAUSE)
    with pytest.raises(errors.RateLimited) as raised:
        await pool.acquire(max_wait=2.0, deadline=None)
    assert raised.value.retry_after == 3.0  # the earliest key back
    assert "key-" not in raised.value.message
    assert "'a'" not in raised.value.message
    assert clock.sleeps == []


async def test_the_wait_never_passes_the_request_deadline() -> None:
    clock = FakeClock()
    pool = _pool(clock, values=["a"])
    pool.observe(0, 429, CIMultiDict({"Retry-After": "2"}), MAX_PAUSE)
    with pytest.raises(errors.RateLimited):
        await pool.acquire(max_wait=10.0, deadline=clock.now() + 1.0)
    assert clock.sleeps == []


async def test_snapshot_names_keys_by_index_never_value() -> None:
    pool = _pool(FakeClock(), values=["sk-live-AAA", "sk-live-BBB"])
    await _picks(pool, 3)
    pool.observe(1, 429, CIMultiDict({"Retry-After": "9"}), MAX_PAUSE)
    snapshot = pool.snapshot()
    assert snapshot == [
        {"index": 0, "state": "ready", "rest_seconds": 0.0, "reason": None, "uses": 2},
        {"index": 1, "state": "resting", "rest_seconds": 9.0, "reason": "answered 429", "uses": 1},
    ]
    assert "sk-live" not in repr(snapshot)


def _policy_with_keys(directory: Path) -> Policy:
    settings = PolicySettings.model_validate(
        {"credentials": {"keys": {"values": ["${file:key-a}", "${file:key-b}"], "strategy": "least_used"}}}
    )
    return Policy(hosts=("api.test",), upstream=None, listen=None, settings=settings, routes=(), source="t:1")


async def test_a_reload_keeps_each_unchanged_key_and_renews_a_rotated_one(tmp_path: Path) -> None:
    (tmp_path / "key-a").write_text("AAA\n")
    (tmp_path / "key-b").write_text("BBB\n")
    clock = FakeClock()
    policy = _policy_with_keys(tmp_path)
    state = PolicyState.build(policy, clock, None, tmp_path)
    pool = state.key_pool
    assert pool is not None
    assert pool.header_value(0) == "Bearer AAA"
    for _ in range(4):
        await pool.acquire(0.0, None)
    pool.observe(0, 429, CIMultiDict({"Retry-After": "30"}), MAX_PAUSE)
    pool.observe(1, 429, CIMultiDict({"Retry-After": "20"}), MAX_PAUSE)

    same = PolicyState.build(policy, clock, (policy, state), tmp_path).key_pool
    assert same is not None
    assert same.snapshot() == pool.snapshot()

    (tmp_path / "key-b").write_text("BBB-rotated\n")
    rotated = PolicyState.build(policy, clock, (policy, state), tmp_path).key_pool
    assert rotated is not None
    assert rotated.header_value(1) == "Bearer BBB-rotated"
    key_a, key_b = rotated.snapshot()
    assert key_a == pool.snapshot()[0]  # still resting, same usage
    assert key_b["state"] == "ready"  # the new key owes nothing to the old one's cooldown
    assert key_b["uses"] == key_a["uses"]  # level with the others, so least_used does not flood it
