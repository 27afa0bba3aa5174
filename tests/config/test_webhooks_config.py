"""The ``webhooks`` main-config section: defaults, each validation error as FILE:LINE: key.path,
secrets that must render at load, watched secret files, the port claim and the inline-secret lint."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import defaults
from proxy.config.lint import lint
from proxy.config.loader import Config
from tests.config.test_loader import Tree, at


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return Tree(tmp_path.resolve())


def test_defaults_of_a_minimal_route(tree: Tree) -> None:
    (tree.root / "whsec").write_text("whsec_test\n")
    tree.main(
        """\
        webhooks:
          routes:
            - path: /webhooks/stripe
              verify: {scheme: stripe, secret: "${file:whsec}"}
              forward: http://127.0.0.1:8000/stripe/events
        """
    )
    webhooks = tree.load().main.webhooks
    assert webhooks is not None
    assert (webhooks.listen.host, webhooks.listen.port) == ("127.0.0.1", 15002)
    route = webhooks.routes[0]
    assert route.verify.tolerance == defaults.WEBHOOK_TOLERANCE_S == 300
    assert route.verify.secret == "${file:whsec}"  # the model keeps the template, never the secret
    assert route.dedupe == 72 * 3600
    assert route.max_body_bytes == 1024 * 1024
    assert (route.delivery.max_attempts, route.delivery.ttl) == (20, 72 * 3600)
    assert (route.delivery.backoff.base, route.delivery.backoff.max) == (1, 600)


def test_no_webhooks_section_means_no_listener(tree: Tree) -> None:
    tree.main()
    assert tree.load().main.webhooks is None


def test_every_key_as_written(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACME_OLD", "old")
    monkeypatch.setenv("ACME_NEW", "new")
    tree.main(
        """\
        webhooks:
          listen: {host: 0.0.0.0, port: 18080}
          routes:
            - path: /hooks/acme
              verify:
                scheme: hmac
                secrets: ["${env:ACME_OLD}", "${env:ACME_NEW}"]
                header: X-Acme-Signature
                algorithm: sha512
                encoding: base64
                prefix: "sha512="
                id_header: X-Acme-Event
              forward: http://127.0.0.1:8000/acme
              dedupe: 1h
              max_body_bytes: 64KiB
              delivery: {max_attempts: 5, backoff: {base: 2s}, ttl: 24h}
        """
    )
    webhooks = tree.load().main.webhooks
    assert webhooks is not None
    route = webhooks.routes[0]
    assert webhooks.listen.host == "0.0.0.0"
    assert route.verify.templates == ("${env:ACME_OLD}", "${env:ACME_NEW}")
    assert (route.verify.algorithm, route.verify.encoding, route.verify.prefix) == (
        "sha512",
        "base64",
        "sha512=",
    )
    assert (route.dedupe, route.max_body_bytes) == (3600, 64 * 1024)
    assert (route.delivery.backoff.base, route.delivery.backoff.max) == (2, 600)


@pytest.mark.parametrize(
    ("route", "line", "message"),
    [
        (
            "verify: {scheme: twilio, secret: x}",
            8,
            "webhooks.routes[0].verify: scheme twilio needs public_url: the URL Twilio calls",
        ),
        (
            "verify: {scheme: hmac, secret: x}",
            8,
            "webhooks.routes[0].verify: scheme hmac needs header: the header that carries the signature",
        ),
        (
            "verify: {scheme: github, secret: x, tolerance: 5m}",
            8,
            "webhooks.routes[0].verify: tolerance does not apply: scheme github signs no timestamp",
        ),
        (
            "verify: {scheme: stripe, secret: x, header: X-Sig}",
            8,
            "webhooks.routes[0].verify: header do not apply to scheme stripe",
        ),
        (
            "verify: {scheme: stripe, secret: x, secrets: [y]}",
            8,
            "webhooks.routes[0].verify: set exactly one of secret or secrets",
        ),
        ("verify: {scheme: stripe}", 8, "webhooks.routes[0].verify: set exactly one of secret or secrets"),
        (
            "verify: {scheme: stripe, secrets: []}",
            8,
            "webhooks.routes[0].verify.secrets: secrets needs at least 1 item",
        ),
        ("verify: {scheme: paypal, secret: x}", 8, "webhooks.routes[0].verify.scheme:"),
        (
            "verify: {scheme: twilio, secret: x, public_url: 'https://h.example/t?x=1'}",
            8,
            "webhooks.routes[0].verify.public_url: public_url 'https://h.example/t?x=1' may not carry",
        ),
        ("verify: {scheme: stripe, secret: x, tolerance: soon}", 8, "webhooks.routes[0].verify.tolerance:"),
    ],
)
def test_bad_verify_sections(tree: Tree, route: str, line: int, message: str) -> None:
    tree.main(
        f"""\
        webhooks:
          routes:
            - path: /w
              forward: http://127.0.0.1:8000/
              {route}
        """
    )
    problems = tree.problems()
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{tree.config}:{line}: {message}"), problems


def test_bad_route_keys(tree: Tree) -> None:
    tree.main(
        """\
        webhooks:
          listen: {host: example.com, port: 0}
          routes:
            - path: webhooks/stripe
              verify: {scheme: github, secret: x}
              forward: ftp://app/events
              max_body_bytes: lots
              colour: blue
            - path: /dup
              verify: {scheme: github, secret: x}
              forward: http://127.0.0.1:8000/
            - path: /dup
              verify: {scheme: github, secret: x}
              forward: http://127.0.0.1:8000/
        """
    )
    problems = tree.problems()
    expected = [
        (5, "webhooks.listen.host: listen host must be an IP address (e.g. 127.0.0.1) or localhost"),
        (5, "webhooks.listen.port: Input should be greater than or equal to 1"),
        (7, "webhooks.routes[0].path: path must start with '/' and hold no query, fragment, '*' or spaces"),
        (
            9,
            "webhooks.routes[0].forward: forward 'ftp://app/events' must be an absolute http(s) URL",
        ),
        (10, "webhooks.routes[0].max_body_bytes:"),
        (11, "webhooks.routes[0].colour: unknown key"),
    ]
    for line, message in expected:
        assert any(p.startswith(f"{tree.config}:{line}: {message}") for p in problems), (message, problems)


def test_a_path_listed_twice(tree: Tree) -> None:
    tree.main(
        """\
        webhooks:
          routes:
            - {path: /dup, verify: {scheme: github, secret: x}, forward: "http://127.0.0.1:8000/"}
            - {path: /dup, verify: {scheme: github, secret: x}, forward: "http://127.0.0.1:8000/"}
        """
    )
    assert tree.problems() == at(tree.config, (5, "webhooks.routes: path /dup is listed twice"))


def test_a_secret_that_cannot_be_read_fails_at_load_at_its_key(tree: Tree) -> None:
    tree.main(
        """\
        webhooks:
          routes:
            - path: /w
              forward: http://127.0.0.1:8000/
              verify:
                scheme: github
                secrets: ["${file:present}", "${file:absent}", "${env:OUTRIGGER_TEST_UNSET_VAR}"]
        """
    )
    (tree.root / "present").write_text("k")
    assert tree.problems() == at(
        tree.config,
        (
            10,
            f"webhooks.routes[0].verify.secrets[1]: cannot read secret file {tree.root / 'absent'}:"
            " No such file or directory",
        ),
        (
            10,
            "webhooks.routes[0].verify.secrets[2]: environment variable OUTRIGGER_TEST_UNSET_VAR is not set",
        ),
    )


def test_a_standard_secret_that_is_not_base64_fails_at_load(tree: Tree) -> None:
    tree.main(
        """\
        webhooks:
          routes:
            - path: /w
              forward: http://127.0.0.1:8000/
              verify: {scheme: standard, secret: "whsec_not base64!"}
        """
    )
    assert tree.problems() == at(
        tree.config,
        (8, "webhooks.routes[0].verify.secret: a standard webhook secret is whsec_ followed by base64"),
    )


def test_the_webhook_port_may_not_be_another_listeners(tree: Tree) -> None:
    tree.main(
        """\
        webhooks:
          listen: {host: 127.0.0.1, port: 15000}
        """
    )
    assert tree.problems() == at(
        tree.config, (5, "webhooks.listen.port: port 15000 is already used by the admin listener")
    )


def test_a_policy_port_may_not_be_the_webhook_port(tree: Tree) -> None:
    tree.main("webhooks: {}\n")
    policy = tree.policy("a.yaml", "hosts: [a.test]\nlisten: 15002\n")
    assert tree.problems() == at(policy, (2, "listen: port 15002 is already used by the webhook listener"))


def test_webhook_secret_files_are_watched_for_rotation(tree: Tree) -> None:
    tree.main(
        """\
        webhooks:
          routes:
            - path: /w
              forward: http://127.0.0.1:8000/
              verify: {scheme: github, secrets: ["${file:old}", "${file:new}"]}
        """
    )
    (tree.root / "old").write_text("k1")
    (tree.root / "new").write_text("k2")
    config = tree.load()
    assert {tree.root / "old", tree.root / "new"} <= set(config.files)
    version = config.version
    (tree.root / "new").write_text("k3")
    assert tree.load().version != version


def inline(tree: Tree) -> Config:
    tree.main(
        """\
        webhooks:
          routes:
            - path: /w
              forward: http://127.0.0.1:8000/
              verify: {scheme: github, secrets: ["${file:key}", "typed-in-secret"]}
        """
    )
    (tree.root / "key").write_text("k")
    return tree.load()


def test_an_inline_webhook_secret_is_a_lint_warning_that_does_not_show_it(tree: Tree) -> None:
    warnings = lint(inline(tree))
    assert warnings == [
        f"{tree.config}:4: webhooks.routes[0].verify.secrets[1]: warning: webhook secret written inline;"
        " write it as ${file:PATH} or ${env:NAME} so the secret stays out of config files"
    ]
    assert "typed-in-secret" not in warnings[0]


def test_referenced_webhook_secrets_give_no_warning(tree: Tree) -> None:
    tree.main(
        """\
        webhooks:
          routes:
            - {path: /w, forward: "http://127.0.0.1:8000/", verify: {scheme: github, secret: "${file:key}"}}
        """
    )
    (tree.root / "key").write_text("k")
    assert lint(tree.load()) == []
