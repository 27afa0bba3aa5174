"""Fuzz of proxy/config/loader.py: any YAML text or structure either loads, or fails with a
ConfigError whose every problem is one line ``FILE:LINE: key.path: message`` naming a file that
was read — never a traceback or another exception.

Structures are built from the real key names (so validation goes deep) with values of every
YAML type, unit-like strings included; text is arbitrary. Bounded: MAX_EXAMPLES per test.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.config.loader import ConfigError, load_config

MAX_EXAMPLES = 300
FUZZ = settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KEYS = [
    # main config
    "listen", "admin", "host", "port", "policy_dirs", "unknown_hosts", "defaults", "limits",
    "max_header_bytes", "max_headers", "header_timeout", "drain_timeout", "drain_idle", "telemetry",
    "service_name", "traces", "endpoint", "sample_ratio", "access_log", "reload_poll_interval",
    # policies
    "hosts", "upstream", "tls", "verify", "ca_file", "sni", "allow_private_addresses", "connect",
    "timeouts", "per_try", "total", "idle", "stream", "retries", "max_attempts", "on", "methods",
    "backoff", "base", "max", "retry_after", "honour", "hint_header", "budget", "ratio",
    "min_per_second", "window", "max_replay_bytes", "circuit_breaker", "failure_threshold",
    "reset_timeout", "half_open_max", "failure_on", "concurrency", "max_in_flight", "max_queued",
    "queue_timeout", "rate_limit", "rate", "per", "burst", "max_wait", "adaptive", "idempotency",
    "header", "replay", "ttl", "max_entries", "max_body_bytes", "headers", "set", "remove", "routes",
    "match", "method", "path", "cache", "stale_if_error", "fallback", "status", "body", "failover",
    "upstreams", "url", "faults", "abort", "percent", "delay", "duration", "header_only",
]  # fmt: skip
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        ["10ms", "2s", "1m", "0s", "-1s", "1MiB", "1KiB", "10XB", "100", "5xx", "500-504", "GET", "POST",
         "https://api.example.com", "http://127.0.0.1:9", "*.example.com", "example.com", "${env:HOME}",
         "${file:/nonexistent}", "deny", "allow", "tunnel", "~", "", " ", "1e400", "0x10"]
    ),
    st.text(max_size=20),
)  # fmt: skip
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner, max_size=5),
    ),
    max_leaves=25,
)
MAIN = st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6)
POLICY = st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=8)


def _check(main_text: str, policy_text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "policies").mkdir()
        config = root / "config.yaml"
        config.write_text(main_text, encoding="utf-8")
        (root / "policies" / "fuzz.yaml").write_text(policy_text, encoding="utf-8")
        try:
            load_config(config)
        except ConfigError as error:
            problems = error.problems
        else:
            return
        assert problems, "a ConfigError must name at least one problem"
    files = "|".join(re.escape(str(path.resolve())) for path in (config, root / "policies" / "fuzz.yaml"))
    line = re.compile(rf"^(?:{files}):[1-9]\d*: (?:\(top level\)|[^\n]+?): [^\n]*\S[^\n]*$")
    for problem in problems:
        assert line.match(problem), problem


def _dump(data: Any) -> str:
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


@FUZZ
@given(main=MAIN, policies=st.one_of(POLICY, st.lists(POLICY, max_size=3), VALUES))
@example(main={}, policies={"hosts": ["a.example"], "x\ny: z": 1})  # was: a key's newline split the line
@example(main={}, policies={"hosts": ["a.example"], "": 1, " ": {"on": 2}})
def test_any_structure_loads_or_fails_with_located_problems(main: dict[str, Any], policies: Any) -> None:
    main = {**main, "policy_dirs": ["policies/"]} if "policy_dirs" not in main else main
    _check(_dump(main), _dump(policies))


@FUZZ
@given(main_text=st.text(max_size=200), policy_text=st.text(max_size=200))
@example(main_text="policy_dirs: [policies/]\n", policy_text="- hosts: [a.example]\n  *x\n")
@example(main_text="a: &x 1\nb: *y\n", policy_text="")
@example(main_text="", policy_text="\x1f")  # was: yaml.reader.ReaderError escaped the loader
def test_any_text_loads_or_fails_with_located_problems(main_text: str, policy_text: str) -> None:
    _check(main_text, policy_text)
