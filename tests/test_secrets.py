"""``${env:NAME}`` / ``${file:PATH}`` references in header values, and what may be shown of them."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.secrets import REDACTED, SecretError, has_reference, redact, referenced_files, render

# --- render -------------------------------------------------------------------------------------


def test_render_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OUTRIGGER_TEST_TOKEN", "sk_test_123")
    assert render("Bearer ${env:OUTRIGGER_TEST_TOKEN}", tmp_path) == "Bearer sk_test_123"


def test_render_empty_env_value(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OUTRIGGER_TEST_EMPTY", "")
    assert render("x${env:OUTRIGGER_TEST_EMPTY}y", tmp_path) == "xy"


def test_render_relative_file_resolves_against_the_base_dir(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "key").write_text("sk_file_456\n")
    assert render("Bearer ${file:secrets/key}", tmp_path) == "Bearer sk_file_456"


def test_render_absolute_file_ignores_the_base_dir(tmp_path: Path) -> None:
    secret = tmp_path / "key"
    secret.write_text("abs")
    assert render(f"${{file:{secret}}}", Path("/nonexistent")) == "abs"


@pytest.mark.parametrize(
    ("content", "rendered"),
    [
        ("token\n", "token"),  # as `kubectl create secret --from-file` writes it
        ("token", "token"),
        ("", ""),
        ("\n", ""),
        ("  spaced token  \n", "  spaced token  "),
    ],
)
def test_render_file_strips_one_trailing_newline(tmp_path: Path, content: str, rendered: str) -> None:
    (tmp_path / "key").write_text(content)
    assert render("${file:key}", tmp_path) == rendered


def test_render_several_references_and_literal_text(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OUTRIGGER_TEST_USER", "alice")
    (tmp_path / "pw").write_text("s3cret\n")
    assert render("u=${env:OUTRIGGER_TEST_USER};p=${file:pw};", tmp_path) == "u=alice;p=s3cret;"


@pytest.mark.parametrize("template", ["", "plain value", "Bearer abc", "${unknown:X}", "$env:X", "${env:}"])
def test_render_leaves_text_without_references_alone(tmp_path: Path, template: str) -> None:
    assert render(template, tmp_path) == template
    assert not has_reference(template)


def test_render_reads_the_file_each_time(tmp_path: Path) -> None:
    secret = tmp_path / "key"
    secret.write_text("one\n")
    assert render("${file:key}", tmp_path) == "one"
    secret.write_text("two\n")
    assert render("${file:key}", tmp_path) == "two"


def test_unset_env_raises(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("OUTRIGGER_TEST_UNSET", raising=False)
    with pytest.raises(SecretError, match="environment variable OUTRIGGER_TEST_UNSET is not set"):
        render("Bearer ${env:OUTRIGGER_TEST_UNSET}", tmp_path)


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(SecretError, match=r"cannot read secret file .*/missing: No such file or directory"):
        render("${file:missing}", tmp_path)


def test_directory_instead_of_file_raises(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    with pytest.raises(SecretError, match="cannot read secret file"):
        render("${file:dir}", tmp_path)


def test_undecodable_file_raises_secret_error(tmp_path: Path) -> None:
    (tmp_path / "key").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(SecretError, match="cannot read secret file"):
        render("${file:key}", tmp_path)


def test_secret_error_is_a_value_error() -> None:
    # pydantic turns ValueError raised in validators into config problems
    assert issubclass(SecretError, ValueError)


@pytest.mark.parametrize("value", ["a\r\nInjected: 1", "a\nb", "a\rb"])
def test_cr_lf_in_an_env_value_are_rejected(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str
) -> None:
    monkeypatch.setenv("OUTRIGGER_TEST_EVIL", value)
    with pytest.raises(SecretError, match="may not contain CR, LF or NUL"):
        render("Bearer ${env:OUTRIGGER_TEST_EVIL}", tmp_path)


@pytest.mark.parametrize("content", ["line1\nline2\n", "token\n\n", "to\rken", "tok\0en"])
def test_cr_lf_nul_inside_a_file_value_are_rejected(tmp_path: Path, content: str) -> None:
    (tmp_path / "key").write_text(content, newline="")
    with pytest.raises(SecretError, match="may not contain CR, LF or NUL"):
        render("${file:key}", tmp_path)


def test_a_crlf_terminated_file_loses_its_line_ending(tmp_path: Path) -> None:
    # files are read with universal newlines, so a Windows-edited secret still works
    (tmp_path / "key").write_bytes(b"token\r\n")
    assert render("${file:key}", tmp_path) == "token"


def test_cr_lf_in_a_literal_value_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(SecretError, match="may not contain CR, LF or NUL"):
        render("value\r\nX-Injected: 1", tmp_path)


def test_referenced_files(tmp_path: Path) -> None:
    template = "${file:rel/key}:${env:X}:${file:/abs/key}"
    assert has_reference(template)
    assert referenced_files(template, tmp_path) == [tmp_path / "rel" / "key", Path("/abs/key")]
    assert referenced_files("${env:X}", tmp_path) == []


# --- redact -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "template"),
    [
        ("Authorization", "Bearer ${env:STRIPE_KEY}"),
        ("Authorization", "${file:/var/run/secrets/stripe/key}"),
        ("Authorization", "Basic ${file:basic}"),
        ("Proxy-Authorization", "Bearer ${env:A}${env:B}"),
        ("X-Api-Key", "${env:API_KEY}"),
        ("Cookie", "${file:cookie}"),
        ("X-Auth-Token", "${env:TOKEN}"),
    ],
)
def test_redact_keeps_references_and_the_auth_scheme(name: str, template: str) -> None:
    assert redact(name, template) == template


@pytest.mark.parametrize(
    ("name", "template", "secret"),
    [
        ("Authorization", "Bearer sk_live_51HxYz", "sk_live_51HxYz"),
        ("authorization", "Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
        ("Proxy-Authorization", "Bearer abc.def.ghi", "abc.def.ghi"),
        ("X-Api-Key", "abc123", "abc123"),
        ("Api-Key", "k-9f8e7d", "k-9f8e7d"),
        ("X-Goog-Api-Key", "AIzaSyD-123", "AIzaSyD-123"),
        ("Cookie", "session=abc; csrf=def", "session=abc"),
        ("X-Auth-Token", "tok_123", "tok_123"),
        ("X-Amz-Security-Token", "FQoGZXIvYXdzE", "FQoGZXIvYXdzE"),
        ("X-Client-Secret", "shh", "shh"),
        ("X-Password", "hunter2", "hunter2"),
        ("X-Signature", "sha256=abcd", "sha256=abcd"),
        ("Authorization", "Token ${env:A} trailing-literal", "trailing-literal"),
        ("Authorization", "${env:PREFIX}sk_live_suffix", "sk_live_suffix"),
    ],
)
def test_redact_hides_literal_credentials(name: str, template: str, secret: str) -> None:
    shown = redact(name, template)
    assert secret not in shown
    assert REDACTED in shown
    # references survive redaction
    for ref in ("${env:A}", "${env:PREFIX}"):
        if ref in template:
            assert ref in shown


@pytest.mark.parametrize(
    ("template", "shown"),
    [("Bearer sk_live_51HxYz", "Bearer <redacted>"), ("Basic dXNlcjpwYXNz", "Basic <redacted>")],
)
def test_redact_keeps_the_scheme_of_a_literal_credential(template: str, shown: str) -> None:
    assert redact("Authorization", template) == shown


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Accept", "application/json"),
        ("User-Agent", "Bearer-looking agent/1.0"),
        ("Stripe-Version", "2024-06-20"),
        ("X-Request-Source", "outrigger"),
        ("Content-Type", "application/x-www-form-urlencoded"),
        ("X-Env", "${env:DEPLOY_ENV}"),
    ],
)
def test_redact_leaves_harmless_headers_alone(name: str, value: str) -> None:
    assert redact(name, value) == value
