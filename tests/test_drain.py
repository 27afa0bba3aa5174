"""The drain_idle key and the drain's idle clock (DrainTracker), on an injected clock: no sleeping."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from proxy.config.loader import ConfigError, load_config
from proxy.reload import _check_restart_only
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
