"""The ``failover`` section: loading, FILE:LINE errors, the schema, lint, explain and /config redaction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.cli import main
from proxy.config.lint import lint
from proxy.config.model import UpstreamTarget
from proxy.explain import explain, redacted_settings
from tests.config.test_loader import Tree, at


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    t = Tree(tmp_path.resolve())
    t.main()
    return t


def test_a_valid_failover_section_loads_with_defaults(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EU_KEY", "eu-secret")
    tree.policy(
        "a.yaml",
        """\
        hosts: [api.example.com]
        upstream: https://api.example.com
        failover:
          upstreams:
            - url: https://api.eu.example.com
              headers: {set: {Authorization: "Bearer ${env:EU_KEY}"}}
            - url: http://standby.example.com:8080
        """,
    )
    failover = tree.load().policies[0].settings.failover
    assert failover is not None
    assert [u.url for u in failover.upstreams] == [
        UpstreamTarget(scheme="https", host="api.eu.example.com", port=443),
        UpstreamTarget(scheme="http", host="standby.example.com", port=8080),
    ]
    assert failover.on == ("circuit_open", "connect-failure", "timeout", "5xx")
    assert failover.upstreams[1].headers.set == {}
    assert failover.upstreams[0].tls is None


def test_bad_failover_sections_are_reported_with_file_line_and_key(tree: Tree) -> None:
    path = tree.policy(
        "a.yaml",
        """\
        hosts: [api.example.com]
        upstream: https://api.example.com
        failover:
          upstreams:
            - url: ftp://files.example.com
            - url: https://eu.example.com/v1
            - headers: {set: {X-A: b}}
            - url: https://us.example.com
              region: us
          on: [circuit_open, 5xx, sometimes]
        """,
    )
    assert tree.problems() == at(
        path,
        (
            5,
            "failover.upstreams[0].url: upstream 'ftp://files.example.com' must look like https://host[:port]",
        ),
        (
            6,
            "failover.upstreams[1].url: upstream 'https://eu.example.com/v1' may not carry a path,"
            " query, fragment or credentials",
        ),
        (7, "failover.upstreams[2].url: required key is missing"),
        (9, "failover.upstreams[3].region: unknown key"),
        (
            10,
            "failover.on[2]: unknown condition 'sometimes': use connect-failure, reset, timeout,"
            " a status (503), a range (500-504) or a class (5xx)",
        ),
    )


@pytest.mark.parametrize(
    ("upstreams", "line", "message"),
    [
        ("[]", 4, "failover.upstreams: upstreams needs at least 1 item: the upstream to fail over to"),
        (
            "[{url: 'https://eu.example.com'}, {url: 'https://eu.example.com:443/'}]",
            4,
            "failover.upstreams: https://eu.example.com is listed twice: each upstream has one breaker",
        ),
        (
            "[{url: 'https://eu.example.com'}, {url: 'https://api.example.com'}]",
            4,
            "failover.upstreams[1].url: https://api.example.com is this policy's upstream already:"
            " list only the other upstreams",
        ),
    ],
)
def test_upstream_lists_that_make_no_sense(tree: Tree, upstreams: str, line: int, message: str) -> None:
    path = tree.policy(
        "a.yaml",
        f"""\
        hosts: [api.example.com]
        upstream: https://api.example.com
        failover:
          upstreams: {upstreams}
        """,
    )
    assert tree.problems() == at(path, (line, message))


def test_a_missing_secret_of_a_failover_upstream_fails_at_load(tree: Tree) -> None:
    path = tree.policy(
        "a.yaml",
        """\
        hosts: [api.example.com]
        failover:
          upstreams:
            - url: https://eu.example.com
              headers: {set: {Authorization: "Bearer ${file:/nonexistent/eu-key}"}}
        """,
    )
    (problem,) = tree.problems()
    assert problem.startswith(f"{path}:5: failover.upstreams[0].headers.set.Authorization: ")


def test_the_schema_describes_failover(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    failover = schema["$defs"]["Failover"]
    assert failover["required"] == ["upstreams"]
    assert failover["properties"]["upstreams"]["minItems"] == 1
    assert failover["properties"]["on"]["default"] == ["circuit_open", "connect-failure", "timeout", "5xx"]
    upstream = schema["$defs"]["FailoverUpstream"]
    assert set(upstream["properties"]) == {"url", "headers", "tls"}
    assert upstream["properties"]["url"]["type"] == "string"


def _secret_policy(tree: Tree, tmp_path: Path) -> None:
    key = tmp_path / "eu-key"
    key.write_text("eu-file-secret\n")
    tree.policy(
        "a.yaml",
        f"""\
        hosts: [api.example.com]
        upstream: https://api.example.com
        circuit_breaker: {{}}
        retries: {{max_attempts: 2}}
        failover:
          upstreams:
            - url: https://api.eu.example.com
              headers: {{set: {{Authorization: "Bearer ${{file:{key}}}", X-Api-Key: inline-secret}}}}
        """,
    )


def test_explain_and_config_show_failover_without_its_secrets(tree: Tree, tmp_path: Path) -> None:
    _secret_policy(tree, tmp_path)
    config = tree.load()
    shown = explain(config, "GET", "http://api.example.com/v1/x")
    assert "https://api.eu.example.com" in shown
    assert "circuit_open" in shown
    assert "eu-file-secret" not in shown
    assert "inline-secret" not in shown
    data = redacted_settings(config.policies[0].settings)
    written = data["failover"]["upstreams"][0]["headers"]["set"]
    assert written["Authorization"].startswith("Bearer ${file:")
    assert "inline-secret" not in written["X-Api-Key"]
    assert config.policies[0].settings.failover is not None  # the model itself keeps the value
    assert tmp_path / "eu-key" in config.files, "rotating the failover key reloads"


def test_lint_warns_about_inline_failover_secrets_and_missing_breaker_or_retries(
    tree: Tree, tmp_path: Path
) -> None:
    _secret_policy(tree, tmp_path)
    warnings = lint(tree.load())
    assert len(warnings) == 1
    assert "failover.upstreams[0].headers.set.X-Api-Key: warning: credential-looking" in warnings[0]
    assert "inline-secret" not in warnings[0]

    tree.policy(
        "a.yaml",
        """\
        hosts: [api.example.com]
        failover: {upstreams: [{url: 'https://api.eu.example.com'}]}
        """,
    )
    warnings = lint(tree.load())
    assert len(warnings) == 2
    assert "failover: warning: failover without a circuit_breaker section" in warnings[0]
    assert "failover: warning: failover without retries" in warnings[1]
