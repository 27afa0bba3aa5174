"""`redact_paths`: secrets in URL paths (Slack webhooks, Telegram bot tokens) never written down."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from pydantic import ValidationError

from proxy.config.loader import load_config
from proxy.layers.attempt import AttemptLayer
from proxy.redaction import REDACTED, check_glob, compile_globs
from tests.conftest import write_config
from tests.fakes import fake_upstream, make_request, settings_from

SLACK = "/services/*/*/*"
TELEGRAM = "/bot*/sendMessage"


@pytest.mark.parametrize(
    ("path_qs", "shown"),
    [
        ("/services/T0001/B0002/XXXXsecret", "/services/REDACTED/REDACTED/REDACTED"),
        ("/bot123456:AAH-token/sendMessage", "/botREDACTED/sendMessage"),
        ("/bot123456:AAH-token/sendMessage?chat_id=42", "/botREDACTED/sendMessage?chat_id=42"),
        ("/services/T0001/B0002", "/services/T0001/B0002"),  # too few segments: no match
        ("/services/T0001/B0002/X/extra", "/services/T0001/B0002/X/extra"),  # the whole path must match
        ("/bot1/getUpdates", "/bot1/getUpdates"),
        ("/", "/"),
    ],
)
def test_what_each_star_matched_is_redacted(path_qs: str, shown: str) -> None:
    assert compile_globs((SLACK, TELEGRAM)).redact(path_qs) == shown


def test_a_star_never_crosses_a_slash() -> None:
    assert compile_globs(("/a/*",)).redact("/a/b/c") == "/a/b/c"


def test_glob_text_is_literal_apart_from_the_star() -> None:
    redactor = compile_globs(("/v1.0/(x)/*",))
    assert redactor.redact("/v1.0/(x)/secret") == f"/v1.0/(x)/{REDACTED}"
    assert redactor.redact("/v1x0/(x)/secret") == "/v1x0/(x)/secret"


def test_the_first_matching_glob_wins() -> None:
    assert compile_globs(("/hooks/*", "/*/x")).redact("/hooks/x") == "/hooks/REDACTED"


def test_no_globs_leaves_every_path_alone() -> None:
    redactor = compile_globs(())
    assert redactor.patterns == ()
    assert redactor.redact("/services/a/b/c?x=1") == "/services/a/b/c?x=1"


@pytest.mark.parametrize(
    ("glob", "message"),
    [
        ("services/*", "must start with '/'"),
        ("/a/**", "'**' is not supported"),
        ("/plain", "has no '*'"),
        ("/a/*?x=*", "may not contain a query"),
    ],
)
def test_bad_globs_are_refused(glob: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        check_glob(glob)


def test_the_matcher_is_compiled_at_load_not_per_request(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from(redact_paths=[SLACK])

    def no_compiling(*args: object, **kwargs: object) -> None:
        raise AssertionError("a regex was compiled per request")

    monkeypatch.setattr(re, "compile", no_compiling)
    assert settings.redact_path("/services/a/b/c") == "/services/REDACTED/REDACTED/REDACTED"


def test_settings_with_the_same_globs_are_equal_so_policy_state_carries_over() -> None:
    assert settings_from(redact_paths=[SLACK]) == settings_from(redact_paths=[SLACK])
    assert settings_from(redact_paths=[SLACK]) != settings_from(redact_paths=[TELEGRAM])


def test_a_bad_glob_is_a_config_error_at_its_key() -> None:
    with pytest.raises(ValidationError) as raised:
        settings_from(redact_paths=["/ok/*", "no-slash"])
    (error,) = raised.value.errors()
    assert error["loc"] == ("redact_paths", 1)


def test_policy_redact_path_uses_its_settings_and_defaults_apply_to_policies(tmp_path: Path) -> None:
    config = load_config(
        write_config(
            tmp_path,
            [{"hosts": ["hooks.slack.com"], "redact_paths": [SLACK]}, {"hosts": ["api.telegram.org"]}],
            defaults={"redact_paths": [TELEGRAM]},
        )
    )
    slack, telegram = config.policies
    assert slack.redact_path("/services/T/B/X") == "/services/REDACTED/REDACTED/REDACTED"
    assert slack.redact_path("/bot1:x/sendMessage") == "/bot1:x/sendMessage", (
        "a policy's list replaces defaults'"
    )
    assert telegram.redact_path("/bot1:x/sendMessage") == "/botREDACTED/sendMessage"


async def test_the_attempt_span_url_hides_the_path_secret(
    span_exporter: tuple[trace.Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = span_exporter
    settings = settings_from(redact_paths=[SLACK])
    request = make_request("POST", "/services/T0001/B0002/XXXXsecret?x=1", settings=settings)
    response = await AttemptLayer(settings.headers, Path("."), tracer)(request, fake_upstream(200))
    response.body.release()
    (client,) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]
    url = str((client.attributes or {})["url.full"])
    assert url == "http://api.test/services/REDACTED/REDACTED/REDACTED?x=REDACTED"
    assert "XXXXsecret" not in url


@pytest.mark.parametrize(
    "path",
    [
        "//services/T000/B000/SECRET",
        "/services//T000/B000/SECRET",
        "/services/T000/B000/SECRET/",
        "/%73ervices/T000/B000/SECRET",
        "/services/T000/B000/SECRE%54",
    ],
)
def test_path_variants_cannot_slip_a_secret_past_a_glob(path: str) -> None:
    redactor = compile_globs((SLACK,))
    assert redactor.redact(path + "?x=1") == "/services/REDACTED/REDACTED/REDACTED?x=1"
