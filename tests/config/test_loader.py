"""The loader: one bad YAML per error message, each reported as ``FILE:LINE: key.path: message``.

Every YAML text is written literally so the expected line numbers can be read off the test.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from proxy.config.loader import Config, ConfigError, format_path, load_config
from proxy.config.model import PolicySettings, PolicyTarget

MAIN = """\
listen: {host: 127.0.0.1, port: 15001}
admin: {host: 127.0.0.1, port: 15000}
policy_dirs: [policies/]
"""
"""The main config used unless a test writes its own; extra lines start at line 4."""


class Tree:
    """A config folder: config.yaml plus policies/*.yaml, written from literal text."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.policies = root / "policies"
        self.policies.mkdir(exist_ok=True)
        self.config = root / "config.yaml"

    def main(self, extra: str = "", *, replace: str | None = None) -> Path:
        text = textwrap.dedent(replace) if replace is not None else MAIN + textwrap.dedent(extra)
        self.config.write_text(text)
        return self.config

    def policy(self, name: str, text: str) -> Path:
        path = self.policies / name
        path.write_text(textwrap.dedent(text))
        return path

    def load(self) -> Config:
        return load_config(self.config)

    def problems(self) -> tuple[str, ...]:
        with pytest.raises(ConfigError) as caught:
            load_config(self.config)
        assert str(caught.value) == "\n".join(caught.value.problems)
        return caught.value.problems


def at(path: Path, *problems: tuple[int, str]) -> tuple[str, ...]:
    """The problems ``FILE:LINE: key.path: message`` of `path`, from (LINE, "key.path: message") pairs."""
    return tuple(f"{path}:{line}: {message}" for line, message in problems)


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    t = Tree(tmp_path.resolve())
    t.main()
    return t


# --- valid configs -----------------------------------------------------------------------------


def test_a_valid_config_loads_with_sources_version_and_files(tree: Tree) -> None:
    a = tree.policy(
        "a.yaml",
        """\
        # Stripe
        hosts: [api.stripe.com]
        upstream: https://api.stripe.com
        """,
    )
    b = tree.policy(
        "b.yml",
        """\
        - hosts: ["*.example.com"]
        - hosts: [other.test]
          listen: 9001
        """,
    )
    config = tree.load()
    assert config.path == tree.config
    assert [(p.hosts, p.source) for p in config.policies] == [
        (("api.stripe.com",), f"{a}:2"),
        (("*.example.com",), f"{b}:1"),
        (("other.test",), f"{b}:2"),
    ]
    assert config.policies[2].listen == 9001
    assert str(config.policies[0].upstream) == "https://api.stripe.com"
    assert config.files == (tree.config, a, b)
    assert len(config.version) == 12
    assert int(config.version, 16) >= 0


def test_an_empty_config_file_means_all_defaults(tree: Tree) -> None:
    tree.main(replace="# nothing here\n")
    config = tree.load()
    assert config.main.listen.port == 15001
    assert config.main.admin.port == 15000
    assert config.main.unknown_hosts == "deny"
    assert config.policies == ()


def test_version_changes_when_a_policy_or_secret_file_changes(tree: Tree) -> None:
    secret = tree.root / "token"
    secret.write_text("one\n")
    tree.policy(
        "a.yaml",
        """\
        hosts: [a.example.com]
        headers:
          set: {Authorization: "Bearer ${file:token}"}
        """,
    )
    first = tree.load()
    assert secret in first.files
    assert tree.load().version == first.version
    secret.write_text("two\n")
    second = tree.load()
    assert second.version != first.version
    tree.policy("a.yaml", "hosts: [b.example.com]\n")
    assert tree.load().version not in (first.version, second.version)


def test_empty_policy_files_are_skipped(tree: Tree) -> None:
    tree.policy("empty.yaml", "# nothing yet\n")
    tree.policy("a.yaml", "hosts: [a.example.com]\n")
    assert [p.hosts for p in tree.load().policies] == [("a.example.com",)]


def test_dot_files_and_non_yaml_files_in_the_policy_dir_are_ignored(tree: Tree) -> None:
    tree.policy(".hidden.yaml", "bogus: [\n")
    tree.policy(".#a.yaml", "bogus: 1\n")
    tree.policy("notes.txt", "bogus: 1\n")
    tree.policy("a.yaml.bak", "bogus: 1\n")
    tree.policy("README.md", "# policies\n")
    (tree.policies / "sub.yaml.d").mkdir()
    tree.policy("a.yml", "hosts: [a.example.com]\n")
    tree.policy("b.yaml", "hosts: [b.example.com]\n")
    assert [p.hosts for p in tree.load().policies] == [("a.example.com",), ("b.example.com",)]


def test_several_policy_dirs_are_read_in_order(tree: Tree) -> None:
    tree.main(
        replace="""\
        listen: {host: 127.0.0.1, port: 15001}
        admin: {host: 127.0.0.1, port: 15000}
        policy_dirs: [policies/, more/]
        """
    )
    (tree.root / "more").mkdir()
    (tree.root / "more" / "a.yaml").write_text("hosts: [z.example.com]\n")
    tree.policy("z.yaml", "hosts: [a.example.com]\n")
    assert [p.hosts for p in tree.load().policies] == [("a.example.com",), ("z.example.com",)]


# --- unknown keys --------------------------------------------------------------------------------


UNKNOWN_KEYS_IN_THE_MAIN_CONFIG = [
    pytest.param("bogus: 1\n", [(4, "bogus: unknown key")], id="unknown-key-top-level"),
    pytest.param(
        """\
        defaults:
          timeouts: {total: 20s}
          nope: 2
        """,
        [(6, "defaults.nope: unknown key")],
        id="unknown-key-in-defaults",
    ),
]


UNKNOWN_KEYS_IN_A_POLICY = [
    pytest.param(
        """\
        hosts: [a.example.com]
        upstream: https://a.example.com
        timeout: 5s
        """,
        [(3, "timeout: unknown key")],
        id="unknown-key-top-level",
    ),
    pytest.param(
        """\
        hosts: [a.example.com]
        timeouts:
          per_try: 5s
          bogus: 1
        """,
        [(4, "timeouts.bogus: unknown key")],
        id="unknown-key-in-a-nested-section",
    ),
    pytest.param(
        """\
        hosts: [a.example.com]
        routes:
          - match: {method: POST}
            timeouts: {per_try: 5s}
            retry: 3
        """,
        [(5, "routes[0].retry: unknown key")],
        id="unknown-key-inside-a-route",
    ),
    pytest.param(
        """\
        hosts: [a.example.com]
        routes:
          - match: {path: /v1/*}
          - match: {method: POST}
            timeouts:
              nope: 1
        """,
        [(6, "routes[1].timeouts.nope: unknown key")],
        id="unknown-key-nested-inside-a-route",
    ),
    pytest.param(
        """\
        hosts: [a.example.com]
        routes:
          - match:
              method: POST
              query: a=1
        """,
        [(5, "routes[0].match.query: unknown key")],
        id="unknown-key-inside-a-route-match",
    ),
]


def test_unknown_key_in_a_nested_section_of_defaults(tree: Tree) -> None:
    tree.main(
        """\
        defaults:
          timeouts:
            bogus: 1
        """
    )
    tree.policy("a.yaml", "hosts: [a.example.com]\n")
    tree.policy("b.yaml", "hosts: [b.example.com]\n")
    # reported once, at the defaults, although every policy inherits it
    assert tree.problems() == (f"{tree.config}:6: defaults.timeouts.bogus: unknown key",)


# retries, circuit_breaker, rate_limit, concurrency and idempotency were rejected as unknown keys
# until they were implemented (commits 6c22ce7 and 4a15588); a misspelt section name still must be.
@pytest.mark.parametrize(
    "section", ["retry", "circuit-breaker", "circuitbreaker", "ratelimit", "concurency", "idempotency_key"]
)
def test_misspelt_sections_are_rejected_as_unknown_keys(tree: Tree, section: str) -> None:
    assert section not in PolicySettings.model_fields
    assert section not in PolicyTarget.model_fields
    a = tree.policy(
        "a.yaml",
        f"""\
        hosts: [a.example.com]
        {section}:
          enabled: true
        """,
    )
    assert tree.problems() == (f"{a}:2: {section}: unknown key",)


# --- wrong types and bad values ---------------------------------------------------------------


BAD_VALUES_IN_A_POLICY = [
    pytest.param(
        """\
        hosts: [a.example.com]
        allow_private_addresses: maybe
        """,
        [(2, "allow_private_addresses: Input should be a valid boolean, unable to interpret input")],
        id="wrong-type-for-a-boolean",
    ),
    pytest.param(
        """\
        hosts: [a.example.com]
        timeouts: 5s
        """,
        [(2, "timeouts: Input should be a valid dictionary or instance of Timeouts")],
        id="wrong-type-for-a-section",
    ),
    pytest.param(
        """\
        hosts: a.example.com
        listen: nine-thousand
        """,
        [
            (1, "hosts: Input should be a valid tuple"),
            (2, "listen: Input should be a valid integer, unable to parse string as an integer"),
        ],
        id="wrong-type-for-hosts-and-listen",
    ),
    pytest.param(
        "upstream: https://a.example.com\n",
        [(1, "hosts: required key is missing")],
        id="missing-hosts",
    ),
    pytest.param(
        "42\n",
        [(1, "(top level): a policy file must hold a policy (mapping) or a list of them")],
        id="a-policy-file-holding-a-scalar",
    ),
    pytest.param(
        """\
        - hosts: [a.example.com]
        - just-a-string
        """,
        [(2, "[1]: a policy must be a mapping")],
        id="a-list-item-that-is-not-a-mapping",
    ),
    pytest.param(
        """\
        hosts: [a.example.com]
        timeouts:
          connect: 5x
        """,
        [(3, "timeouts.connect: invalid duration '5x': use a number with ms, s, m or h (e.g. 250ms)")],
        id="bad-duration-unit",
    ),
    pytest.param(
        """\
        hosts: [a.example.com]
        timeouts:
          connect: -1
          per_try: 0s
        """,
        [
            (3, "timeouts.connect: a duration cannot be negative"),
            (4, "timeouts.per_try: Input should be greater than 0"),
        ],
        id="zero-and-negative-durations",
    ),
    pytest.param(
        """\
        hosts: [a.example.com]
        idempotency:
          replay:
            statuses: [2xx, timeout, 7xx]
        """,
        [
            (
                4,
                "idempotency.replay.statuses[1]: 'timeout' is not a status:"
                " use a status (201), a range (200-204) or a class (2xx)",
            ),
            (
                4,
                "idempotency.replay.statuses[2]: unknown condition '7xx': use connect-failure, reset,"
                " timeout, a status (503), a range (500-504) or a class (5xx)",
            ),
        ],
        id="replay-statuses-are-statuses-only",
    ),
]


@pytest.mark.parametrize(
    ("text", "problems"),
    [
        pytest.param(
            "- listen\n",
            [(1, "(top level): the config file must be a mapping")],
            id="a-main-config-that-is-not-a-mapping",
        ),
        pytest.param(
            """\
            listen:
              host: example.com
              port: 15001
            """,
            [(2, "listen.host: listen host must be an IP address (e.g. 127.0.0.1) or localhost")],
            id="listen-host-must-be-an-ip-address",
        ),
    ],
)
def test_bad_main_config_as_a_whole(tree: Tree, text: str, problems: list[tuple[int, str]]) -> None:
    tree.main(replace=text)
    assert tree.problems() == at(tree.config, *problems)


BAD_VALUES_IN_THE_MAIN_CONFIG = [
    pytest.param(
        """\
        limits:
          max_headers: 50
          max_header_bytes: 10XB
        """,
        [
            (
                6,
                "limits.max_header_bytes: invalid size '10XB':"
                " use an integer with B, KiB, MiB or GiB (e.g. 1MiB)",
            )
        ],
        id="bad-size",
    ),
    pytest.param(
        "limits: {max_header_bytes: 512B}\n",
        [(4, "limits.max_header_bytes: Input should be greater than or equal to 1024")],
        id="size-below-its-minimum",
    ),
    pytest.param(
        "unknown_hosts: maybe\n",
        [(4, "unknown_hosts: Input should be 'deny' or 'allow'")],
        id="bad-unknown-hosts-value",
    ),
]


# --- timeouts ordering, including after merging defaults --------------------------------------------


TIMEOUTS_OUT_OF_ORDER_IN_A_POLICY = [
    pytest.param(
        """\
        hosts: [a.example.com]
        timeouts:
          per_try: 40s
        """,
        [(2, "timeouts: per_try (40s) is longer than total (30s)")],
        id="per-try-longer-than-total",
    ),
    pytest.param(
        """\
        hosts: [a.example.com]
        timeouts: {total: 20s}
        routes:
          - match: {method: GET}
          - match: {method: POST}
            timeouts:
              per_try: 25s
        """,
        [(6, "routes[1].timeouts: per_try (25s) is longer than total (20s)")],
        id="per-try-longer-than-total-in-a-route-blames-the-route",
    ),
    pytest.param(
        """\
        hosts: [a.example.com]
        timeouts:
          connect: 11s
        """,
        [(2, "timeouts: connect (11s) is longer than per_try (10s)")],
        id="connect-longer-than-per-try",
    ),
]


def test_per_try_longer_than_total_only_after_merging_blames_the_policy(tree: Tree) -> None:
    tree.main(
        """\
        defaults:
          timeouts:
            per_try: 20s
        """
    )
    a = tree.policy(
        "a.yaml",
        """\
        hosts: [a.example.com]

        timeouts:
          total: 10s
        """,
    )
    tree.policy("b.yaml", "hosts: [b.example.com]\n")  # inherits per_try 20s < total 30s: fine
    assert tree.problems() == (f"{a}:3: timeouts: per_try (20s) is longer than total (10s)",)


def test_per_try_longer_than_total_in_defaults_blames_the_defaults_once(tree: Tree) -> None:
    tree.main(
        """\
        defaults:
          timeouts:
            total: 5s
        """
    )
    tree.policy("a.yaml", "hosts: [a.example.com]\n")
    tree.policy("b.yaml", "hosts: [b.example.com]\n")
    assert tree.problems() == (
        f"{tree.config}:5: defaults.timeouts: per_try (10s) is longer than total (5s)",
    )


def test_bad_value_in_defaults_blames_the_defaults_even_when_a_policy_has_the_section(tree: Tree) -> None:
    tree.main(
        """\
        defaults:
          timeouts:
            per_try: soon
        """
    )
    tree.policy(
        "a.yaml",
        """\
        hosts: [a.example.com]
        timeouts:
          total: 20s
        """,
    )
    assert tree.problems() == (
        f"{tree.config}:6: defaults.timeouts.per_try: invalid duration 'soon':"
        " use a number with ms, s, m or h (e.g. 250ms)",
    )


# --- hosts, wildcards, claims and ports ---------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        (
            "a*.b.com",
            "bad wildcard 'a*.b.com': '*' is only allowed as the whole first label ('*.example.com')",
        ),
        (
            "*.com",
            "bad wildcard '*.com': use '*.' followed by a domain with at least two labels,"
            " e.g. '*.example.com'",
        ),
        ("*", "bad wildcard '*': '*' is only allowed as the whole first label ('*.example.com')"),
        (
            "api.*.com",
            "bad wildcard 'api.*.com': '*' is only allowed as the whole first label ('*.example.com')",
        ),
        ("bad_host.com", "invalid host name 'bad_host.com'"),
        ("-a.example.com", "invalid host name '-a.example.com'"),
    ],
)
def test_bad_host_patterns(tree: Tree, pattern: str, message: str) -> None:
    a = tree.policy(
        "a.yaml",
        f"""\
        hosts:
          - ok.example.com
          - "{pattern}"
        """,
    )
    assert tree.problems() == (f"{a}:3: hosts[1]: {message}",)


def test_a_single_bad_host_is_reported_once(tree: Tree) -> None:
    a = tree.policy("a.yaml", 'hosts: ["*.com"]\n')
    assert tree.problems() == (
        f"{a}:1: hosts[0]: bad wildcard '*.com': use '*.' followed by a domain with at least two labels,"
        " e.g. '*.example.com'",
    )


def test_empty_hosts_list(tree: Tree) -> None:
    a = tree.policy("a.yaml", "hosts: []\n")
    (problem,) = tree.problems()
    assert problem.startswith(f"{a}:1: hosts: ")
    assert "at least 1 item" in problem


def test_host_names_are_normalised(tree: Tree) -> None:
    tree.policy("a.yaml", 'hosts: [API.Example.COM., "*.Svc.Example.com", 10.1.2.3]\n')
    assert tree.load().policies[0].hosts == ("api.example.com", "*.svc.example.com", "10.1.2.3")


def test_host_claimed_twice_across_two_files(tree: Tree) -> None:
    a = tree.policy("a.yaml", "hosts: [API.example.com]\n")
    b = tree.policy(
        "b.yaml",
        """\
        hosts:
          - other.example.com
          - api.example.com.
        """,
    )
    assert tree.problems() == (f"{b}:3: hosts[1]: host api.example.com is already claimed by {a}:1",)


def test_wildcard_claimed_twice(tree: Tree) -> None:
    a = tree.policy(
        "a.yaml",
        """\
        - hosts: ["*.example.com"]
        - hosts: [x.test, "*.EXAMPLE.com"]
        """,
    )
    assert tree.problems() == (f"{a}:2: [1].hosts[1]: host *.example.com is already claimed by {a}:1",)


def test_listen_port_clash_between_two_policies(tree: Tree) -> None:
    a = tree.policy(
        "a.yaml",
        """\
        hosts: [a.example.com]
        listen: 9001
        """,
    )
    b = tree.policy(
        "b.yaml",
        """\
        hosts: [b.example.com]
        upstream: https://b.example.com
        listen: 9001
        """,
    )
    assert tree.problems() == (f"{b}:3: listen: port 9001 is already used by {a}:1",)


@pytest.mark.parametrize(("port", "owner"), [(15001, "the main listener"), (15000, "the admin listener")])
def test_listen_port_clash_with_the_main_and_admin_ports(tree: Tree, port: int, owner: str) -> None:
    a = tree.policy(
        "a.yaml",
        f"""\
        hosts: [a.example.com]
        listen: {port}
        """,
    )
    assert tree.problems() == (f"{a}:2: listen: port {port} is already used by {owner}",)


BAD_LISTEN_IN_A_POLICY = [
    # a request on a dedicated port names no host: it goes to https://<first host>,
    # which a wildcard is not
    pytest.param(
        """\
        hosts: ["*.example.com", a.example.com]
        listen: 9001
        """,
        [(2, "listen: a policy with listen needs upstream or an exact first host")],
        id="listen-without-upstream-needs-an-exact-first-host",
    ),
    pytest.param(
        """\
        hosts: [a.example.com]
        listen: 70000
        """,
        [(2, "listen: Input should be less than or equal to 65535")],
        id="listen-port-out-of-range",
    ),
]


@pytest.mark.parametrize(
    "text",
    [
        'hosts: ["*.example.com"]\nlisten: 9001\nupstream: https://a.example.com\n',
        'hosts: [a.example.com, "*.example.com"]\nlisten: 9001\n',
    ],
    ids=["with-upstream", "exact-first-host"],
)
def test_listen_with_upstream_or_an_exact_first_host_is_fine(tree: Tree, text: str) -> None:
    tree.policy("a.yaml", text)
    assert tree.load().policies[0].listen == 9001


def test_main_listen_port_equal_to_admin_port_is_an_error(tree: Tree) -> None:
    tree.main(
        replace="""\
        listen: {host: 127.0.0.1, port: 15001}
        admin: {host: 127.0.0.1, port: 15001}
        """
    )
    (problem,) = tree.problems()
    assert problem.startswith(f"{tree.config}:")
    assert problem.endswith(": listen and admin both use port 15001")


def test_main_listen_port_equal_to_admin_port_points_at_the_port(tree: Tree) -> None:
    tree.main(
        replace="""\
        # main config
        unknown_hosts: deny
        listen:
          host: 127.0.0.1
          port: 15001
        admin:
          host: 127.0.0.1
          port: 15001
        """
    )
    (problem,) = tree.problems()
    assert problem == f"{tree.config}:8: admin.port: listen and admin both use port 15001"


def test_main_listen_port_equal_to_default_admin_port(tree: Tree) -> None:
    tree.main(replace="listen: {host: 127.0.0.1, port: 15000}\n")
    (problem,) = tree.problems()
    assert problem.endswith("listen and admin both use port 15000")


# --- upstreams -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("upstream", "message"),
    [
        (
            "https://a.example.com/v1",
            "upstream 'https://a.example.com/v1' may not carry a path, query, fragment or credentials",
        ),
        (
            "https://a.example.com?x=1",
            "upstream 'https://a.example.com?x=1' may not carry a path, query, fragment or credentials",
        ),
        (
            "https://user:pw@a.example.com",
            "upstream 'https://user:pw@a.example.com' may not carry a path, query, fragment or credentials",
        ),
        ("ftp://a.example.com", "upstream 'ftp://a.example.com' must look like https://host[:port]"),
        ("a.example.com", "upstream 'a.example.com' must look like https://host[:port]"),
        ("https://", "upstream 'https://' must look like https://host[:port]"),
    ],
)
def test_invalid_upstream(tree: Tree, upstream: str, message: str) -> None:
    a = tree.policy(
        "a.yaml",
        f"""\
        hosts: [a.example.com]
        upstream: "{upstream}"
        """,
    )
    assert tree.problems() == (f"{a}:2: upstream: {message}",)


@pytest.mark.parametrize(
    ("upstream", "expected"),
    [
        ("https://A.Example.com", "https://a.example.com"),
        ("https://a.example.com/", "https://a.example.com"),
        ("https://a.example.com:443", "https://a.example.com"),
        ("http://a.example.com", "http://a.example.com"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("https://[::1]:8443", "https://[::1]:8443"),
    ],
)
def test_valid_upstreams_are_normalised(tree: Tree, upstream: str, expected: str) -> None:
    tree.policy("a.yaml", f'hosts: [a.example.com]\nupstream: "{upstream}"\n')
    assert str(tree.load().policies[0].upstream) == expected


# --- YAML itself --------------------------------------------------------------------------------


INVALID_YAML_IN_A_POLICY = [
    pytest.param(
        """\
        hosts: [a.example.com]
        upstream: https://a.example.com
          timeouts: {}
        """,
        [(3, "(top level): invalid YAML: mapping values are not allowed here")],
        id="yaml-syntax-error-reports-its-line",
    ),
    pytest.param(
        """\
        hosts: [a.example.com]
        timeouts:
          total: 20s
          total: 25s
        """,
        [(4, "(top level): invalid YAML: duplicate key 'total'")],
        id="yaml-duplicate-key",
    ),
]


def test_yaml_syntax_error_in_the_main_config(tree: Tree) -> None:
    tree.main("defaults: {timeouts: [\n")
    (problem,) = tree.problems()
    assert problem.startswith(f"{tree.config}:5: (top level): invalid YAML: ")


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path.resolve() / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(missing)
    assert caught.value.problems == (
        f"{missing}:1: (top level): cannot read file: No such file or directory",
    )


def test_missing_policy_dir(tree: Tree) -> None:
    tree.main(
        replace="""\
        listen: {host: 127.0.0.1, port: 15001}
        admin: {host: 127.0.0.1, port: 15000}
        policy_dirs:
          - policies/
          - missing/
        """
    )
    assert tree.problems() == (f"{tree.config}:5: policy_dirs[1]: not a directory: {tree.root / 'missing'}",)


# --- secrets and TLS files -------------------------------------------------------------------------


def test_header_referencing_an_unset_environment_variable(
    tree: Tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OUTRIGGER_TEST_MISSING", raising=False)
    a = tree.policy(
        "a.yaml",
        """\
        hosts: [a.example.com]
        headers:
          set:
            Authorization: Bearer ${env:OUTRIGGER_TEST_MISSING}
        """,
    )
    assert tree.problems() == (
        f"{a}:4: headers.set.Authorization: environment variable OUTRIGGER_TEST_MISSING is not set",
    )


BAD_HEADER_RULES = [
    pytest.param(
        """\
        hosts: [a.example.com]
        headers:
          set:
            Authorization: Bearer ${file:/nonexistent/outrigger/key}
        """,
        [
            (
                4,
                "headers.set.Authorization: cannot read secret file /nonexistent/outrigger/key:"
                " No such file or directory",
            )
        ],
        id="header-referencing-a-missing-file",
    ),
    pytest.param(
        """\
        hosts: [a.example.com]
        headers:
          set:
            X-A: "a\\r\\nInjected: 1"
        """,
        [(4, "headers.set.X-A: a header value may not contain CR, LF or NUL")],
        id="header-value-with-a-newline-is-rejected",
    ),
    pytest.param(
        """\
        hosts: [a.example.com]
        headers:
          set:
            "Bad Name": x
          remove: [X-Ok, "no good"]
        """,
        [
            (4, "headers.set.Bad Name: invalid header name 'Bad Name'"),
            (5, "headers.remove[1]: invalid header name 'no good'"),
        ],
        id="invalid-header-names",
    ),
]


def test_unresolvable_secret_points_at_the_header_line(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OUTRIGGER_TEST_MISSING", raising=False)
    a = tree.policy(
        "a.yaml",
        """\
        hosts: [a.example.com]
        headers:
          set:
            X-Client: outrigger
            Authorization: Bearer ${env:OUTRIGGER_TEST_MISSING}
        """,
    )
    (problem,) = tree.problems()
    assert problem.startswith(f"{a}:5: headers.set.Authorization: ")


def test_tls_client_key_without_client_cert(tree: Tree) -> None:
    (tree.root / "client.key").write_text("not really a key\n")
    a = tree.policy(
        "a.yaml",
        """\
        hosts: [a.example.com]
        tls:
          verify: true
          client_key: client.key
        """,
    )
    assert tree.problems() == (f"{a}:2: tls: client_key is set but client_cert is not",)


def test_tls_ca_file_missing(tree: Tree) -> None:
    a = tree.policy(
        "a.yaml",
        """\
        hosts: [a.example.com]
        tls:
          ca_file: certs/ca.pem
        """,
    )
    assert tree.problems() == (f"{a}:3: tls.ca_file: file not found: {tree.root / 'certs' / 'ca.pem'}",)


def test_tls_ca_file_that_is_not_a_certificate(tree: Tree) -> None:
    (tree.root / "ca.pem").write_text("not a certificate\n")
    a = tree.policy(
        "a.yaml",
        """\
        hosts: [a.example.com]
        tls: {ca_file: ca.pem}
        """,
    )
    (problem,) = tree.problems()
    assert problem.startswith(f"{a}:2: tls: cannot load TLS files: ")


def test_invalid_sni(tree: Tree) -> None:
    a = tree.policy(
        "a.yaml",
        """\
        hosts: [a.example.com]
        tls:
          sni: "not a host"
        """,
    )
    assert tree.problems() == (f"{a}:3: tls.sni: invalid SNI host name 'not a host'",)


# --- lists of policies, several problems in one run -------------------------------------------------


KEY_PATHS_IN_LISTS = [
    pytest.param(
        """\
        - hosts: [a.example.com]
          timeouts: {total: 20s}
        - hosts: [b.example.com]
          timeouts:
            bogus: 1
        """,
        [(5, "[1].timeouts.bogus: unknown key")],
        id="a-policy-file-holding-a-list-prefixes-key-paths-with-the-index",
    ),
    pytest.param(
        """\
        hosts: [a.example.com]
        routes:
          - match: {method: POST}
            bogus: 1
          - match: {path: /x}
            timeouts:
              per_try: 40s
        """,
        [
            (4, "routes[0].bogus: unknown key"),
            (6, "routes[1].timeouts: per_try (40s) is longer than total (30s)"),
        ],
        id="problems-in-every-route-are-reported",
    ),
]


def test_all_problems_of_one_run_are_reported(tree: Tree) -> None:
    tree.main(
        """\
        bogus: 1
        limits: {max_header_bytes: 10XB}
        """
    )
    # written in reverse order: files are read sorted by name, whatever the directory order
    b = tree.policy(
        "b.yaml",
        """\
        - hosts: [b.example.com]
          listen: 9001
        - hosts: [c.example.com, B.example.com]
          listen: 9001
        """,
    )
    a = tree.policy(
        "a.yaml",
        """\
        hosts: [ok.example.com, "a*.b.com"]
        upstream: ftp://a.example.com
        timeouts:
          bogus: 1
        """,
    )
    expected = (
        f"{tree.config}:5: limits.max_header_bytes: invalid size '10XB':"
        " use an integer with B, KiB, MiB or GiB (e.g. 1MiB)",
        f"{tree.config}:4: bogus: unknown key",
        f"{a}:1: hosts[1]: bad wildcard 'a*.b.com': '*' is only allowed as the whole first label"
        " ('*.example.com')",
        f"{a}:2: upstream: upstream 'ftp://a.example.com' must look like https://host[:port]",
        f"{a}:4: timeouts.bogus: unknown key",
        f"{b}:3: [1].hosts[1]: host b.example.com is already claimed by {b}:1",
        f"{b}:4: [1].listen: port 9001 is already used by {b}:1",
    )
    problems = tree.problems()
    assert problems == expected
    # the same input gives the same problems in the same order
    assert tree.problems() == problems


def test_config_error_lists_each_problem_once(tree: Tree) -> None:
    tree.main(
        """\
        defaults:
          timeouts: {connect: 5x}
        """
    )
    for name in ("a.yaml", "b.yaml", "c.yaml"):
        tree.policy(name, f"hosts: [{name[0]}.example.com]\n")
    assert len(tree.problems()) == 1


def test_policy_port_clash_with_admin_is_reported_even_when_the_main_config_has_errors(tree: Tree) -> None:
    tree.main("bogus: 1\n")
    a = tree.policy(
        "a.yaml",
        """\
        hosts: [a.example.com]
        listen: 15000
        """,
    )
    assert tree.problems() == (
        f"{tree.config}:4: bogus: unknown key",
        f"{a}:2: listen: port 15000 is already used by the admin listener",
    )


def test_two_policies_on_one_line_keep_their_own_key_paths(tree: Tree) -> None:
    tree.policy("a.yaml", "hosts: [x.example.com]\n")
    b = tree.policy("b.yaml", "[{hosts: [q.example.com, x.example.com]}, {hosts: [y.example.com]}]\n")
    (problem,) = tree.problems()
    assert problem.startswith(f"{b}:1: [0].hosts[1]: host x.example.com is already claimed")


# --- helpers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "text"),
    [
        ((), ""),
        (("timeouts",), "timeouts"),
        (("timeouts", "per_try"), "timeouts.per_try"),
        (("routes", 0, "timeouts"), "routes[0].timeouts"),
        ((1, "hosts", 2), "[1].hosts[2]"),
        (("policy_dirs", 1), "policy_dirs[1]"),
    ],
)
def test_format_path(path: tuple[str | int, ...], text: str) -> None:
    assert format_path(path) == text


# --- the tables above: one bad file each, and exactly the problems it must get -----------------------


@pytest.mark.parametrize(
    ("text", "problems"),
    [
        *UNKNOWN_KEYS_IN_A_POLICY,
        *BAD_VALUES_IN_A_POLICY,
        *TIMEOUTS_OUT_OF_ORDER_IN_A_POLICY,
        *BAD_LISTEN_IN_A_POLICY,
        *INVALID_YAML_IN_A_POLICY,
        *BAD_HEADER_RULES,
        *KEY_PATHS_IN_LISTS,
    ],
)
def test_a_bad_policy_file_gets_exactly_its_problems(
    tree: Tree, text: str, problems: list[tuple[int, str]]
) -> None:
    a = tree.policy("a.yaml", text)
    assert tree.problems() == at(a, *problems)


@pytest.mark.parametrize(
    ("extra", "problems"),
    [
        *UNKNOWN_KEYS_IN_THE_MAIN_CONFIG,
        *BAD_VALUES_IN_THE_MAIN_CONFIG,
    ],
)
def test_a_bad_main_config_gets_exactly_its_problems(
    tree: Tree, extra: str, problems: list[tuple[int, str]]
) -> None:
    """`extra` is added to the default main config, so its first line is line 4."""
    tree.main(extra)
    assert tree.problems() == at(tree.config, *problems)


# --- fallback and faults (SPEC 9) ---------------------------------------------------------------


def test_fallback_and_faults_errors_point_at_their_keys(tree: Tree) -> None:
    path = tree.policy(
        "a.yaml",
        """\
        hosts: [a.test]
        fallback:
          on: [circuit_open, connect-failure, 5xx]
          status: 150
          headers: {Content-Length: "3"}
        faults:
          abort: {status: 503, percent: 120}
          delay: {duration: 2x, percent: 5}
        """,
    )
    problems = tree.problems()
    assert problems == at(
        path,
        (
            3,
            "fallback.on[1]: unknown fallback condition 'connect-failure': use circuit_open, timeout,"
            " upstream_unreachable, rate_limited, overloaded, a status (503), a range (500-504)"
            " or a class (5xx)",
        ),
        (4, "fallback.status: Input should be greater than or equal to 200"),
        (
            5,
            "fallback.headers.Content-Length: 'Content-Length' is set by Outrigger itself"
            " and cannot be declared",
        ),
        (7, "faults.abort.percent: Input should be less than or equal to 100"),
        (8, "faults.delay.duration: invalid duration '2x': use a number with ms, s, m or h (e.g. 250ms)"),
    ), problems


def test_fallback_and_faults_load_with_defaults_and_a_route_may_override_the_fallback(tree: Tree) -> None:
    tree.policy(
        "a.yaml",
        """\
        hosts: [a.test]
        fallback: {}
        faults:
          abort: {percent: 10}
        routes:
          - match: {method: GET, path: "/v1/catalog*"}
            fallback: {status: 200, body: "[]"}
        """,
    )
    (policy,) = tree.load().policies
    assert policy.settings.fallback is not None
    assert policy.settings.fallback.on == (
        "circuit_open",
        "timeout",
        "upstream_unreachable",
        "rate_limited",
        "overloaded",
        "5xx",
    )
    assert policy.settings.fallback.status == 503
    assert policy.settings.fallback.headers == {"Content-Type": "application/json"}
    assert policy.settings.fallback.body == '{"degraded": true}'
    assert policy.settings.faults is not None
    assert policy.settings.faults.header_only is True
    assert policy.settings.faults.abort is not None
    assert policy.settings.faults.abort.status == 503
    route = policy.routes[0].settings
    assert route.fallback is not None
    assert (route.fallback.status, route.fallback.body, route.fallback.on) == (
        200,
        "[]",
        policy.settings.fallback.on,
    )
    assert route.faults == policy.settings.faults
