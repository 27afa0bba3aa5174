"""Lint warnings of `outrigger check`: one test per rule, a clean config, and the CLI wiring."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy import secrets
from proxy.cli import main
from proxy.config.lint import lint
from proxy.config.loader import Config, load_config
from tests.conftest import write_config

SECRET = "sk_live_do_not_print_me"


def load(tmp_path: Path, policies: list[dict[str, Any]], **main_config: Any) -> Config:
    return load_config(write_config(tmp_path, policies, **main_config))


def where(config: Config, index: int) -> str:
    return config.policies[index].source


def defaults_where(config: Config) -> str:
    lines = config.path.read_text().splitlines()
    return f"{config.path}:{next(i for i, line in enumerate(lines, 1) if line.startswith('defaults:'))}"


def test_clean_config_has_no_warnings(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("sk_test_123\n")
    config = load(
        tmp_path,
        [
            {
                "hosts": ["api.stripe.com"],
                "timeouts": {"per_try": 10, "total": 31},
                "retries": {"max_attempts": 3, "methods": ["GET", "POST"]},
                "idempotency": {"methods": ["POST"]},
                "headers": {"set": {"Authorization": f"Bearer ${{file:{key}}}", "X-Client": "outrigger"}},
                "routes": [{"match": {"path": "/v1/slow*"}, "timeouts": {"per_try": "15s", "total": "1m"}}],
            },
            {"hosts": ["*.example.com"], "timeouts": {"per_try": "5s", "total": "5s"}},
            {
                "hosts": ["once.test"],
                "timeouts": {"per_try": "5s", "total": "5s"},
                "retries": {"max_attempts": 1},
            },
            {"hosts": ["example.com", "other.org"]},
        ],
        defaults={"timeouts": {"connect": "1s"}},
    )
    assert lint(config) == []


# --- 1. deadline arithmetic --------------------------------------------------------------------


def test_attempts_and_backoff_that_cannot_fit_total(tmp_path: Path) -> None:
    config = load(tmp_path, [{"hosts": ["a.test"], "retries": {}}])
    assert lint(config) == [
        f"{where(config, 0)}: retries: warning: 3 attempts x per_try 10s + backoff up to 300ms = 30300ms,"
        " more than timeouts.total (30s): when attempts time out, attempt 3 is cut short or never starts;"
        " lower per_try or max_attempts, or raise total"
    ]


def test_backoff_is_capped_by_max_and_late_attempts_are_counted(tmp_path: Path) -> None:
    policy = {
        "hosts": ["a.test"],
        "timeouts": {"connect": "1s", "per_try": "1s", "total": "4s"},
        "retries": {"max_attempts": 5, "backoff": {"base": "1s", "max": "1500ms"}},
    }
    # 5 x 1s + (1s + 1.5s + 1.5s + 1.5s) = 10.5s; 2 attempts fit (1 + 1 + 1 = 3s), the third would need 5.5s.
    (warning,) = lint(load(tmp_path, [policy]))
    assert ": retries: warning: 5 attempts x per_try 1s + backoff up to 5500ms = 10500ms," in warning
    assert "more than timeouts.total (4s): when attempts time out, attempts 3-5 are cut short" in warning


def test_deadline_of_a_route_is_reported_on_the_route_only(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        [
            {
                "hosts": ["a.test"],
                "timeouts": {"per_try": "2s", "total": "10s"},
                "retries": {"max_attempts": 3},
                "routes": [
                    {"match": {"path": "/fast"}},
                    {"match": {"path": "/slow*"}, "timeouts": {"per_try": "5s"}},
                ],
            }
        ],
    )
    (warning,) = lint(config)
    assert warning.startswith(f"{where(config, 0)}: routes[1].retries: warning: 3 attempts x per_try 5s ")


def test_no_deadline_warning_without_retries_even_when_per_try_equals_total(tmp_path: Path) -> None:
    config = load(tmp_path, [{"hosts": ["a.test"], "timeouts": {"per_try": "30s", "total": "30s"}}])
    assert lint(config) == []


# --- 2. POST/PATCH retried without idempotency ---------------------------------------------------


def test_post_retried_without_idempotency_section(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        [
            {
                "hosts": ["a.test"],
                "timeouts": {"total": "1m"},
                "retries": {"methods": ["GET", "POST", "PATCH"]},
            }
        ],
    )
    assert lint(config) == [
        f"{where(config, 0)}: retries.methods: warning: POST, PATCH would be retried without an"
        " idempotency key (no idempotency section), so a retry can repeat a side effect such as a"
        " duplicate charge; add an idempotency section (one key shared by all attempts)"
    ]


def test_patch_retried_but_only_post_gets_a_key(tmp_path: Path) -> None:
    policy = {
        "hosts": ["a.test"],
        "timeouts": {"total": "1m"},
        "retries": {"methods": ["POST", "PATCH"]},
        "idempotency": {"methods": ["POST"]},
    }
    (warning,) = lint(load(tmp_path, [policy]))
    assert ": retries.methods: warning: PATCH would be retried without an idempotency key" in warning
    assert "(not in idempotency.methods)" in warning


# --- 3. retries without a budget ---------------------------------------------------------------


def test_retries_without_budget(tmp_path: Path) -> None:
    config = load(tmp_path, [{"hosts": ["a.test"], "timeouts": {"total": "1m"}, "retries": {"budget": None}}])
    assert lint(config) == [
        f"{where(config, 0)}: retries.budget: warning: retries have no budget (budget: null): when the"
        " upstream fails, every request is tried up to 3 times, multiplying the load on it (retry storm);"
        " set a budget, e.g. {ratio: 0.2, min_per_second: 10, window: 10s}"
    ]


def test_warnings_from_defaults_are_reported_once_on_defaults(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        [
            {"hosts": ["a.test"], "retries": {"max_attempts": 2}, "routes": [{"match": {"path": "/x"}}]},
            {"hosts": ["b.test"]},
        ],
        defaults={"timeouts": {"total": "1m"}, "retries": {"budget": None}},
    )
    warnings = lint(config)
    assert warnings[0].startswith(f"{defaults_where(config)}: defaults.retries.budget: warning: retries have")
    # a.test changes max_attempts, so its own (different) finding is reported; b.test inherits the same one.
    assert [w.split(": warning: ")[0] for w in warnings] == [
        f"{defaults_where(config)}: defaults.retries.budget",
        f"{where(config, 0)}: retries.budget",
    ]
    assert "tried up to 2 times" in warnings[1]


# --- open proxy ---------------------------------------------------------------------------------

OPEN_PROXY = (
    "defaults.allow_private_addresses: warning: open proxy: unknown_hosts: allow with"
    " allow_private_addresses: true in defaults lets requests for any host reach loopback, private"
    " and link-local addresses (cloud metadata at 169.254.169.254 included); set"
    " allow_private_addresses on the policies that need it"
)


def test_unknown_hosts_allowed_with_private_addresses_in_defaults_is_an_open_proxy(tmp_path: Path) -> None:
    config = load(
        tmp_path, [{"hosts": ["a.test"]}], unknown_hosts="allow", defaults={"allow_private_addresses": True}
    )
    assert lint(config) == [f"{defaults_where(config)}: {OPEN_PROXY}"]


@pytest.mark.parametrize(
    ("unknown_hosts", "defaults", "policy"),
    [
        ("deny", {"allow_private_addresses": True}, {}),
        ("allow", {}, {"allow_private_addresses": True}),
    ],
    ids=["private-addresses-but-deny", "private-addresses-on-one-policy-only"],
)
def test_no_open_proxy_warning_when_either_half_is_missing(
    tmp_path: Path, unknown_hosts: str, defaults: dict[str, Any], policy: dict[str, Any]
) -> None:
    config = load(tmp_path, [{"hosts": ["a.test"], **policy}], unknown_hosts=unknown_hosts, defaults=defaults)
    assert lint(config) == []


def test_check_strict_fails_on_an_open_proxy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(
        tmp_path, [{"hosts": ["a.test"]}], unknown_hosts="allow", defaults={"allow_private_addresses": True}
    )
    assert main(["check", "-c", str(path)]) == 0
    assert main(["check", "--strict", "-c", str(path)]) == 1
    assert OPEN_PROXY in capsys.readouterr().out


# --- 4. shadowed wildcards ---------------------------------------------------------------------


def test_wildcard_shadowed_by_exact_host_and_longer_wildcard(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        [
            {"hosts": ["example.org", "*.example.com"]},
            {"hosts": ["api.example.com", "example.com"]},
            {"hosts": ["*.eu.example.com"]},
        ],
    )
    assert lint(config) == [
        f"{where(config, 0)}: hosts[1]: warning: *.example.com does not apply to api.example.com:"
        f" requests for them go to the policy at {where(config, 1)} (exact host beats wildcard,"
        " longest suffix wins)",
        f"{where(config, 0)}: hosts[1]: warning: *.example.com does not apply to *.eu.example.com:"
        f" requests for them go to the policy at {where(config, 2)} (exact host beats wildcard,"
        " longest suffix wins)",
    ]


def test_hosts_under_a_wildcard_of_the_same_policy_are_not_shadowing(tmp_path: Path) -> None:
    config = load(tmp_path, [{"hosts": ["*.example.com", "api.example.com"]}, {"hosts": ["*.other.com"]}])
    assert lint(config) == []


# --- 5. inline secrets -------------------------------------------------------------------------


def test_inline_secret_in_a_credential_header(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        [{"hosts": ["a.test"], "headers": {"set": {"Authorization": f"Bearer {SECRET}", "X-Client": "me"}}}],
    )
    assert lint(config) == [
        f"{where(config, 0)}: headers.set.Authorization: warning: credential-looking header value"
        " written inline; write it as ${file:PATH} or ${env:NAME} so the secret stays out of config files"
    ]


def test_inline_secret_in_defaults_is_reported_once_but_a_policy_override_is_its_own(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        [
            {"hosts": ["a.test"]},
            {"hosts": ["b.test"], "headers": {"set": {"X-Api-Key": "another-inline-key"}}},
        ],
        defaults={"headers": {"set": {"X-Api-Key": SECRET}}},
    )
    assert [w.split(": warning: ")[0] for w in lint(config)] == [
        f"{defaults_where(config)}: defaults.headers.set.X-Api-Key",
        f"{where(config, 1)}: headers.set.X-Api-Key",
    ]


def test_looks_sensitive_matches_what_redact_hides() -> None:
    assert secrets.looks_sensitive("Authorization")
    assert secrets.looks_sensitive("x-api-key")
    assert not secrets.looks_sensitive("X-Client")
    assert secrets.redact("Authorization", f"Bearer {SECRET}") == "Bearer <redacted>"
    assert secrets.redact("Authorization", "Bearer ${env:TOKEN}") == "Bearer ${env:TOKEN}"
    assert secrets.redact("X-Client", "plain") == "plain"


# --- the CLI -----------------------------------------------------------------------------------


def test_check_prints_warnings_but_never_the_inline_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(
        tmp_path, [{"hosts": ["a.test"], "headers": {"set": {"Authorization": f"Bearer {SECRET}"}}}]
    )
    assert main(["check", "-c", str(path)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].endswith("OK (1 policies, version " + load_config(path).version + ")")
    assert lines[1].endswith(
        ": headers.set.Authorization: warning: credential-looking header value"
        " written inline; write it as ${file:PATH} or ${env:NAME} so the secret"
        " stays out of config files"
    )
    assert lines[2:] == ["1 warning(s)"]
    assert err == ""
    assert SECRET not in out + err


def test_check_strict_fails_on_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, [{"hosts": ["a.test"], "retries": {"budget": None}}])
    assert main(["check", "-c", str(path)]) == 0
    assert main(["check", "--strict", "-c", str(path)]) == 1
    assert "retries.budget: warning:" in capsys.readouterr().out


def test_check_strict_passes_a_clean_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, [{"hosts": ["a.test"]}])
    assert main(["check", "--strict", "-c", str(path)]) == 0
    assert capsys.readouterr().out.count("\n") == 1


# --- CONNECT tunnels ----------------------------------------------------------------------------


def test_a_tunnelled_policy_is_told_what_cannot_apply_to_its_tunnels(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        [
            {"hosts": ["plain.test"], "connect": "tunnel"},
            {"hosts": ["rich.test"], "connect": "tunnel", "retries": {"max_attempts": 1},
             "headers": {"set": {"X-Client": "outrigger"}}, "circuit_breaker": {}},
        ],
    )  # fmt: skip
    assert lint(config) == [
        f"{where(config, 1)}: connect: warning: retries, headers, circuit_breaker cannot apply to CONNECT"
        " tunnels (their bytes are the app's own TLS); they apply only to plain http:// requests to this"
        " policy"
    ]


# --- a 2xx fallback answering POST ------------------------------------------------------------------

FAKE_SUCCESS = (
    "the fallback answers {status}, so a POST or PATCH that never reached the upstream looks successful"
    " to the app; use a non-2xx status, or declare the 2xx fallback on a route matching only safe"
    " methods (e.g. match: {{method: GET}})"
)


def test_a_2xx_fallback_on_a_policy_is_reported(tmp_path: Path) -> None:
    config = load(tmp_path, [{"hosts": ["a.test"], "fallback": {"status": 200, "body": "{}"}}])
    assert lint(config) == [
        f"{where(config, 0)}: fallback.status: warning: {FAKE_SUCCESS.format(status=200)}"
    ]


def test_a_non_2xx_fallback_is_fine(tmp_path: Path) -> None:
    config = load(
        tmp_path, [{"hosts": ["a.test"], "fallback": {}}, {"hosts": ["b.test"], "fallback": {"status": 404}}]
    )
    assert lint(config) == []


def test_a_2xx_fallback_on_a_get_only_route_is_fine_but_not_on_a_post_route(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        [
            {
                "hosts": ["a.test"],
                "routes": [
                    {
                        "match": {"method": ["GET", "HEAD"], "path": "/v1/catalog*"},
                        "fallback": {"status": 200},
                    },
                    {"match": {"method": "POST"}, "fallback": {"status": 202}},
                    {"match": {"path": "/v1/any*"}, "fallback": {"status": 204, "body": ""}},
                ],
            }
        ],
    )
    assert lint(config) == [
        f"{where(config, 0)}: routes[1].fallback.status: warning: {FAKE_SUCCESS.format(status=202)}",
        f"{where(config, 0)}: routes[2].fallback.status: warning: {FAKE_SUCCESS.format(status=204)}",
    ]


def test_a_2xx_fallback_in_defaults_is_reported_once_on_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, [{"hosts": ["a.test"]}], defaults={"fallback": {"status": 200}})
    assert lint(config) == [
        f"{defaults_where(config)}: defaults.fallback.status: warning: {FAKE_SUCCESS.format(status=200)}"
    ]
