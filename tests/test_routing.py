"""Host -> policy: exact beats wildcard, longest wildcard suffix wins, dedicated ports, fallback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace

from proxy.config.loader import Config, load_config
from proxy.config.model import Policy
from proxy.pipeline import Pipelines
from proxy.routing import UNKNOWN_POLICY_NAME, HostMatch, Router, dedicated_upstream, upstream_for
from proxy.transport import UpstreamClient
from tests.conftest import loopback_policy, write_config


def build(tmp_path: Path, policies: list[dict[str, Any]], **main: Any) -> tuple[Config, Router]:
    config = load_config(write_config(tmp_path, policies, **main))
    return config, Router(config)


def named(router: Router, host: str) -> str | None:
    policy = router.policy_for_host(host)
    return None if policy is None else policy.name


@pytest.fixture
def router(tmp_path: Path) -> Router:
    _, router = build(
        tmp_path,
        [
            # deliberately listed shortest-suffix first and wildcard before exact
            {"hosts": ["*.example.com"]},
            {"hosts": ["*.eu.example.com"]},
            {"hosts": ["api.eu.example.com", "*.api.eu.example.com"]},
            {"hosts": ["*.other.test", "exact.example.com"]},
            {"hosts": ["10.1.2.3"], "allow_private_addresses": True},
        ],
    )
    return router


@pytest.mark.parametrize(
    ("host", "policy"),
    [
        ("exact.example.com", "*.other.test"),  # exact name beats the *.example.com wildcard
        ("api.eu.example.com", "api.eu.example.com"),  # exact beats *.eu.example.com
        ("a.example.com", "*.example.com"),
        ("a.b.example.com", "*.example.com"),  # a wildcard covers any depth
        ("x.eu.example.com", "*.eu.example.com"),  # longest suffix wins over *.example.com
        ("x.y.eu.example.com", "*.eu.example.com"),
        ("v1.api.eu.example.com", "api.eu.example.com"),  # *.api.eu.example.com is longer still
        ("deep.v1.api.eu.example.com", "api.eu.example.com"),
        ("x.us.example.com", "*.example.com"),
        ("a.other.test", "*.other.test"),
        ("10.1.2.3", "10.1.2.3"),
    ],
)
def test_exact_and_longest_wildcard(router: Router, host: str, policy: str) -> None:
    assert named(router, host) == policy


@pytest.mark.parametrize(
    ("host", "pattern"),
    [
        ("exact.example.com", "exact.example.com"),
        ("EXACT.example.com.", "exact.example.com"),
        ("x.eu.example.com", "*.eu.example.com"),
        ("v1.api.eu.example.com", "*.api.eu.example.com"),  # the longest of the policy's wildcards
        ("a.example.com.", "*.example.com"),
    ],
)
def test_match_host_names_the_pattern_that_won(router: Router, host: str, pattern: str) -> None:
    match = router.match_host(host)
    assert match is not None
    assert match.pattern == pattern
    assert match.policy is router.policy_for_host(host)


@pytest.mark.parametrize(
    "host",
    [
        "example.com",  # *.example.com does not cover the apex
        "eu.example.com.evil.test",
        "badexample.com",  # a suffix match must start at a label boundary
        "other.test",
        "example.org",
        "10.1.2.4",
        "",
    ],
)
def test_hosts_without_a_policy_are_denied(router: Router, host: str) -> None:
    assert router.policy_for_host(host) is None
    assert router.fallback is None


def test_eu_example_com_itself_falls_to_the_shorter_wildcard(router: Router) -> None:
    # *.eu.example.com does not match eu.example.com, but *.example.com does
    assert named(router, "eu.example.com") == "*.example.com"


@pytest.mark.parametrize(
    ("host", "policy"),
    [
        ("API.EU.Example.COM", "api.eu.example.com"),
        ("api.eu.example.com.", "api.eu.example.com"),
        ("API.EU.EXAMPLE.COM.", "api.eu.example.com"),
        ("Foo.Example.Com.", "*.example.com"),
        ("X.EU.EXAMPLE.COM", "*.eu.example.com"),
    ],
)
def test_host_names_are_case_insensitive_and_ignore_a_trailing_dot(
    router: Router, host: str, policy: str
) -> None:
    assert named(router, host) == policy


def test_config_host_names_are_normalised_too(tmp_path: Path) -> None:
    _, router = build(tmp_path, [{"hosts": ["API.Example.COM."]}, {"hosts": ["*.Svc.Example.COM"]}])
    assert named(router, "api.example.com") == "api.example.com"
    assert named(router, "a.svc.example.com") == "*.svc.example.com"


def test_unknown_hosts_allow_gives_the_fallback_policy_with_defaults(tmp_path: Path) -> None:
    config, router = build(
        tmp_path,
        [{"hosts": ["api.example.com"], "timeouts": {"total": "5s", "per_try": "5s"}}],
        unknown_hosts="allow",
        defaults={"timeouts": {"total": "12s"}, "headers": {"set": {"User-Agent": "outrigger"}}},
    )
    fallback = router.policy_for_host("unknown.example.org")
    assert fallback is not None
    assert fallback is router.fallback
    assert fallback.name == UNKNOWN_POLICY_NAME == "(unknown)"
    assert fallback.upstream is None
    assert fallback.listen is None
    assert fallback.routes == ()
    assert fallback.settings == config.main.defaults
    assert fallback.settings.timeouts.total == 12.0
    assert fallback.settings.headers.set == {"User-Agent": "outrigger"}
    assert "unknown_hosts: allow" in fallback.source
    assert router.match_host("unknown.example.org") == HostMatch(fallback, None)
    # a host with a policy still gets that policy (with defaults merged under it)
    known = router.policy_for_host("api.example.com")
    assert known is not None
    assert known is not fallback
    assert known.settings.timeouts.total == 5.0
    assert known.settings.headers.set == {"User-Agent": "outrigger"}


def test_unknown_hosts_deny_gives_none(tmp_path: Path) -> None:
    _, router = build(tmp_path, [{"hosts": ["api.example.com"]}], unknown_hosts="deny")
    assert router.fallback is None
    assert router.policy_for_host("unknown.example.org") is None
    assert named(router, "api.example.com") == "api.example.com"


def test_policy_for_port(tmp_path: Path) -> None:
    _, router = build(
        tmp_path,
        [
            {"hosts": ["a.example.com"], "listen": 9101},
            {"hosts": ["b.example.com"], "listen": 9102, "upstream": "http://127.0.0.1:8080"},
            {"hosts": ["c.example.com"]},
        ],
    )
    a, b = router.policy_for_port(9101), router.policy_for_port(9102)
    assert a is not None
    assert a.name == "a.example.com"
    assert b is not None
    assert b.name == "b.example.com"
    assert router.policy_for_port(9103) is None
    ports = router.ports
    assert ports == {9101: a, 9102: b}
    ports.clear()  # a copy: the router keeps its own map
    assert router.policy_for_port(9101) is a


def test_a_policy_with_a_dedicated_port_is_also_reachable_by_host(tmp_path: Path) -> None:
    _, router = build(tmp_path, [{"hosts": ["a.example.com"], "listen": 9101}])
    assert router.policy_for_host("a.example.com") is router.policy_for_port(9101)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"hosts": ["a.example.com", "*.example.com"]}, "https://a.example.com"),
        ({"hosts": ["*.example.com"], "upstream": "http://127.0.0.1:8080"}, "http://127.0.0.1:8080"),
    ],
)
def test_dedicated_upstream_is_the_upstream_else_the_first_host(
    tmp_path: Path, fields: dict[str, Any], expected: str
) -> None:
    _, router = build(tmp_path, [{**fields, "listen": 9101}])
    policy = router.policy_for_port(9101)
    assert policy is not None
    assert str(dedicated_upstream(policy)) == expected


# --- upstream_for ---------------------------------------------------------------------------------


def _policy(tmp_path: Path, **fields: Any) -> Policy:
    config, _ = build(tmp_path, [{"hosts": ["api.example.com"], **fields}])
    return config.policies[0]


@pytest.mark.parametrize("port", [None, 80, 443, 8443])
def test_policy_upstream_wins(tmp_path: Path, port: int | None) -> None:
    policy = _policy(tmp_path, upstream="http://10.0.0.5:8080")
    upstream = upstream_for(policy, "api.example.com", port)
    assert (upstream.scheme, upstream.host, upstream.port) == ("http", "10.0.0.5", 8080)
    assert str(upstream) == "http://10.0.0.5:8080"


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        ("api.example.com", None, "https://api.example.com"),
        ("api.example.com", 80, "https://api.example.com"),  # the app's plain-HTTP port
        ("api.example.com", 443, "https://api.example.com"),
        ("api.example.com", 8443, "https://api.example.com:8443"),
        ("api.example.com", 8080, "https://api.example.com:8080"),
        ("a.b.example.com", None, "https://a.b.example.com"),
    ],
)
def test_without_an_upstream_https_to_the_requested_host(
    tmp_path: Path, host: str, port: int | None, expected: str
) -> None:
    upstream = upstream_for(_policy(tmp_path), host, port)
    assert upstream.scheme == "https"
    assert upstream.host == host
    assert upstream.port == (443 if port in (None, 80) else port)
    assert str(upstream) == expected


# --- the unknown-hosts fallback shares no state ----------------------------------------------------


async def test_unknown_hosts_fallback_has_no_breaker_limiter_bulkhead_or_replay(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        [loopback_policy("http://127.0.0.1:9")],
        unknown_hosts="allow",
        defaults={
            "circuit_breaker": {"failure_threshold": 1},
            "concurrency": {"max_in_flight": 1},
            "rate_limit": {"rate": 10},
            "idempotency": {"replay": {"ttl": "1m"}},
            "retries": {"on": [503]},
        },
    )
    config = load_config(path)
    router = Router(config)
    assert router.fallback is not None
    client = UpstreamClient()
    try:
        pipelines = Pipelines(config, router, client, trace.NoOpTracer())
    finally:
        await client.close()
    fallback = pipelines.states[router.fallback.name]
    assert fallback.breaker is None
    assert fallback.limiter is None
    assert fallback.bulkhead is None
    assert fallback.replay is None
    assert fallback.budget is not None, "the retry budget stays shared"
    known = pipelines.states["upstream.test"]
    assert known.breaker is not None
    assert known.limiter is not None
    assert known.bulkhead is not None


# --------------------------------------------------------------------------- ports and the suffix index


@pytest.mark.parametrize(
    ("host", "port", "pattern"),
    [
        ("api.test", None, "api.test"),
        ("api.test", 80, "api.test"),
        ("api.test", 443, "api.test"),
        ("api.test", 8443, "api.test:8443"),
        ("api.test", 9000, None),
        ("a.svc.test", 443, "*.svc.test"),
        ("a.svc.test", 8443, "*.svc.test:8443"),
        ("a.svc.test", 9000, None),
        ("::1", 8443, "[::1]:8443"),
    ],
)
def test_a_pattern_claims_the_default_ports_or_the_port_it_names(
    tmp_path: Path, host: str, port: int | None, pattern: str | None
) -> None:
    _, router = build(
        tmp_path,
        [
            {"hosts": ["api.test", "*.svc.test"]},
            {"hosts": ["API.test:8443", "*.svc.test:8443", "[::1]:8443"], "allow_private_addresses": True},
        ],
    )
    found = router.match_host(host, port)
    assert (found.pattern if found else None) == pattern


def test_wildcard_lookup_walks_the_name_not_the_policies(tmp_path: Path) -> None:
    """1,000 wildcard policies: the matching one is found by the name's own suffixes."""
    policies = [{"hosts": [f"*.tenant{i}.example.com"]} for i in range(1000)]
    _, router = build(tmp_path, policies)
    calls: list[tuple[str, int | None]] = []

    class CountingDict(dict[tuple[str, int | None], Policy]):
        def get(self, key: tuple[str, int | None], default: Any = None) -> Any:
            calls.append(key)
            return super().get(key, default)

    router._wildcards = CountingDict(router._wildcards)
    found = router.match_host("api.tenant999.example.com")
    assert found is not None
    assert found.pattern == "*.tenant999.example.com"
    assert calls == [(".tenant999.example.com", None)], "one probe per label, longest suffix first"


def test_a_dedicated_port_policy_with_a_port_claim_keeps_its_port(tmp_path: Path) -> None:
    _, router = build(tmp_path, [{"hosts": ["api.test:8443"], "listen": 19001}])
    policy = router.policy_for_port(19001)
    assert policy is not None
    assert str(dedicated_upstream(policy)) == "https://api.test:8443"
