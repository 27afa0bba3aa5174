"""The `cache` section everywhere config shows: loader errors, lint, schema, explain, /config."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.cli import main, policy_file_schema
from proxy.config.lint import lint
from proxy.config.loader import ConfigError, load_config
from proxy.explain import explain
from tests.conftest import write_config


def write(tmp_path: Path, policy_text: str) -> tuple[Path, Path]:
    (tmp_path / "policies").mkdir(exist_ok=True)
    policy = tmp_path / "policies" / "a.yaml"
    policy.write_text(textwrap.dedent(policy_text))
    config = tmp_path / "config.yaml"
    config.write_text("listen: {host: 127.0.0.1, port: 15101}\nadmin: {host: 127.0.0.1, port: 15100}\n")
    return config, policy


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ("  ttl: -1s\n", (3, "cache.ttl: invalid duration")),
        ("  max_entries: 0\n", (3, "cache.max_entries: Input should be greater than or equal to 1")),
        ("  max_bytes: 1MiB\n  max_entry_bytes: 2MiB\n", (2, "cache: max_entry_bytes (2097152) is larger")),
        ("  key_headers: [Bad Header]\n", (3, "cache.key_headers[0]: invalid header name")),
        ("  stale_if_errors: 1m\n", (3, "cache.stale_if_errors: unknown key")),
    ],
)
def test_bad_cache_settings_are_errors_with_file_line_and_key(
    tmp_path: Path, section: str, problem: tuple[int, str]
) -> None:
    config, policy = write(tmp_path, "hosts: [a.example.com]\ncache:\n" + section)
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    line, message = problem
    assert len(caught.value.problems) == 1, caught.value.problems
    assert caught.value.problems[0].startswith(f"{policy}:{line}: {message}"), caught.value.problems


def test_a_cache_in_defaults_merges_into_policies_key_by_key(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        [{"hosts": ["a.example.com"], "cache": {"ttl": "5m"}}, {"hosts": ["b.example.com"], "cache": None}],
        defaults={"cache": {"max_entries": 50}},
    )
    a, b = load_config(path).policies
    assert a.settings.cache is not None
    assert (a.settings.cache.ttl, a.settings.cache.max_entries) == (300, 50)
    assert b.settings.cache is None


def _lint(tmp_path: Path, **policy: Any) -> list[str]:
    return lint(load_config(write_config(tmp_path, [{"hosts": ["api.example.com"], **policy}])))


def test_lint_warns_when_the_apps_credentials_are_not_in_the_cache_key(tmp_path: Path) -> None:
    warnings = _lint(tmp_path, cache={"key_headers": ["X-Tenant"]})
    assert len(warnings) == 1
    assert ": cache.key_headers: warning: " in warnings[0]
    assert "served to another" in warnings[0]


@pytest.mark.parametrize(
    "policy",
    [
        {"cache": {}},  # key_headers defaults to [Authorization]
        {"cache": {"key_headers": ["authorization"]}},
        {"cache": {"key_headers": []}, "headers": {"set": {"Authorization": "Bearer ${env:HOME}"}}},
        {"cache": {"key_headers": []}, "headers": {"remove": ["Authorization"]}},
        {},
    ],
)
def test_no_cache_warning_when_credentials_are_keyed_or_outriggers_own(
    tmp_path: Path, policy: dict[str, Any]
) -> None:
    assert _lint(tmp_path, **policy) == []


def test_schema_describes_the_cache_section() -> None:
    schema = json.dumps(policy_file_schema())
    for key in ("honour_cache_control", "stale_if_error", "max_entry_bytes", "key_headers"):
        assert key in schema


def test_explain_shows_the_merged_cache_section(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, [{"hosts": ["api.example.com"], "cache": {"ttl": "2m"}}]))
    report = yaml.safe_load(explain(config, "GET", "http://api.example.com/v1/x"))
    assert report["settings"]["cache"]["ttl"] == "2m"
    assert report["settings"]["cache"]["key_headers"] == ["Authorization"]


def test_check_prints_the_cache_lint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, [{"hosts": ["api.example.com"], "cache": {"key_headers": []}}])
    assert main(["check", "--strict", "-c", str(path)]) == 1
    assert "cache.key_headers: warning:" in capsys.readouterr().out
