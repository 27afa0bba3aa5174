"""Exponential backoff with full jitter: exact with an injected random source, always within bounds."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.layers.backoff import DEFAULT_UNIFORM, full_jitter
from tests.fakes import RecordingUniform


def test_ceiling_doubles_from_base_until_max() -> None:
    uniform = RecordingUniform(fraction=1.0)
    delays = [full_jitter(n, 0.1, 1.0, uniform) for n in range(1, 7)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert [lo for lo, _ in uniform.calls] == [0.0] * 6
    assert [hi for _, hi in uniform.calls] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


def test_full_jitter_draws_from_zero_to_the_ceiling() -> None:
    assert full_jitter(3, 0.5, 10.0, RecordingUniform(fraction=0.0)) == 0.0
    assert full_jitter(3, 0.5, 10.0, RecordingUniform(fraction=0.25)) == pytest.approx(0.5)
    assert full_jitter(3, 0.5, 10.0, RecordingUniform(fraction=1.0)) == pytest.approx(2.0)


def test_huge_retry_numbers_do_not_overflow() -> None:
    assert full_jitter(10_000, 0.1, 10.0, RecordingUniform(fraction=1.0)) == 10.0


@settings(max_examples=300, deadline=None)
@given(
    retry=st.integers(min_value=1, max_value=200),
    base=st.floats(min_value=0.001, max_value=10.0),
    extra=st.floats(min_value=0.0, max_value=100.0),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_delay_within_zero_and_capped_exponential(retry: int, base: float, extra: float, seed: int) -> None:
    cap = base + extra  # the config guarantees base <= max
    delay = full_jitter(retry, base, cap, random.Random(seed).uniform)
    assert 0.0 <= delay <= min(cap, base * 2.0 ** min(retry - 1, 1000))


@settings(max_examples=200, deadline=None)
@given(retry=st.integers(min_value=1, max_value=64), base=st.floats(min_value=0.001, max_value=5.0))
def test_default_random_source_is_within_bounds(retry: int, base: float) -> None:
    cap = base * 8
    delay = full_jitter(retry, base, cap, DEFAULT_UNIFORM)
    assert 0.0 <= delay <= min(cap, base * 2.0 ** (retry - 1))


def test_default_random_source_actually_jitters() -> None:
    delays = {full_jitter(5, 0.1, 10.0, DEFAULT_UNIFORM) for _ in range(50)}
    assert len(delays) > 40
    assert all(0.0 <= d <= 1.6 for d in delays)
