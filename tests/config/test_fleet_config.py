"""The main config's ``fleet`` section and the ``scope`` of rate limits and breakers (SPEC 12)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config.lint import lint
from tests.config.test_loader import Tree, at


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return Tree(tmp_path.resolve())


POLICY = """\
hosts: [api.stripe.com]
upstream: https://api.stripe.com
rate_limit:
  rate: 100
  scope: fleet
circuit_breaker:
  scope: fleet
"""


def test_a_fleet_section_loads_with_its_defaults(tree: Tree) -> None:
    tree.main("fleet:\n  redis: redis://redis.outrigger:6379/0\n")
    tree.policy("a.yaml", POLICY)
    config = tree.load()
    fleet = config.main.fleet
    assert fleet is not None
    assert (fleet.redis, fleet.key_prefix, fleet.timeout) == (
        "redis://redis.outrigger:6379/0",
        "outrigger",
        0.05,
    )
    settings = config.policies[0].settings
    assert settings.rate_limit is not None
    assert settings.rate_limit.scope == "fleet"
    assert settings.circuit_breaker is not None
    assert settings.circuit_breaker.scope == "fleet"


def test_without_a_fleet_section_everything_is_local(tree: Tree) -> None:
    tree.main()
    tree.policy("a.yaml", "hosts: [a.example]\nupstream: https://a.example\nrate_limit: {rate: 5}\n")
    config = tree.load()
    assert config.main.fleet is None
    limit = config.policies[0].settings.rate_limit
    assert limit is not None
    assert limit.scope == "local"


def test_scope_fleet_without_a_fleet_section_is_refused_at_its_line(tree: Tree) -> None:
    tree.main()
    path = tree.policy("a.yaml", POLICY)
    message = "scope: fleet needs a fleet section (fleet.redis) in the main config"
    assert tree.problems() == at(
        path, (5, f"rate_limit.scope: {message}"), (7, f"circuit_breaker.scope: {message}")
    )


def test_bad_fleet_sections_are_reported_with_file_line_and_key(tree: Tree) -> None:
    path = tree.main(
        """\
        fleet:
          redis: http://redis.outrigger:6379
          key_prefix: "a {b}"
          timeout: 0s
          pool: 4
        """
    )
    assert tree.problems() == at(
        path,
        (5, "fleet.redis: redis 'http://redis.outrigger:6379' must be a redis://, rediss:// or unix:// URL"),
        (
            6,
            "fleet.key_prefix: key_prefix must be a non-empty word without spaces or braces"
            " (braces pick Redis slots)",
        ),
        (7, "fleet.timeout: Input should be greater than 0"),
        (8, "fleet.pool: unknown key"),
    )


def test_an_unknown_scope_is_refused(tree: Tree) -> None:
    tree.main("fleet: {redis: 'redis://127.0.0.1:6379/0'}\n")
    path = tree.policy(
        "a.yaml", "hosts: [a.example]\nupstream: https://a.example\nrate_limit: {scope: global}\n"
    )
    assert tree.problems() == at(path, (3, "rate_limit.scope: Input should be 'local' or 'fleet'"))


def test_a_redis_password_reference_must_resolve_at_load(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLEET_REDIS_PASSWORD", raising=False)
    path = tree.main("fleet:\n  redis: 'redis://:${env:FLEET_REDIS_PASSWORD}@redis:6379/0'\n")
    assert tree.problems() == at(
        path, (5, "fleet.redis: environment variable FLEET_REDIS_PASSWORD is not set")
    )
    monkeypatch.setenv("FLEET_REDIS_PASSWORD", "s3cret")
    fleet = tree.load().main.fleet
    assert fleet is not None
    assert fleet.redis == "redis://:${env:FLEET_REDIS_PASSWORD}@redis:6379/0", "kept as written"


def test_lint_warns_of_an_inline_redis_password_only(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    tree.main("fleet:\n  redis: 'redis://:s3cret@redis:6379/0'\n")
    warnings = lint(tree.load())
    assert len(warnings) == 1
    assert warnings[0].startswith(f"{tree.config}:4: fleet.redis: warning: Redis password written inline")
    monkeypatch.setenv("FLEET_REDIS_PASSWORD", "s3cret")
    tree.main("fleet:\n  redis: 'redis://:${env:FLEET_REDIS_PASSWORD}@redis:6379/0'\n")
    assert lint(tree.load()) == []
