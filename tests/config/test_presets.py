"""Provider presets: each shipped preset loads and passes ``check --strict``; ``preset: NAME`` merges
as built-in < defaults < preset < policy < route; unknown names are reported; the files ship in
the package (a wheel holds them) and ``policies/presets`` is the same folder."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import yaml

from proxy.cli import main, policy_file_schema
from proxy.config import presets
from proxy.config.loader import Config, ConfigError, load_config
from proxy.config.model import Policy

REPO = Path(__file__).resolve().parents[2]
SHIPPED = ("anthropic", "aws", "github", "openai", "sendgrid", "slack", "stripe", "twilio")

MAIN = """\
listen: {host: 127.0.0.1, port: 15001}
admin: {host: 127.0.0.1, port: 15000}
policy_dirs: [policies/]
"""


def write(root: Path, policies: dict[str, str], main_extra: str = "") -> Path:
    """config.yaml (MAIN + `main_extra`, from line 4) and policies/<name> from literal YAML."""
    (root / "policies").mkdir(parents=True, exist_ok=True)
    config = root / "config.yaml"
    config.write_text(MAIN + textwrap.dedent(main_extra))
    for name, text in policies.items():
        (root / "policies" / name).write_text(textwrap.dedent(text))
    return config


def load(root: Path, policies: dict[str, str], main_extra: str = "") -> Config:
    return load_config(write(root, policies, main_extra))


def problems(root: Path, policies: dict[str, str]) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        load(root, policies)
    return caught.value.problems


def only(config: Config) -> Policy:
    (policy,) = config.policies
    return policy


def test_the_shipped_presets() -> None:
    assert presets.names() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_each_preset_used_by_name_passes_check_strict(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path, {"p.yaml": f"preset: {name}\n"})
    assert main(["check", "--strict", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "OK (1 policies" in out
    assert "warning" not in out


@pytest.mark.parametrize("name", SHIPPED)
def test_each_preset_file_is_a_policy_file_on_its_own(name: str, tmp_path: Path) -> None:
    """A preset copied into policies/ loads as it is: it is an ordinary policy file."""
    (tmp_path / "policies").mkdir()
    shutil.copy(presets.PRESET_DIR / f"{name}.yaml", tmp_path / "policies" / f"{name}.yaml")
    (tmp_path / "config.yaml").write_text(MAIN)
    policy = only(load_config(tmp_path / "config.yaml"))
    assert policy.preset is None
    assert policy.hosts == tuple(yaml.safe_load((presets.PRESET_DIR / f"{name}.yaml").read_text())["hosts"])


def test_a_preset_alone_is_a_whole_policy(tmp_path: Path) -> None:
    policy = only(load(tmp_path, {"stripe.yaml": "preset: stripe\n"}))
    assert policy.preset == "stripe"
    assert policy.hosts == ("api.stripe.com",)
    settings = policy.settings
    assert settings.idempotency is not None
    assert settings.idempotency.header == "Idempotency-Key"
    assert settings.retries is not None
    assert settings.retries.hint_header == "Stripe-Should-Retry"
    assert settings.rate_limit is not None
    assert settings.rate_limit.adaptive


def test_merge_order_builtin_defaults_preset_policy_route(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        {
            "stripe.yaml": """\
                preset: stripe
                timeouts: {total: 70s}
                headers: {set: {X-Team: payments}}
                retries: {on: [503]}
                rate_limit: {rate: 25}
                routes:
                  - match: {path: "/v1/reports*"}
                    timeouts: {per_try: 20s}
                """
        },
        main_extra="""\
            defaults:
              timeouts: {connect: 1s, idle: 7s}
              headers: {set: {X-Via: outrigger}}
            """,
    )
    policy = only(config)
    timeouts = policy.settings.timeouts
    assert timeouts.stream is None  # built-in: nobody sets it
    assert timeouts.idle == 7  # defaults: the preset does not set it
    assert timeouts.connect == 2  # preset (2s) over defaults (1s)
    assert timeouts.per_try == 25  # preset
    assert timeouts.total == 70  # policy over preset (80s)
    assert policy.settings.headers.set == {"X-Via": "outrigger", "X-Team": "payments"}
    retries = policy.settings.retries
    assert retries is not None
    assert retries.on == ("503",)  # a list replaces the preset's whole list ...
    assert retries.hint_header == "Stripe-Should-Retry"  # ... while its siblings stay
    assert retries.methods == ("GET", "HEAD", "DELETE")
    limit = policy.settings.rate_limit
    assert limit is not None
    assert (limit.rate, limit.per, limit.burst) == (25, 1, 100)
    (route,) = policy.routes
    assert route.settings.timeouts.per_try == 20  # route over preset
    assert route.settings.timeouts.total == 70
    assert route.settings.timeouts.idle == 7


def test_a_policy_can_switch_off_a_preset_section_and_rename_its_hosts(tmp_path: Path) -> None:
    policy = only(
        load(tmp_path, {"s.yaml": "preset: stripe\nhosts: [stripe.internal.test]\nrate_limit: null\n"})
    )
    assert policy.hosts == ("stripe.internal.test",)
    assert policy.settings.rate_limit is None
    assert policy.settings.idempotency is not None


def test_unknown_preset_is_one_problem_listing_the_known_ones(tmp_path: Path) -> None:
    found = problems(tmp_path, {"p.yaml": "timeouts: {total: 5s}\npreset: strpe\n"})
    names = ", ".join(SHIPPED)
    path = (tmp_path / "policies" / "p.yaml").resolve()
    assert found == (f"{path}:2: preset: unknown preset 'strpe': use one of {names}",)


def test_a_preset_that_is_not_a_name_is_reported_in_a_list_of_policies(tmp_path: Path) -> None:
    found = problems(tmp_path, {"p.yaml": "- preset: stripe\n- preset: [openai]\n"})
    path = (tmp_path / "policies" / "p.yaml").resolve()
    assert found == (f"{path}:2: [1].preset: unknown preset ['openai']: use one of {', '.join(SHIPPED)}",)


def test_a_bad_override_blames_the_policy_line(tmp_path: Path) -> None:
    found = problems(tmp_path, {"p.yaml": "preset: stripe\ntimeouts: {per_try: 90s}\n"})
    path = (tmp_path / "policies" / "p.yaml").resolve()
    assert found == (f"{path}:2: timeouts: per_try (90s) is longer than total (80s)",)


def preset_shelf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, text: str) -> Path:
    """A preset directory of our own holding `name`.yaml, in place of the shipped one."""
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    (shelf / f"{name}.yaml").write_text(text)
    monkeypatch.setattr(presets, "PRESET_DIR", shelf)
    return shelf


def test_two_policies_on_one_preset_clash_on_its_hosts(tmp_path: Path) -> None:
    """The hosts come from the preset: the clash is reported where the policy starts (line 3)."""
    found = problems(tmp_path, {"a.yaml": "preset: github\n", "b.yaml": "\n\npreset: github\n"})
    (problem,) = found
    b = (tmp_path / "policies" / "b.yaml").resolve()
    assert problem.startswith(f"{b}:3: hosts[0]: host api.github.com is already claimed by ")


def test_a_preset_with_routes_lends_them_unless_the_policy_has_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    preset_shelf(
        tmp_path,
        monkeypatch,
        "llm",
        "hosts: [llm.test]\n"
        "timeouts: {per_try: 5s, total: 20s}\n"
        "routes:\n"
        "  - match: {path: /stream*}\n"
        "    timeouts: {idle: 3s}\n",
    )
    lent = only(load(tmp_path / "a", {"a.yaml": "preset: llm\ntimeouts: {total: 15s}\n"}))
    (route,) = lent.routes
    assert route.match.path == "/stream*"
    assert (route.settings.timeouts.idle, route.settings.timeouts.total) == (3, 15)
    own = only(load(tmp_path / "b", {"b.yaml": "preset: llm\nroutes: []\n"}))
    assert own.routes == ()


def test_a_preset_route_error_points_into_the_preset_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shelf = preset_shelf(
        tmp_path,
        monkeypatch,
        "llm",
        "hosts: [llm.test]\nroutes:\n  - match: {path: /x}\n    timeouts: {per_try: 1m}\n",
    )
    found = problems(tmp_path, {"p.yaml": "preset: llm\n"})
    assert found == (f"{shelf / 'llm.yaml'}:4: routes[0].timeouts: per_try (1m) is longer than total (30s)",)


def test_explain_and_config_name_the_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write(tmp_path, {"s.yaml": "preset: stripe\n", "o.yaml": "hosts: [other.test]\n"})
    assert main(["explain", "-c", str(config), "POST", "http://api.stripe.com/v1/charges"]) == 0
    report = yaml.safe_load(capsys.readouterr().out)
    assert report["preset"] == "stripe"
    assert report["settings"]["retries"]["hint_header"] == "Stripe-Should-Retry"
    assert main(["explain", "-c", str(config), "GET", "http://other.test/"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["preset"] is None


def test_the_preset_file_is_part_of_the_config_version(tmp_path: Path) -> None:
    config = load(tmp_path, {"s.yaml": "preset: stripe\n"})
    assert presets.PRESET_DIR / "stripe.yaml" in config.files
    assert presets.PRESET_DIR / "openai.yaml" not in config.files


def test_the_schema_offers_the_preset_names() -> None:
    schema = policy_file_schema()
    assert schema["$defs"]["Policy"]["properties"]["preset"]["enum"] == list(SHIPPED)  # type: ignore[index]


def test_policies_presets_in_the_repository_is_the_package_folder() -> None:
    assert (REPO / "policies" / "presets").resolve() == presets.PRESET_DIR
    assert presets.PRESET_DIR == (REPO / "proxy" / "presets")


def test_a_wheel_ships_the_presets(tmp_path: Path) -> None:
    """Built from a copy of the sources, so the worktree gets no build/ or egg-info."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "proxy", source / "proxy", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path / "dist"),
            str(source),
        ],
        check=True,
        timeout=110,
    )
    (wheel,) = (tmp_path / "dist").glob("outrigger-*.whl")
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("proxy/presets/")}
    assert shipped == {f"proxy/presets/{name}.yaml" for name in SHIPPED}


def test_the_example_config_built_on_presets_passes_check_strict(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--strict", "-c", str(REPO / "config.example.yaml")]) == 0
    assert "warning" not in capsys.readouterr().out
    built = {p.name: p.preset for p in load_config(REPO / "config.example.yaml").policies}
    assert {name: preset for name, preset in built.items() if preset} == {
        "api.stripe.com": "stripe",
        "api.openai.com": "openai",
        "*.s3.eu-west-1.amazonaws.com": "aws",
    }


def test_a_preset_file_that_is_not_one_policy_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shelf = preset_shelf(tmp_path, monkeypatch, "two", "- hosts: [a.test]\n- hosts: [b.test]\n")
    assert problems(tmp_path, {"p.yaml": "preset: two\n"}) == (
        f"{shelf / 'two.yaml'}:1: (top level): a preset file must hold one policy (a mapping)",
    )
