"""Reload building blocks without a network: state carry-over per section, restart-only keys,
and the content fingerprint the watcher polls."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from opentelemetry import trace

from proxy.config.loader import ConfigError, current_fingerprint, load_config
from proxy.config.model import Policy, PolicySettings, UpstreamTarget
from proxy.pipeline import PolicyState
from proxy.reload import RESTART_ONLY, _check_restart_only
from proxy.server import Runtime
from proxy.transport import UpstreamClient
from tests.conftest import free_port, write_ca_file_config, write_config
from tests.fakes import FakeClock

HOST = "api.test"
TRACER = trace.NoOpTracer()

STATEFUL: dict[str, dict[str, Any]] = {
    "retries": {"max_attempts": 2, "budget": {"ratio": 0.5, "min_per_second": 1, "window": "10s"}},
    "idempotency": {"replay": {"ttl": "1h", "max_entries": 100}},
    "circuit_breaker": {"failure_threshold": 3, "reset_timeout": "30s"},
    "concurrency": {"max_in_flight": 5, "max_queued": 5},
    "rate_limit": {"rate": 10, "per": "1s", "burst": 10},
}
"""One policy with every stateful section."""

CHANGED: dict[str, tuple[str, dict[str, Any]]] = {
    # state attribute -> (section, a changed value of that section)
    "budget": (
        "retries",
        {"max_attempts": 2, "budget": {"ratio": 0.1, "min_per_second": 1, "window": "10s"}},
    ),
    "replay": ("idempotency", {"replay": {"ttl": "2h", "max_entries": 100}}),
    "breaker": ("circuit_breaker", {"failure_threshold": 4, "reset_timeout": "30s"}),
    "bulkhead": ("concurrency", {"max_in_flight": 6, "max_queued": 5}),
    "limiter": ("rate_limit", {"rate": 20, "per": "1s", "burst": 10}),
}
ATTRIBUTES = tuple(CHANGED)


def _policy(**sections: Any) -> dict[str, Any]:
    return {"hosts": [HOST], "upstream": "https://api.test", **STATEFUL, **sections}


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamClient]:
    client = UpstreamClient()
    yield client
    await client.close()


def _runtime(
    tmp_path: Path, upstream: UpstreamClient, policy: dict[str, Any], previous: Runtime | None = None
) -> Runtime:
    (tmp_path / "policies").mkdir(exist_ok=True)
    (tmp_path / "policies" / "test.yaml").write_text(yaml.safe_dump([policy]))
    if not (tmp_path / "config.yaml").exists():
        write_config(tmp_path, [policy])
    return Runtime.build(load_config(tmp_path / "config.yaml"), upstream, TRACER, previous)


async def test_every_piece_of_state_carries_over_when_nothing_stateful_changed(
    tmp_path: Path, upstream: UpstreamClient
) -> None:
    first = _runtime(tmp_path, upstream, _policy())
    second = _runtime(
        tmp_path,
        upstream,
        _policy(headers={"set": {"X-New": "1"}}, timeouts={"total": "20s"}),
        previous=first,
    )
    assert second.config.version != first.config.version
    before, after = first.pipelines.states[HOST], second.pipelines.states[HOST]
    for attribute in ATTRIBUTES:
        assert getattr(before, attribute) is not None, attribute
        assert getattr(after, attribute) is getattr(before, attribute), attribute


@pytest.mark.parametrize("attribute", ATTRIBUTES)
async def test_only_the_changed_section_gets_fresh_state(
    tmp_path: Path, upstream: UpstreamClient, attribute: str
) -> None:
    section, value = CHANGED[attribute]
    first = _runtime(tmp_path, upstream, _policy())
    second = _runtime(tmp_path, upstream, _policy(**{section: value}), previous=first)
    before, after = first.pipelines.states[HOST], second.pipelines.states[HOST]
    assert getattr(after, attribute) is not None
    assert getattr(after, attribute) is not getattr(before, attribute)
    for other in ATTRIBUTES:
        if other != attribute:
            assert getattr(after, other) is getattr(before, other), other


async def test_a_removed_section_drops_its_state(tmp_path: Path, upstream: UpstreamClient) -> None:
    first = _runtime(tmp_path, upstream, _policy())
    policy = _policy()
    del policy["circuit_breaker"]
    second = _runtime(tmp_path, upstream, policy, previous=first)
    assert second.pipelines.states[HOST].breaker is None
    assert second.pipelines.states[HOST].limiter is first.pipelines.states[HOST].limiter


async def test_state_follows_the_policy_not_its_position(tmp_path: Path, upstream: UpstreamClient) -> None:
    other = {"hosts": ["other.test"], "upstream": "https://other.test", **STATEFUL}
    first = _runtime(tmp_path, upstream, _policy())
    (tmp_path / "policies" / "test.yaml").write_text(yaml.safe_dump([other, _policy()]))
    second = Runtime.build(load_config(tmp_path / "config.yaml"), upstream, TRACER, first)
    assert second.pipelines.states[HOST].breaker is first.pipelines.states[HOST].breaker
    assert second.pipelines.states["other.test"].breaker is not first.pipelines.states[HOST].breaker


# --------------------------------------------------------------------------- restart-only keys


def _restart_value(key: str) -> Any:
    return {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "admin": {"host": "127.0.0.1", "port": free_port()},
        "limits": {"max_headers": 50},
        "drain_timeout": "3s",
        "drain_idle": "1s",
        "telemetry": {"access_log": False},
        "data_dir": "elsewhere",
        "fleet": {"redis": "redis://127.0.0.1:6379/0"},
    }[key]


@pytest.mark.parametrize("key", RESTART_ONLY)
def test_restart_only_keys_are_refused_with_a_clear_message(tmp_path: Path, key: str) -> None:
    path = write_config(tmp_path, [])
    current = load_config(path)
    settings = yaml.safe_load(path.read_text())
    settings[key] = _restart_value(key)
    path.write_text(yaml.safe_dump(settings))
    new = load_config(path)

    with pytest.raises(ConfigError) as raised:
        _check_restart_only(current, new)

    assert str(raised.value) == f"{path}: {key} changed: restart Outrigger to apply (not reloadable)"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("unknown_hosts", "allow"),
        ("defaults", {"timeouts": {"total": "50s"}}),
        ("reload_poll_interval", "1s"),
    ],
)
def test_other_main_keys_are_reloadable(tmp_path: Path, key: str, value: Any) -> None:
    path = write_config(tmp_path, [])
    current = load_config(path)
    settings = yaml.safe_load(path.read_text())
    settings[key] = value
    path.write_text(yaml.safe_dump(settings))
    _check_restart_only(current, load_config(path))  # no error


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_equals_the_version_until_a_watched_file_changes(tmp_path: Path) -> None:
    (tmp_path / "token.txt").write_text("one")
    policy = {"hosts": [HOST], "headers": {"set": {"Authorization": "Bearer ${file:token.txt}"}}}
    config = load_config(write_config(tmp_path, [policy]))
    assert current_fingerprint(config) == config.version

    (tmp_path / "policies" / ".test.yaml.swp").write_text("editor junk")
    (tmp_path / "policies" / "notes.txt").write_text("not a policy")
    assert current_fingerprint(config) == config.version  # ignored files do not count

    (tmp_path / "token.txt").write_text("two")
    rotated = current_fingerprint(config)
    assert rotated != config.version

    (tmp_path / "policies" / "more.yaml").write_text(yaml.safe_dump({"hosts": ["more.test"]}))
    added = current_fingerprint(config)
    assert added not in (config.version, rotated)
    assert load_config(config.path).version == added


def test_fingerprint_changes_when_a_configmap_data_symlink_is_swapped(tmp_path: Path) -> None:
    main = {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "admin": {"host": "127.0.0.1", "port": free_port()},
    }
    for version, host in (("..2026_01_01", "one.test"), ("..2026_01_02", "two.test")):
        (tmp_path / version / "policies").mkdir(parents=True)
        (tmp_path / version / "config.yaml").write_text(yaml.safe_dump(main))
        (tmp_path / version / "policies" / "test.yaml").write_text(yaml.safe_dump({"hosts": [host]}))
    os.symlink("..2026_01_01", tmp_path / "..data")
    os.symlink("..data/config.yaml", tmp_path / "config.yaml")
    os.symlink("..data/policies", tmp_path / "policies")
    config = load_config(tmp_path / "config.yaml")
    assert config.policies[0].hosts == ("one.test",)

    os.symlink("..2026_01_02", tmp_path / "..data_tmp")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert current_fingerprint(config) != config.version
    shutil.rmtree(tmp_path / "..2026_01_01")
    assert load_config(config.path).policies[0].hosts == ("two.test",)


def test_tls_ca_file_is_watched_and_versions_the_config(tmp_path: Path) -> None:
    path, ca_file = write_ca_file_config(tmp_path)
    config = load_config(path)
    assert ca_file.resolve() in {f.resolve() for f in config.files}
    trustme.CA().cert_pem.write_to_path(str(ca_file))  # a rotated CA
    assert current_fingerprint(config) != config.version
    assert load_config(path).version != config.version


# --------------------------------------------------------------------------- breaker carry-over


def _policy_model(upstream_url: str, **settings: Any) -> Policy:
    scheme, _, rest = upstream_url.partition("://")
    host, _, port = rest.partition(":")
    assert scheme in ("http", "https")
    return Policy(
        hosts=("api.test",),
        upstream=UpstreamTarget(scheme="https" if scheme == "https" else "http", host=host, port=int(port)),
        listen=None,
        settings=PolicySettings.model_validate(settings),
        routes=(),
        source="test:1",
    )


def test_breaker_carries_over_only_while_upstream_and_tls_are_unchanged() -> None:
    clock = FakeClock()
    breaker = {"failure_threshold": 3}
    first = _policy_model("https://a.test:443", circuit_breaker=breaker)
    state = PolicyState.build(first, clock)
    assert state.breaker is not None

    same = PolicyState.build(
        _policy_model("https://a.test:443", circuit_breaker=breaker), clock, (first, state)
    )
    assert same.breaker is state.breaker

    moved = PolicyState.build(
        _policy_model("https://b.test:443", circuit_breaker=breaker), clock, (first, state)
    )
    assert moved.breaker is not None
    assert moved.breaker is not state.breaker

    new_tls = _policy_model("https://a.test:443", circuit_breaker=breaker, tls={"sni": "other.test"})
    retls = PolicyState.build(new_tls, clock, (first, state))
    assert retls.breaker is not None
    assert retls.breaker is not state.breaker
