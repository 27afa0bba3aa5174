"""The `outrigger` command: check, explain and schema (in-process), plus one real subprocess."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from proxy.cli import main, policy_file_schema
from proxy.config.loader import load_config
from tests.conftest import loopback_policy, write_config

SECRET = "sk_live_PLANTED_4f9a2c71"
"""A literal credential written into the config: it must never be printed."""
ROUTE_SECRET = "rk_live_ROUTE_88e1d0"
DEFAULT_SECRET = "session=DEFAULT_COOKIE_5b7c"

MAIN = f"""\
listen: {{host: 127.0.0.1, port: 15001}}
admin: {{host: 127.0.0.1, port: 15000}}
policy_dirs: [policies/]
unknown_hosts: allow
defaults:
  timeouts: {{total: 20s}}
  headers:
    set:
      User-Agent: outrigger-test
      Cookie: "{DEFAULT_SECRET}"
"""

STRIPE = f"""\
# the Stripe API
hosts: [api.stripe.com]
upstream: https://api.stripe.com
headers:
  set:
    Authorization: "Bearer {SECRET}"
    Stripe-Version: "2024-06-20"
routes:
  - match: {{method: POST, path: "/v1/payment_intents*"}}
    timeouts: {{per_try: 15s}}
    headers:
      set: {{X-Api-Key: "{ROUTE_SECRET}"}}
"""

MORE = """\
- hosts: ["*.example.com"]
  timeouts: {connect: 1s}
- hosts: [internal.test]
  upstream: http://127.0.0.1:8080
  listen: 9001
  allow_private_addresses: true
  headers:
    set: {Authorization: "Bearer ${env:OUTRIGGER_CLI_TEST_TOKEN}"}
"""


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OUTRIGGER_CLI_TEST_TOKEN", "env-token-value-9d3e")
    root = tmp_path.resolve()
    (root / "policies").mkdir()
    (root / "policies" / "stripe.yaml").write_text(STRIPE)
    (root / "policies" / "more.yaml").write_text(MORE)
    path = root / "config.yaml"
    path.write_text(MAIN)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def explain(capsys: pytest.CaptureFixture[str], config: Path, method: str, url: str) -> dict[str, Any]:
    code, out, err = run(capsys, "explain", "-c", str(config), method, url)
    assert (code, err) == (0, "")
    for secret in (SECRET, ROUTE_SECRET, DEFAULT_SECRET, "env-token-value-9d3e"):
        assert secret not in out
    report = yaml.safe_load(out)
    assert isinstance(report, dict)
    return report


# --- check -----------------------------------------------------------------------------------------


def test_check_valid_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    root = tmp_path.resolve()
    (root / "policies").mkdir()
    (root / "policies" / "a.yaml").write_text("hosts: [api.example.com]\nupstream: https://api.example.com\n")
    (root / "policies" / "b.yaml").write_text("- hosts: [b.example.com]\n- hosts: [c.example.com]\n")
    config = root / "config.yaml"
    config.write_text("listen: {host: 127.0.0.1, port: 15001}\n")
    code, out, err = run(capsys, "check", "-c", str(config))
    assert code == 0
    assert out == f"{config}: OK (3 policies, version {load_config(config).version})\n"
    assert err == ""


def test_check_valid_config_with_inline_secrets_warns_without_printing_them(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    code, out, err = run(capsys, "check", "-c", str(config))
    assert code == 0
    assert err == ""
    lines = out.splitlines()
    assert lines[0] == f"{config}: OK (3 policies, version {load_config(config).version})"
    assert any(": warning: " in line for line in lines[1:])
    for secret in (SECRET, ROUTE_SECRET, DEFAULT_SECRET, "env-token-value-9d3e"):
        assert secret not in out


def test_check_invalid_config_prints_every_problem_to_stderr(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    bad = config.parent / "policies" / "bad.yaml"
    bad.write_text(
        textwrap.dedent(
            """\
            hosts: [api.stripe.com]
            timeouts:
              connect: 5x
              bogus: 1
            """
        )
    )
    other = config.parent / "policies" / "other.yaml"
    other.write_text("hosts: [a.example.com]\nlisten: 9001\n")
    code, out, err = run(capsys, "check", "-c", str(config))
    assert code == 1
    assert out == ""
    assert err.splitlines() == [
        f"{bad}:3: timeouts.connect: invalid duration '5x': use a number with ms, s, m or h (e.g. 250ms)",
        f"{bad}:4: timeouts.bogus: unknown key",
        f"{other}:2: listen: port 9001 is already used by {config.parent / 'policies' / 'more.yaml'}:3",
        "3 problem(s) found",
    ]
    for secret in (SECRET, ROUTE_SECRET, DEFAULT_SECRET):
        assert secret not in err


def test_check_missing_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path.resolve() / "nope.yaml"
    code, out, err = run(capsys, "check", "-c", str(missing))
    assert code == 1
    assert out == ""
    assert err.splitlines() == [
        f"{missing}:1: (top level): cannot read file: No such file or directory",
        "1 problem(s) found",
    ]


def test_check_needs_a_config(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["check"])
    assert caught.value.code == 2
    assert "-c/--config" in capsys.readouterr().err


def test_console_script_check_in_a_subprocess(config: Path, tmp_path: Path) -> None:
    script = shutil.which("outrigger", path=str(Path(sys.executable).parent))
    assert script is not None, "the outrigger console script is not installed in the venv"
    ok = subprocess.run([script, "check", "-c", str(config)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"{config}: OK (3 policies, version ")
    assert ok.stderr == ""
    (config.parent / "policies" / "bad.yaml").write_text("hosts: [x.example.com]\nbogus: 1\n")
    bad = subprocess.run([script, "check", "-c", str(config)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert bad.stdout == ""
    assert bad.stderr.splitlines() == [
        f"{config.parent / 'policies' / 'bad.yaml'}:2: bogus: unknown key",
        "1 problem(s) found",
    ]


# --- explain -------------------------------------------------------------------------------------


def test_explain_exact_host(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    report = explain(capsys, config, "GET", "http://api.stripe.com/v1/charges?limit=3")
    assert report["request"] == "GET http://api.stripe.com/v1/charges?limit=REDACTED"
    assert report["policy"] == "api.stripe.com"
    assert report["source"] == f"{config.parent / 'policies' / 'stripe.yaml'}:2"
    assert report["matched_by"] == "exact host api.stripe.com"
    assert report["route"] is None
    assert report["upstream"] == "https://api.stripe.com"
    assert report["config_version"] == load_config(config).version
    settings = report["settings"]
    assert settings["timeouts"] == {"connect": "2s", "per_try": "10s", "total": "20s", "idle": "1m"}
    assert settings["tls"]["verify"] is True
    assert settings["allow_private_addresses"] is False
    headers = settings["headers"]["set"]
    assert headers["User-Agent"] == "outrigger-test"  # from defaults
    assert headers["Stripe-Version"] == "2024-06-20"  # harmless header shown as is
    assert headers["Authorization"].count("<redacted>") == 1  # the literal is hidden
    assert headers["Cookie"] == "<redacted>"


def test_explain_route_and_merged_settings(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    report = explain(capsys, config, "post", "http://api.stripe.com/v1/payment_intents/pi_1/confirm")
    assert report["request"] == "POST http://api.stripe.com/v1/payment_intents/pi_1/confirm"
    assert report["route"] == {"index": 0, "method": ["POST"], "path": "/v1/payment_intents*"}
    assert report["settings"]["timeouts"] == {"connect": "2s", "per_try": "15s", "total": "20s", "idle": "1m"}
    assert report["settings"]["headers"]["set"]["X-Api-Key"] == "<redacted>"


def test_explain_route_is_matched_on_the_path_without_the_query(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    report = explain(capsys, config, "POST", "http://api.stripe.com/v2/x?next=/v1/payment_intents")
    assert report["route"] is None


def test_explain_wildcard(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    report = explain(capsys, config, "GET", "http://a.b.example.com/x")
    assert report["policy"] == "*.example.com"
    assert report["source"] == f"{config.parent / 'policies' / 'more.yaml'}:1"
    assert report["matched_by"] == "wildcard *.example.com"
    assert report["upstream"] == "https://a.b.example.com"
    other_port = explain(capsys, config, "GET", "http://a.b.example.com:8443/x")
    assert other_port["policy"] == "(unknown)", "the pattern claims only the default ports"
    assert report["settings"]["timeouts"] == {"connect": "1s", "per_try": "10s", "total": "20s", "idle": "1m"}


def test_explain_dedicated_port(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    report = explain(capsys, config, "GET", "http://127.0.0.1:9001/health")
    assert report["policy"] == "internal.test"
    assert report["matched_by"] == "dedicated listen port"
    assert report["upstream"] == "http://127.0.0.1:8080"
    assert report["settings"]["allow_private_addresses"] is True
    # a reference holds no secret: it is shown so the reader knows where the value comes from
    assert report["settings"]["headers"]["set"]["Authorization"] == "Bearer ${env:OUTRIGGER_CLI_TEST_TOKEN}"


def test_explain_unknown_host_allowed(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    report = explain(capsys, config, "GET", "http://unknown.org/")
    assert report["policy"] == "(unknown)"
    assert report["matched_by"] == "unknown_hosts: allow"
    assert "unknown_hosts: allow" in report["source"]
    assert report["upstream"] == "https://unknown.org"
    assert report["settings"]["timeouts"]["total"] == "20s"
    assert report["settings"]["headers"]["set"]["User-Agent"] == "outrigger-test"


def test_explain_unknown_host_refused(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    config.write_text(MAIN.replace("unknown_hosts: allow", "unknown_hosts: deny"))
    report = explain(capsys, config, "GET", "http://Unknown.ORG/x")
    assert report["host"] == "unknown.org"
    assert report["policy"] is None
    assert report["result"].startswith("refused: 403 host_not_allowed")


def test_explain_needs_an_absolute_url(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    code, out, err = run(capsys, "explain", "-c", str(config), "GET", "/v1/charges")
    assert code == 2
    assert out == ""
    assert err.startswith("error: '/v1/charges' is not an absolute URL")


def test_explain_with_an_invalid_config(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    config.write_text(MAIN + "bogus: 1\n")
    code, out, err = run(capsys, "explain", "-c", str(config), "GET", "http://api.stripe.com/")
    assert code == 1
    assert out == ""
    assert err.splitlines() == [f"{config}:11: bogus: unknown key", "1 problem(s) found"]


def test_explain_never_prints_a_planted_secret(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    for method, url in [
        ("GET", "http://api.stripe.com/v1/charges"),
        ("POST", "http://api.stripe.com/v1/payment_intents"),
        ("GET", "http://127.0.0.1:9001/"),
        ("GET", "http://x.example.com/"),
        ("GET", "http://elsewhere.org/"),
    ]:
        code, out, err = run(capsys, "explain", "-c", str(config), method, url)
        assert code == 0
        assert "<redacted>" in out
        for secret in (SECRET, ROUTE_SECRET, DEFAULT_SECRET, "env-token-value-9d3e"):
            assert secret not in out
            assert secret not in err


@pytest.mark.parametrize(
    ("url", "matched_by"),
    [
        ("http://api.stripe.com./v1/charges", "exact host api.stripe.com"),
        ("http://x.example.com./", "wildcard *.example.com"),
    ],
)
def test_explain_host_with_a_trailing_dot(
    capsys: pytest.CaptureFixture[str], config: Path, url: str, matched_by: str
) -> None:
    report = explain(capsys, config, "GET", url)
    assert report["matched_by"] == matched_by


def test_explain_names_the_wildcard_that_matched(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    (config.parent / "policies" / "more.yaml").write_text('hosts: ["*.example.com", "*.eu.example.com"]\n')
    report = explain(capsys, config, "GET", "http://a.eu.example.com/")
    assert report["matched_by"] == "wildcard *.eu.example.com"


def test_explain_dedicated_port_without_upstream_shows_where_the_server_sends(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    (config.parent / "policies" / "more.yaml").write_text("hosts: [api.example.net]\nlisten: 9002\n")
    report = explain(capsys, config, "GET", "http://localhost:9002/x")
    assert report["matched_by"] == "dedicated listen port"
    assert report["upstream"] == "https://api.example.net"


def test_explain_redacts_query_values_and_user_info(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, [loopback_policy("http://127.0.0.1:9")])
    code = main(["explain", "-c", str(path), "GET", "http://user:pw@upstream.test/v1/x?token=abc&n=1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = yaml.safe_load(out)
    line = report["request"]
    assert "user" not in line
    assert "pw@" not in line
    assert "abc" not in line
    assert "token=REDACTED" in line, "the query names stay"
    assert "n=REDACTED" in line
    assert line.startswith("GET http://upstream.test/v1/x?")
    assert "user:pw" not in out
    assert "token=abc" not in out


# --- schema --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return policy_file_schema()


def test_schema_verb_prints_the_json_schema(
    capsys: pytest.CaptureFixture[str], schema: dict[str, Any]
) -> None:
    code, out, err = run(capsys, "schema")
    assert (code, err) == (0, "")
    printed = json.loads(out)
    assert printed == json.loads(json.dumps(schema))
    assert printed["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(printed)


def _errors(schema: dict[str, Any], document: Any) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema)
    return [error.message for error in validator.iter_errors(document)]


def test_schema_accepts_a_policy_and_a_list_of_policies(
    schema: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = {
        "hosts": ["api.example.com", "*.api.example.com"],
        "listen": 9001,
        "allow_private_addresses": False,
        "tls": {"verify": True, "sni": "api.example.com"},
        "timeouts": {"connect": "500ms", "per_try": 2, "total": "1m"},
        "headers": {"set": {"Authorization": "Bearer ${env:TOKEN}"}, "remove": ["X-Debug"]},
        "routes": [{"match": {"method": ["GET", "HEAD"], "path": "/v1/*"}, "timeouts": {"per_try": "5s"}}],
    }
    # the loader accepts it...
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "a.yaml").write_text(yaml.safe_dump(policy))
    (tmp_path / "config.yaml").write_text("listen: {host: 127.0.0.1, port: 15001}\n")
    monkeypatch.setenv("TOKEN", "x")
    assert load_config(tmp_path / "config.yaml").policies[0].hosts == ("api.example.com", "*.api.example.com")
    # ...and so does the schema, alone and in a list
    assert _errors(schema, policy) == []
    assert _errors(schema, [policy, {"hosts": ["b.example.com"]}]) == []


@pytest.mark.parametrize(
    "document",
    [
        {"hosts": ["api.stripe.com"], "upstream": "https://api.stripe.com"},
        {"hosts": ["a.example.com"], "routes": [{"match": {"method": "POST", "path": "/v1/*"}}]},
        {"hosts": ["a.example.com"], "retries": {"on": ["connect-failure", 502, "5xx"]}},
        {
            "hosts": ["a.example.com"],
            "fallback": {
                "on": [
                    "circuit_open",
                    "timeout",
                    "upstream_unreachable",
                    "rate_limited",
                    "overloaded",
                    "5xx",
                    502,
                ],
                "status": 503,
                "headers": {"Content-Type": "application/json"},
                "body": '{"degraded": true}',
            },
            "faults": {
                "abort": {"status": 503, "percent": 10},
                "delay": {"duration": "2s", "percent": 5},
                "header_only": True,
            },
            "routes": [{"match": {"method": "GET"}, "fallback": {"status": 200, "body": "[]"}}],
        },
    ],
    ids=["upstream-url", "single-route-method", "retry-on-status-int", "fallback-and-faults"],
)
def test_schema_accepts_what_the_loader_accepts(
    schema: dict[str, Any], tmp_path: Path, document: Any
) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "a.yaml").write_text(yaml.safe_dump(document))
    (tmp_path / "config.yaml").write_text("listen: {host: 127.0.0.1, port: 15001}\n")
    load_config(tmp_path / "config.yaml")
    assert _errors(schema, document) == []


@pytest.mark.parametrize(
    "document",
    [
        {"hosts": ["a.example.com"], "bogus": 1},
        {"hosts": ["a.example.com"], "timeouts": {"bogus": "1s"}},
        {"hosts": ["a.example.com"], "tls": {"verify": True, "pin": "x"}},
        {"hosts": ["a.example.com"], "routes": [{"match": {"method": "GET"}, "tls": {"verify": False}}]},
        {"hosts": ["a.example.com"], "routes": [{"match": {"method": "GET", "query": "x"}}]},
        [{"hosts": ["a.example.com"]}, {"hosts": ["b.example.com"], "bogus": 1}],
    ],
)
def test_schema_rejects_unknown_keys(schema: dict[str, Any], document: Any) -> None:
    assert _errors(schema, document) != []


@pytest.mark.parametrize(
    "document",
    [
        {"upstream": "https://a.example.com"},  # hosts is required
        {"hosts": []},
        {"hosts": ["a.example.com"], "timeouts": {"connect": "5x"}},
        {"hosts": ["a.example.com"], "timeouts": {"connect": -1}},
        {"hosts": ["a.example.com"], "listen": 70000},
        {"hosts": ["a.example.com"], "allow_private_addresses": "maybe"},
        "just a string",
    ],
)
def test_schema_rejects_bad_values(schema: dict[str, Any], document: Any) -> None:
    assert _errors(schema, document) != []


def test_explain_shows_fallback_and_faults(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "a.yaml").write_text(
        "hosts: [a.example.com]\nfallback: {on: [circuit_open]}\nfaults: {abort: {percent: 10}}\n"
    )
    (tmp_path / "config.yaml").write_text("listen: {host: 127.0.0.1, port: 15001}\n")

    settings = explain(capsys, tmp_path / "config.yaml", "GET", "http://a.example.com/x")["settings"]

    assert settings["fallback"] == {
        "on": ["circuit_open"],
        "status": 503,
        "headers": {"Content-Type": "application/json"},
        "body": '{"degraded": true}',
    }
    assert settings["faults"] == {"abort": {"status": 503, "percent": 10.0}, "header_only": True}
