"""Signature schemes (SPEC 11), each against requests signed by the provider's own SDK where it can
sign (stripe, slack_sdk, standardwebhooks, twilio) and by hand from the documented scheme
(github, shopify, hmac), through a route built from config as the listener uses it.

For every scheme: valid accepted, tampered body, wrong secret and missing header refused as
``signature_invalid``, a second secret (rotation) accepted; for schemes that sign a timestamp,
an old (or far-future) one refused as ``signature_expired`` and a forged old one as invalid.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import pytest
import slack_sdk.signature
import standardwebhooks
import stripe
from multidict import CIMultiDict
from twilio.request_validator import RequestValidator

from proxy.config.model import WebhookRouteSettings
from proxy.errors import SignatureExpired, SignatureInvalid
from proxy.webhooks import verify
from proxy.webhooks.routes import WebhookRoute, route_keys

NOW = 1_700_000_000
BODY = b'{"id": "evt_1", "event_id": "Ev1", "type": "payment_intent.succeeded", "amount": 1999}'
SECRET = "s3cr3t-signing-key"
STANDARD_SECRET = "whsec_" + base64.b64encode(b"standard-webhooks-key-material!!").decode()
OTHER_STANDARD_SECRET = "whsec_" + base64.b64encode(b"another-key").decode()
TWILIO_URL = "https://hooks.example.com/twilio/sms"
FORM = b"Body=Hello+there&From=%2B15551230000&To=%2B15559870000&MessageSid=SM1"
FORM_TYPE = "application/x-www-form-urlencoded"


Sign = Callable[[str, bytes, int], dict[str, str]]
"""(secret, body, unix timestamp) -> the headers the provider would send."""


def sign_stripe(secret: str, body: bytes, at: int) -> dict[str, str]:
    header = stripe.WebhookSignature.generate_signature_header(body.decode(), secret, timestamp=at)
    return {"Stripe-Signature": header}


def sign_github(secret: str, body: bytes, at: int) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"X-Hub-Signature-256": f"sha256={digest}", "X-GitHub-Delivery": "72d3162e-cc78-11e3"}


def sign_slack(secret: str, body: bytes, at: int) -> dict[str, str]:
    signature = slack_sdk.signature.SignatureVerifier(secret).generate_signature(timestamp=str(at), body=body)
    assert signature is not None
    return {"X-Slack-Signature": signature, "X-Slack-Request-Timestamp": str(at)}


def sign_standard(secret: str, body: bytes, at: int) -> dict[str, str]:
    signature = standardwebhooks.Webhook(secret).sign(
        "msg_2Lh9KRb", datetime.fromtimestamp(at, UTC), body.decode()
    )
    return {"webhook-id": "msg_2Lh9KRb", "webhook-timestamp": str(at), "webhook-signature": signature}


def sign_shopify(secret: str, body: bytes, at: int) -> dict[str, str]:
    digest = base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()
    return {"X-Shopify-Hmac-Sha256": digest, "X-Shopify-Webhook-Id": "b54557e4-bdd9"}


def sign_twilio(secret: str, body: bytes, at: int) -> dict[str, str]:
    """A form post, signed as Twilio's SDK computes it over the public URL and the parameters."""
    params: dict[str, str] = {}
    for pair in body.decode().split("&"):
        name, _, value = pair.partition("=")
        params[_unquote(name)] = _unquote(value)
    signature = RequestValidator(secret).compute_signature(TWILIO_URL, params)
    return {
        "X-Twilio-Signature": signature,
        "Content-Type": FORM_TYPE,
        "I-Twilio-Idempotency-Token": "idem-1",
    }


def sign_hmac(secret: str, body: bytes, at: int) -> dict[str, str]:
    digest = base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha512).digest()).decode()
    return {"X-Signature": f"sig={digest}", "X-Event": "e-42"}


def _unquote(text: str) -> str:
    return unquote_plus(text)


@dataclass(frozen=True)
class Scheme:
    name: str
    sign: Sign
    secret: str
    other_secret: str
    header: str
    """The signature header (removed for the missing-header case)."""
    options: dict[str, Any]
    event_id: str | None
    body: bytes = BODY


SCHEMES = [
    Scheme("stripe", sign_stripe, SECRET, "whsec_other", "Stripe-Signature", {}, "evt_1"),
    Scheme("github", sign_github, SECRET, "other", "X-Hub-Signature-256", {}, "72d3162e-cc78-11e3"),
    Scheme("slack", sign_slack, SECRET, "other", "X-Slack-Signature", {}, "Ev1"),
    Scheme(
        "standard",
        sign_standard,
        STANDARD_SECRET,
        OTHER_STANDARD_SECRET,
        "webhook-signature",
        {},
        "msg_2Lh9KRb",
    ),
    Scheme("shopify", sign_shopify, SECRET, "other", "X-Shopify-Hmac-Sha256", {}, "b54557e4-bdd9"),
    Scheme(
        "twilio",
        sign_twilio,
        SECRET,
        "other",
        "X-Twilio-Signature",
        {"public_url": TWILIO_URL},
        "idem-1",
        FORM,
    ),
    Scheme(
        "hmac",
        sign_hmac,
        SECRET,
        "other",
        "X-Signature",
        {
            "header": "X-Signature",
            "algorithm": "sha512",
            "encoding": "base64",
            "prefix": "sig=",
            "id_header": "X-Event",
        },
        "e-42",
    ),
]
TIMESTAMPED = [s for s in SCHEMES if s.name in ("stripe", "slack", "standard")]


def route(scheme: Scheme, *secrets: str, **options: Any) -> WebhookRoute:
    written = {"secret": secrets[0]} if len(secrets) == 1 else {"secrets": list(secrets)}
    settings = WebhookRouteSettings.model_validate(
        {
            "path": f"/webhooks/{scheme.name}",
            "verify": {"scheme": scheme.name, **written, **scheme.options, **options},
            "forward": "http://127.0.0.1:8000/events",
        }
    )
    return WebhookRoute(settings, route_keys(settings.verify, Path.cwd()))


def check(
    target: WebhookRoute, body: bytes, headers: dict[str, str], now: float = NOW, query: str = ""
) -> None:
    target.verify(body, CIMultiDict(headers), query, now)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_a_valid_signature_is_accepted(scheme: Scheme) -> None:
    check(route(scheme, scheme.secret), scheme.body, scheme.sign(scheme.secret, scheme.body, NOW))


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_a_tampered_body_is_refused(scheme: Scheme) -> None:
    headers = scheme.sign(scheme.secret, scheme.body, NOW)
    tampered = scheme.body.replace(b"1", b"2", 1)
    assert tampered != scheme.body
    with pytest.raises(SignatureInvalid):
        check(route(scheme, scheme.secret), tampered, headers)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_a_signature_made_with_another_secret_is_refused(scheme: Scheme) -> None:
    headers = scheme.sign(scheme.other_secret, scheme.body, NOW)
    with pytest.raises(SignatureInvalid):
        check(route(scheme, scheme.secret), scheme.body, headers)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_a_missing_signature_header_is_refused(scheme: Scheme) -> None:
    headers = scheme.sign(scheme.secret, scheme.body, NOW)
    del headers[scheme.header]
    with pytest.raises(SignatureInvalid, match="missing"):
        check(route(scheme, scheme.secret), scheme.body, headers)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_a_second_secret_is_accepted_during_rotation(scheme: Scheme) -> None:
    rotating = route(scheme, scheme.other_secret, scheme.secret)
    check(rotating, scheme.body, scheme.sign(scheme.secret, scheme.body, NOW))
    check(rotating, scheme.body, scheme.sign(scheme.other_secret, scheme.body, NOW))


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_an_error_names_the_failure_but_never_the_signature_or_secret(scheme: Scheme) -> None:
    headers = scheme.sign(scheme.other_secret, scheme.body, NOW)
    with pytest.raises(SignatureInvalid) as caught:
        check(route(scheme, scheme.secret), scheme.body, headers)
    message = caught.value.message
    assert scheme.secret not in message
    assert scheme.other_secret not in message
    assert not any(value in message for value in headers.values() if len(value) > 8)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_the_providers_event_id_is_read(scheme: Scheme) -> None:
    headers = CIMultiDict(scheme.sign(scheme.secret, scheme.body, NOW))
    assert route(scheme, scheme.secret).event_id(scheme.body, headers) == scheme.event_id


@pytest.mark.parametrize("scheme", TIMESTAMPED, ids=lambda s: s.name)
@pytest.mark.parametrize("offset", [-301, 301])
def test_a_timestamp_outside_the_tolerance_is_expired(scheme: Scheme, offset: int) -> None:
    headers = scheme.sign(scheme.secret, scheme.body, NOW + offset)
    with pytest.raises(SignatureExpired):
        check(route(scheme, scheme.secret), scheme.body, headers)


@pytest.mark.parametrize("scheme", TIMESTAMPED, ids=lambda s: s.name)
def test_a_timestamp_within_the_tolerance_is_accepted(scheme: Scheme) -> None:
    check(route(scheme, scheme.secret), scheme.body, scheme.sign(scheme.secret, scheme.body, NOW - 299))


@pytest.mark.parametrize("scheme", TIMESTAMPED, ids=lambda s: s.name)
def test_tolerance_is_configurable(scheme: Scheme) -> None:
    headers = scheme.sign(scheme.secret, scheme.body, NOW - 60)
    check(route(scheme, scheme.secret, tolerance="2m"), scheme.body, headers)
    with pytest.raises(SignatureExpired):
        check(route(scheme, scheme.secret, tolerance="30s"), scheme.body, headers)


@pytest.mark.parametrize("scheme", TIMESTAMPED, ids=lambda s: s.name)
def test_a_forged_old_request_is_invalid_not_expired(scheme: Scheme) -> None:
    headers = scheme.sign(scheme.other_secret, scheme.body, NOW - 3600)
    with pytest.raises(SignatureInvalid):
        check(route(scheme, scheme.secret), scheme.body, headers)


# --------------------------------------------------------------------------- cross-checks by hand


def test_stripe_signature_by_hand_from_the_documented_scheme() -> None:
    """HMAC-SHA256 of ``{t}.{body}``, several v1 entries (Stripe rotates with two)."""
    good = hmac.new(SECRET.encode(), f"{NOW}.".encode() + BODY, hashlib.sha256).hexdigest()
    header = f"t={NOW},v1={'0' * 64},v1={good},v0=ignored"
    check(route(SCHEMES[0], SECRET), BODY, {"Stripe-Signature": header})
    stripe.WebhookSignature.verify_header(BODY, f"t={NOW},v1={good}", SECRET, tolerance=None)


def test_standard_signature_by_hand_and_several_in_one_header() -> None:
    key = base64.b64decode(STANDARD_SECRET.removeprefix("whsec_"))
    signed = f"msg_1.{NOW}.".encode() + BODY
    good = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(NOW),
        "webhook-signature": f"v1a,c29tZXRoaW5n v1,{base64.b64encode(b'x' * 32).decode()} v1,{good}",
    }
    check(route(SCHEMES[3], STANDARD_SECRET), BODY, headers)


def test_standard_secret_without_prefix_or_padding_decodes_like_the_reference_library() -> None:
    raw = base64.b64encode(b"key-with-odd-len").decode().rstrip("=")
    assert verify.standard_key(raw) == verify.standard_key("whsec_" + raw) == b"key-with-odd-len"
    with pytest.raises(ValueError, match="base64"):
        verify.standard_key("whsec_not base64!")


def test_slack_signature_by_hand() -> None:
    digest = hmac.new(SECRET.encode(), f"v0:{NOW}:".encode() + BODY, hashlib.sha256).hexdigest()
    headers = {"X-Slack-Signature": f"v0={digest}", "X-Slack-Request-Timestamp": str(NOW)}
    check(route(SCHEMES[2], SECRET), BODY, headers)
    assert slack_sdk.signature.SignatureVerifier(SECRET).generate_signature(
        timestamp=str(NOW), body=BODY
    ) == (f"v0={digest}")


def test_github_hex_signature_is_compared_case_insensitively_and_needs_its_prefix() -> None:
    digest = hmac.new(SECRET.encode(), BODY, hashlib.sha256).hexdigest()
    github = route(SCHEMES[1], SECRET)
    check(github, BODY, {"X-Hub-Signature-256": f"sha256={digest.upper()}"})
    with pytest.raises(SignatureInvalid, match="prefix"):
        check(github, BODY, {"X-Hub-Signature-256": digest})


def test_a_non_ascii_signature_is_refused_not_a_crash() -> None:
    with pytest.raises(SignatureInvalid):
        check(route(SCHEMES[1], SECRET), BODY, {"X-Hub-Signature-256": "sha256=é" * 10})


def test_a_non_numeric_timestamp_is_invalid() -> None:
    headers = sign_slack(SECRET, BODY, NOW)
    headers["X-Slack-Request-Timestamp"] = "soon"
    with pytest.raises(SignatureInvalid, match="Unix time"):
        check(route(SCHEMES[2], SECRET), BODY, headers)


@pytest.mark.parametrize(
    ("algorithm", "encoding"), [("sha1", "hex"), ("sha256", "hex"), ("sha512", "hex"), ("sha256", "base64")]
)
def test_hmac_scheme_with_each_algorithm_and_encoding(algorithm: str, encoding: str) -> None:
    digest = hmac.new(SECRET.encode(), BODY, algorithm).digest()
    value = digest.hex() if encoding == "hex" else base64.b64encode(digest).decode()
    target = route(SCHEMES[6], SECRET, algorithm=algorithm, encoding=encoding, prefix="")
    check(target, BODY, {"X-Signature": value})
    other = "sha1" if algorithm != "sha1" else "sha256"
    with pytest.raises(SignatureInvalid):
        check(
            route(SCHEMES[6], SECRET, algorithm=other, encoding=encoding, prefix=""),
            BODY,
            {"X-Signature": value},
        )


# --------------------------------------------------------------------------- twilio specifics


def twilio_route(**options: Any) -> WebhookRoute:
    return route(SCHEMES[5], SECRET, **options)


def test_twilio_json_body_is_checked_through_the_signed_body_sha256() -> None:
    body = json.dumps({"event": "call.completed"}).encode()
    query = f"bodySHA256={hashlib.sha256(body).hexdigest()}"
    signature = RequestValidator(SECRET).compute_signature(f"{TWILIO_URL}?{query}", {})
    headers = {"X-Twilio-Signature": signature, "Content-Type": "application/json"}
    check(twilio_route(), body, headers, query=query)
    assert RequestValidator(SECRET).validate(f"{TWILIO_URL}?{query}", body.decode(), signature)
    with pytest.raises(SignatureInvalid, match="bodySHA256"):
        check(twilio_route(), body + b" ", headers, query=query)
    with pytest.raises(SignatureInvalid):
        check(twilio_route(), body, headers)  # no bodySHA256: a JSON body is not signed otherwise


def test_twilio_signs_the_public_url_with_its_query() -> None:
    query = "tenant=acme&x=%2F"
    params = {"Body": "Hello there", "From": "+15551230000", "To": "+15559870000", "MessageSid": "SM1"}
    signature = RequestValidator(SECRET).compute_signature(f"{TWILIO_URL}?{query}", params)
    headers = {"X-Twilio-Signature": signature, "Content-Type": FORM_TYPE}
    check(twilio_route(), FORM, headers, query=query)
    with pytest.raises(SignatureInvalid):
        check(twilio_route(), FORM, headers)  # the same request seen at another URL
    with pytest.raises(SignatureInvalid):
        check(twilio_route(public_url="https://internal.svc:15002/twilio/sms"), FORM, headers, query=query)


@pytest.mark.parametrize(
    ("configured", "signed"),
    [
        ("https://hooks.example.com/t", "https://hooks.example.com:443/t"),
        ("https://hooks.example.com:443/t", "https://hooks.example.com/t"),
    ],
)
def test_twilio_url_is_tried_with_and_without_the_default_port(configured: str, signed: str) -> None:
    signature = RequestValidator(SECRET).compute_signature(signed, {"A": "1"})
    check(
        twilio_route(public_url=configured),
        b"A=1",
        {"X-Twilio-Signature": signature, "Content-Type": FORM_TYPE},
    )


def test_twilio_repeated_parameters_are_signed_sorted() -> None:
    body = b"b=2&a=z&a=y&c="
    params = CIMultiDict([("b", "2"), ("a", "z"), ("a", "y"), ("c", "")])
    signature = RequestValidator(SECRET).compute_signature(TWILIO_URL, params)
    check(twilio_route(), body, {"X-Twilio-Signature": signature, "Content-Type": FORM_TYPE})


def test_twilio_shared_key_requests_are_signed_with_sha256() -> None:
    params = {"A": "1"}
    settings = "key=webhooks_sharedkey_1,algorithm=HMAC_SHA256"
    signature = RequestValidator(SECRET).compute_signature(TWILIO_URL, params, "HMAC_SHA256")
    headers = {
        "X-Twilio-Signature": signature,
        "Content-Type": FORM_TYPE,
        "X-Twilio-Webhooks-Signature-Settings": settings,
    }
    check(twilio_route(), b"A=1", headers)
    with pytest.raises(SignatureInvalid):
        check(
            twilio_route(), b"A=1", {**headers, "X-Twilio-Webhooks-Signature-Settings": "algorithm=HMAC_MD5"}
        )
    del headers["X-Twilio-Webhooks-Signature-Settings"]  # read as HMAC-SHA1 now
    with pytest.raises(SignatureInvalid):
        check(twilio_route(), b"A=1", headers)


def test_stripe_and_slack_event_ids_are_absent_from_a_body_that_is_not_a_json_object() -> None:
    for scheme in (SCHEMES[0], SCHEMES[2]):
        target = route(scheme, scheme.secret)
        assert target.event_id(b"command=/deploy&text=now", CIMultiDict()) is None
        assert target.event_id(b"[1, 2]", CIMultiDict()) is None
        assert target.event_id(b"[" * 100_000, CIMultiDict()) is None


def test_hmac_without_id_header_has_no_event_id() -> None:
    options = {k: v for k, v in SCHEMES[6].options.items() if k != "id_header"}
    target = WebhookRoute(
        WebhookRouteSettings.model_validate(
            {
                "path": "/h",
                "verify": {"scheme": "hmac", "secret": SECRET, **options},
                "forward": "http://127.0.0.1:1/",
            }
        ),
        (SECRET.encode(),),
    )
    assert target.event_id(BODY, CIMultiDict(sign_hmac(SECRET, BODY, NOW))) is None
