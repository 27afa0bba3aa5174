"""The drain_idle key and the drain's idle clock (DrainTracker), on an injected clock: no sleeping."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from proxy.config.loader import ConfigError, load_config
from proxy.reload import _check_restart_only
from proxy.server.lifecycle import DrainTracker
from tests.conftest import write_config


def test_drain_idle_defaults_to_5s_and_takes_a_duration(tmp_path: Path) -> None:
    assert load_config(write_config(tmp_path, [])).main.drain_idle == 5.0
    assert load_config(write_config(tmp_path, [], drain_idle="500ms")).main.drain_idle == 0.5


def test_drain_idle_is_restart_only_like_drain_timeout(tmp_path: Path) -> None:
    path = write_config(tmp_path, [])
    current = load_config(path)
    settings = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**settings, "drain_idle": "1s"}))
    with pytest.raises(ConfigError, match="drain_idle changed: restart Outrigger"):
        _check_restart_only(current, load_config(path))


class FakeTime:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_with_no_traffic_the_drain_ends_drain_idle_after_it_began() -> None:
    time = FakeTime()
    tracker = DrainTracker(idle=5, timeout=20, now=time)
    assert tracker.verdict(in_flight=0) == (None, 5)
    time.t += 4.5
    assert tracker.verdict(in_flight=0) == (None, 0.5)
    time.t += 0.5
    assert tracker.verdict(in_flight=0) == ("idle", 0)


def test_a_request_in_flight_holds_the_drain_open() -> None:
    time = FakeTime()
    tracker = DrainTracker(idle=5, timeout=20, now=time)
    time.t += 6
    assert tracker.verdict(in_flight=1) == (None, 5), "earliest end: idle after the request ends"


def test_each_arrival_or_end_restarts_the_quiet_period() -> None:
    time = FakeTime()
    tracker = DrainTracker(idle=5, timeout=20, now=time)
    time.t += 4
    tracker.active()  # a request arrives
    time.t += 2
    tracker.active()  # and ends
    time.t += 4
    assert tracker.verdict(in_flight=0) == (None, 1)
    time.t += 1
    assert tracker.verdict(in_flight=0) == ("idle", 0)


def test_drain_timeout_caps_the_drain_whatever_is_in_flight() -> None:
    time = FakeTime()
    tracker = DrainTracker(idle=5, timeout=8, now=time)
    time.t += 6
    tracker.active()
    assert tracker.verdict(in_flight=0) == (None, 2), "sleep only until the deadline"
    time.t += 2
    assert tracker.verdict(in_flight=3) == ("timeout", 0)
    assert tracker.verdict(in_flight=0) == ("timeout", 0)


def test_a_zero_drain_idle_ends_as_soon_as_nothing_is_in_flight() -> None:
    time = FakeTime()
    tracker = DrainTracker(idle=0, timeout=8, now=time)
    assert tracker.verdict(in_flight=1) == (None, 0)
    assert tracker.verdict(in_flight=0) == ("idle", 0)
