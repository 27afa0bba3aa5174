"""Merging: built-in defaults < ``defaults:`` < host policy < matching route."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from proxy.config import defaults as builtin
from proxy.config.loader import Config, ConfigError, deep_merge, load_config
from proxy.config.model import Policy, PolicySettings
from proxy.routing import Router

MAIN = """\
listen: {host: 127.0.0.1, port: 15001}
admin: {host: 127.0.0.1, port: 15000}
"""


def load(tmp_path: Path, policies: dict[str, str], main_extra: str = "") -> Config:
    """config.yaml (MAIN + `main_extra`, line 3 on) and policies/<name> from literal YAML."""
    (tmp_path / "policies").mkdir(exist_ok=True)
    (tmp_path / "config.yaml").write_text(MAIN + textwrap.dedent(main_extra))
    for name, text in policies.items():
        (tmp_path / "policies" / name).write_text(textwrap.dedent(text))
    return load_config(tmp_path / "config.yaml")


def policy(config: Config, host: str) -> Policy:
    return next(p for p in config.policies if host in p.hosts)


def timeouts(settings: PolicySettings) -> tuple[float, float, float]:
    return settings.timeouts.connect, settings.timeouts.per_try, settings.timeouts.total


# --- deep_merge itself ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "override", "merged"),
    [
        ({"a": 1}, {"b": 2}, {"a": 1, "b": 2}),
        ({"a": {"x": 1, "y": 2}}, {"a": {"y": 3}}, {"a": {"x": 1, "y": 3}}),
        (
            {"a": {"x": {"deep": 1, "keep": 2}}},
            {"a": {"x": {"deep": 9}}},
            {"a": {"x": {"deep": 9, "keep": 2}}},
        ),
        ({"a": [1, 2, 3]}, {"a": [4]}, {"a": [4]}),
        ({"a": [1, 2]}, {"a": []}, {"a": []}),
        ({"a": {"x": 1}}, {"a": 5}, {"a": 5}),
        ({"a": 5}, {"a": {"x": 1}}, {"a": {"x": 1}}),
        ({}, {"a": {"x": 1}}, {"a": {"x": 1}}),
        ({"a": 1}, {}, {"a": 1}),
        (None, {"a": 1}, {"a": 1}),
    ],
)
def test_deep_merge(base: Any, override: Any, merged: Any) -> None:
    assert deep_merge(base, override) == merged


def test_deep_merge_does_not_modify_its_inputs() -> None:
    base = {"timeouts": {"connect": "1s"}, "headers": {"set": {"A": "1"}}}
    override = {"timeouts": {"total": "5s"}, "headers": {"set": {"B": "2"}}}
    deep_merge(base, override)
    assert base == {"timeouts": {"connect": "1s"}, "headers": {"set": {"A": "1"}}}
    assert override == {"timeouts": {"total": "5s"}, "headers": {"set": {"B": "2"}}}


# --- layers of settings -------------------------------------------------------------------------


def test_built_in_defaults_apply_when_nothing_is_set(tmp_path: Path) -> None:
    config = load(tmp_path, {"a.yaml": "hosts: [a.example.com]\n"})
    settings = policy(config, "a.example.com").settings
    assert timeouts(settings) == (
        builtin.CONNECT_TIMEOUT_S,
        builtin.PER_TRY_TIMEOUT_S,
        builtin.TOTAL_TIMEOUT_S,
    )
    assert timeouts(settings) == (2.0, 10.0, 30.0)
    assert settings.tls.verify is True
    assert settings.allow_private_addresses is False
    assert settings.headers.set == {}
    assert settings.headers.remove == ()


def test_timeouts_merge_builtin_then_defaults_then_policy_then_route(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        {
            "a.yaml": """\
                hosts: [a.example.com]
                timeouts: {per_try: 8s}
                routes:
                  - match: {path: "/slow/*"}
                    timeouts: {total: 1m}
                """,
            "b.yaml": "hosts: [b.example.com]\n",
        },
        """\
        defaults:
          timeouts: {per_try: 5s, total: 20s}
        """,
    )
    a = policy(config, "a.example.com")
    # connect: built-in; per_try: policy over defaults; total: defaults
    assert timeouts(a.settings) == (2.0, 8.0, 20.0)
    # the route changes only total and inherits the policy's per_try
    assert timeouts(a.routes[0].settings) == (2.0, 8.0, 60.0)
    # a policy that sets nothing gets the defaults
    assert timeouts(policy(config, "b.example.com").settings) == (2.0, 5.0, 20.0)
    assert timeouts(config.main.defaults) == (2.0, 5.0, 20.0)


def test_headers_merge_key_by_key_and_lists_replace(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        {
            "a.yaml": """\
                hosts: [a.example.com]
                headers:
                  set: {X-Env: policy, X-Policy: "1"}
                  remove: [X-C]
                routes:
                  - match: {method: POST}
                    headers:
                      set: {X-Route: "1", User-Agent: route-agent}
                      remove: []
                """,
            "b.yaml": "hosts: [b.example.com]\n",
        },
        """\
        defaults:
          headers:
            set: {User-Agent: outrigger, X-Env: defaults}
            remove: [X-A, X-B]
        """,
    )
    a = policy(config, "a.example.com")
    assert a.settings.headers.set == {"User-Agent": "outrigger", "X-Env": "policy", "X-Policy": "1"}
    assert a.settings.headers.remove == ("X-C",)
    route = a.routes[0].settings.headers
    assert route.set == {"User-Agent": "route-agent", "X-Env": "policy", "X-Policy": "1", "X-Route": "1"}
    assert route.remove == ()
    b = policy(config, "b.example.com").settings.headers
    assert b.set == {"User-Agent": "outrigger", "X-Env": "defaults"}
    assert b.remove == ("X-A", "X-B")


def test_nested_sections_merge_key_by_key(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        {"a.yaml": "hosts: [a.example.com]\ntls: {sni: sni.example.com}\n"},
        "defaults:\n  tls: {verify: false}\n  allow_private_addresses: true\n",
    )
    settings = policy(config, "a.example.com").settings
    assert settings.tls.verify is False
    assert settings.tls.sni == "sni.example.com"
    assert settings.allow_private_addresses is True


def test_a_policy_can_turn_a_default_back_off(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        {"a.yaml": "hosts: [a.example.com]\nallow_private_addresses: false\ntls: {verify: true}\n"},
        "defaults:\n  tls: {verify: false}\n  allow_private_addresses: true\n",
    )
    settings = policy(config, "a.example.com").settings
    assert settings.tls.verify is True
    assert settings.allow_private_addresses is False


def test_routes_inherit_non_overridable_sections_from_the_policy(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        {
            "a.yaml": """\
                hosts: [a.example.com]
                allow_private_addresses: true
                tls: {verify: false}
                routes:
                  - match: {path: /x}
                """
        },
    )
    a = policy(config, "a.example.com")
    assert a.routes[0].settings == a.settings


# --- route selection ----------------------------------------------------------------------------


ROUTES = """\
    hosts: [api.example.com]
    routes:
      - match: {method: post, path: "/v1/payment_intents*"}
        timeouts: {per_try: 25s}
      - match: {method: [get, Head]}
        timeouts: {per_try: 3s}
      - match: {path: "/v1/*/refunds"}
        timeouts: {per_try: 4s}
      - match: {path: "/v1/*"}
        timeouts: {per_try: 5s}
    """


@pytest.fixture
def routed(tmp_path: Path) -> Policy:
    return policy(load(tmp_path, {"a.yaml": ROUTES}), "api.example.com")


def test_route_methods_are_normalised_to_upper_case(routed: Policy) -> None:
    assert routed.routes[0].match.method == ("POST",)
    assert routed.routes[1].match.method == ("GET", "HEAD")
    assert routed.routes[2].match.method is None


@pytest.mark.parametrize(
    ("method", "path", "route", "per_try"),
    [
        ("POST", "/v1/payment_intents", 0, 25.0),
        ("POST", "/v1/payment_intents/pi_123/confirm", 0, 25.0),
        ("GET", "/v1/payment_intents", 1, 3.0),  # method list; path does not matter
        ("HEAD", "/anything", 1, 3.0),
        ("POST", "/v1/charges/ch_1/refunds", 2, 4.0),  # first match wins over the broader /v1/*
        ("DELETE", "/v1/customers/cus_1", 3, 5.0),
        ("PUT", "/v2/x", None, 10.0),  # no route: the policy's own settings
        ("POST", "/v1", None, 10.0),
    ],
)
def test_route_selected_by_method_and_path_glob(
    routed: Policy, method: str, path: str, route: int | None, per_try: float
) -> None:
    match = Router.resolve_route(routed, method, path)
    assert match.policy is routed
    assert match.route == route
    assert match.settings.timeouts.per_try == per_try
    if route is None:
        assert match.settings is routed.settings
    else:
        assert match.settings is routed.routes[route].settings


def test_first_matching_route_wins(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        {
            "a.yaml": """\
                hosts: [a.example.com]
                routes:
                  - match: {path: "/v1/*"}
                    headers: {set: {X-Route: first}}
                  - match: {path: "/v1/charges"}
                    headers: {set: {X-Route: second}}
                """
        },
    )
    a = policy(config, "a.example.com")
    match = Router.resolve_route(a, "GET", "/v1/charges")
    assert match.route == 0
    assert match.settings.headers.set == {"X-Route": "first"}


def test_route_path_glob_is_case_sensitive(routed: Policy) -> None:
    assert Router.resolve_route(routed, "DELETE", "/V1/customers").route is None


def test_route_may_not_override_tls(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    a = (tmp_path / "policies" / "a.yaml").resolve()
    with pytest.raises(ConfigError) as caught:
        load(
            tmp_path,
            {
                "a.yaml": """\
                    hosts: [a.example.com]
                    routes:
                      - match: {method: POST}
                        tls: {verify: false}
                        allow_private_addresses: true
                    """
            },
        )
    assert caught.value.problems == (
        f"{a}:4: routes[0].tls: unknown key",
        f"{a}:5: routes[0].allow_private_addresses: unknown key",
    )


def test_route_without_match_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    a = (tmp_path / "policies" / "a.yaml").resolve()
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, {"a.yaml": "hosts: [a.example.com]\nroutes:\n  - timeouts: {per_try: 1s}\n"})
    (problem,) = caught.value.problems
    assert problem.startswith(f"{a}:")
    assert problem.endswith(": routes[0].match: required key is missing")


def test_missing_key_points_at_its_parent_line(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    a = (tmp_path / "policies" / "a.yaml").resolve()
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, {"a.yaml": "hosts: [a.example.com]\nroutes:\n  - timeouts: {per_try: 1s}\n"})
    assert caught.value.problems == (f"{a}:3: routes[0].match: required key is missing",)


def test_bad_route_match(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    a = (tmp_path / "policies" / "a.yaml").resolve()
    with pytest.raises(ConfigError) as caught:
        load(
            tmp_path,
            {
                "a.yaml": """\
                    hosts: [a.example.com]
                    routes:
                      - match:
                          method: "GE T"
                          path: v1/*
                    """
            },
        )
    assert caught.value.problems == (
        f"{a}:4: routes[0].match.method: invalid HTTP method 'GE T'",
        f"{a}:5: routes[0].match.path: path glob must start with '/' (or '*')",
    )
