"""The ``credentials`` section: loading with defaults, FILE:LINE errors, secret files watched, lint,
and redaction in explain and /config."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import defaults
from proxy.config.lint import lint
from proxy.explain import redacted_settings
from tests.config.test_loader import Tree, at

INLINE = "sk-inline-do-not-print"


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    t = Tree(tmp_path.resolve())
    t.main()
    return t


def test_oauth2_loads_with_defaults_and_its_secret_file_is_watched(
    tree: Tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OUTRIGGER_TEST_CLIENT_ID", "client-1")
    secret = tree.root / "client-secret"
    secret.write_text("one\n")
    tree.policy(
        "a.yaml",
        """\
        hosts: [api.example.com]
        credentials:
          oauth2:
            token_url: https://auth.example.com/oauth/token
            client_id: ${env:OUTRIGGER_TEST_CLIENT_ID}
            client_secret: ${file:client-secret}
        """,
    )
    config = tree.load()
    credentials = config.policies[0].settings.credentials
    assert credentials is not None
    assert credentials.oauth2 is not None
    assert credentials.oauth2.auth == defaults.OAUTH2_AUTH
    assert credentials.oauth2.refresh_before == defaults.OAUTH2_REFRESH_BEFORE_S
    assert credentials.oauth2.client_secret == "${file:client-secret}"  # the template, never the secret
    assert secret in config.files
    first = config.version
    secret.write_text("two\n")
    assert tree.load().version != first
    assert lint(config) == []


def test_key_values_are_watched_one_by_one(tree: Tree) -> None:
    for name in ("key-a", "key-b"):
        (tree.root / name).write_text(f"{name}\n")
    tree.policy(
        "a.yaml",
        """\
        hosts: [api.example.com]
        credentials:
          keys: {values: ["${file:key-a}", "${file:key-b}"]}
        """,
    )
    config = tree.load()
    assert {tree.root / "key-a", tree.root / "key-b"} <= set(config.files)
    keys = config.policies[0].settings.credentials.keys  # type: ignore[union-attr]
    assert keys is not None
    assert (keys.header, keys.format, keys.strategy, keys.cooldown_on) == (
        defaults.KEYS_HEADER,
        defaults.KEYS_FORMAT,
        defaults.KEYS_STRATEGY,
        defaults.KEYS_COOLDOWN_ON,
    )


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ("  keys: {values: []}\n", (3, "credentials.keys.values: values needs at least 1 item")),
        ("  keys: {values: [a, a]}\n", (3, "credentials.keys.values: a key is listed twice")),
        (
            "  keys: {values: [a], format: 'Bearer'}\n",
            (3, "credentials.keys.format: format must"),
        ),
        ("  keys: {values: [a], strategy: random}\n", (3, "credentials.keys.strategy: Input should be")),
        (
            "  keys: {values: [a], cooldown_on: [timeout]}\n",
            (3, "credentials.keys.cooldown_on[0]: 'timeout' is not a status"),
        ),
        (
            "  keys: {values: ['${file:missing-key}']}\n",
            (3, "credentials.keys.values[0]: cannot read secret"),
        ),
        (
            "  oauth2: {token_url: ftp://x, client_id: a, client_secret: b}\n",
            (3, "credentials.oauth2.token_url"),
        ),
        ("  oauth2: {token_url: 'https://a/t', client_id: a}\n", (3, "credentials.oauth2.client_secret")),
        (
            "  oauth2: {token_url: 'https://a/t', client_id: a, client_secret: b, auth: form}\n",
            (3, "credentials.oauth2.auth"),
        ),
        ("  {}\n", (2, "credentials: credentials needs oauth2 or keys")),
    ],
)
def test_bad_credentials_are_errors_with_file_line_and_key(
    tree: Tree, section: str, problem: tuple[int, str]
) -> None:
    policy = tree.policy("a.yaml", "hosts: [a.example.com]\ncredentials:\n" + section)
    (found,) = tree.problems()
    line, message = problem
    assert found.startswith(at(policy, (line, message))[0]), found


def test_both_kinds_at_once_are_an_error(tree: Tree) -> None:
    tree.policy(
        "a.yaml",
        """\
        hosts: [a.example.com]
        credentials:
          keys: {values: [a]}
          oauth2: {token_url: "https://a/t", client_id: a, client_secret: b}
        """,
    )
    (found,) = tree.problems()
    assert "set oauth2 or keys, not both" in found


def test_a_header_rule_on_the_credentials_header_is_an_error(tree: Tree) -> None:
    tree.policy(
        "a.yaml",
        """\
        hosts: [a.example.com]
        headers: {set: {X-Api-Key: "${env:HOME}"}}
        credentials:
          keys: {header: X-Api-Key, values: [a]}
        """,
    )
    (found,) = tree.problems()
    assert "headers sets or removes X-Api-Key, which credentials writes" in found


def test_inline_secrets_are_warned_about_and_redacted(tree: Tree) -> None:
    tree.policy(
        "a.yaml",
        f"""\
        hosts: [a.example.com]
        credentials:
          oauth2: {{token_url: "https://a/t", client_id: inline-id, client_secret: {INLINE}}}
        """,
    )
    tree.policy(
        "b.yaml",
        f"""\
        hosts: [b.example.com]
        credentials:
          keys: {{values: ["${{env:HOME}}", {INLINE}-2]}}
        """,
    )
    config = tree.load()
    warnings = lint(config)
    assert [w.split(": warning: ")[0].split(": ", 1)[1] for w in warnings] == [
        "credentials.oauth2.client_secret",
        "credentials.keys.values[1]",
    ]
    assert all("secret written inline" in w for w in warnings)
    assert not any(INLINE in w for w in warnings)

    oauth2 = redacted_settings(config.policies[0].settings)["credentials"]["oauth2"]
    assert oauth2["client_secret"] == "<redacted>"
    assert oauth2["client_id"] == "inline-id"
    keys = redacted_settings(config.policies[1].settings)["credentials"]["keys"]
    assert keys["values"] == ["${env:HOME}", "<redacted>"]


def test_cache_lint_knows_credentials_set_authorization(tree: Tree) -> None:
    tree.policy(
        "a.yaml",
        """\
        hosts: [a.example.com]
        cache: {key_headers: []}
        credentials:
          keys: {values: ["${env:HOME}"]}
        """,
    )
    assert lint(tree.load()) == []
