"""Webhook signature schemes (SPEC 11): one pure function per provider, the same shape each.

Every function checks the raw body bytes exactly as received against the signature header(s),
with each of ``keys`` in turn (several during a secret rotation), and raises
`SignatureInvalid` or `SignatureExpired` (authentic, but signed outside ``tolerance`` of ``now``);
it returns None when the request is authentic. Comparisons are constant-time
(`hmac.compare_digest`); error messages name the header that failed, never its value or a key.
A forged request is always `SignatureInvalid`, even when its timestamp is also old: the
timestamp is only judged once a signature matched.

``headers`` must look names up case-insensitively (aiohttp's and multidict's mappings do).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from typing import Literal
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from proxy.errors import SignatureExpired, SignatureInvalid

Headers = Mapping[str, str]
Algorithm = Literal["sha1", "sha256", "sha512"]
Encoding = Literal["hex", "base64"]

STRIPE_HEADER = "Stripe-Signature"
GITHUB_HEADER = "X-Hub-Signature-256"
SLACK_HEADER = "X-Slack-Signature"
SLACK_TIMESTAMP_HEADER = "X-Slack-Request-Timestamp"
STANDARD_ID_HEADER = "webhook-id"
STANDARD_TIMESTAMP_HEADER = "webhook-timestamp"
STANDARD_HEADER = "webhook-signature"
SHOPIFY_HEADER = "X-Shopify-Hmac-Sha256"
TWILIO_HEADER = "X-Twilio-Signature"
TWILIO_SETTINGS_HEADER = "X-Twilio-Webhooks-Signature-Settings"
"""``key=<id>,algorithm=HMAC_SHA256`` on requests signed with a Twilio SharedKey (else HMAC-SHA1)."""
STANDARD_SECRET_PREFIX = "whsec_"

_TWILIO_ALGORITHMS: dict[str, Algorithm] = {"HMAC_SHA1": "sha1", "HMAC_SHA256": "sha256"}
_FORM = "application/x-www-form-urlencoded"


def stripe(body: bytes, headers: Headers, keys: Sequence[bytes], *, tolerance: float, now: float) -> None:
    """``Stripe-Signature: t=<unix>,v1=<hex>[,v1=<hex>...]``: HMAC-SHA256 of ``{t}.{body}``."""
    fields = _comma_fields(_required(headers, STRIPE_HEADER))
    timestamp = next((value for name, value in fields if name == "t"), None)
    offered = [value for name, value in fields if name == "v1"]
    if timestamp is None or not offered:
        raise SignatureInvalid(f"{STRIPE_HEADER} carries no t= timestamp or no v1= signature")
    sent_at = _unix_time(timestamp, STRIPE_HEADER)
    signed = timestamp.encode() + b"." + body
    _match_any(keys, signed, "sha256", "hex", offered, STRIPE_HEADER)
    _check_age(sent_at, now, tolerance)


def github(body: bytes, headers: Headers, keys: Sequence[bytes]) -> None:
    """``X-Hub-Signature-256: sha256=<hex>`` of the body."""
    hmac_signature(
        body, headers, keys, header=GITHUB_HEADER, algorithm="sha256", encoding="hex", prefix="sha256="
    )


def slack(body: bytes, headers: Headers, keys: Sequence[bytes], *, tolerance: float, now: float) -> None:
    """``X-Slack-Signature: v0=<hex>`` of ``v0:{X-Slack-Request-Timestamp}:{body}``."""
    signature = _required(headers, SLACK_HEADER)
    timestamp = _required(headers, SLACK_TIMESTAMP_HEADER)
    sent_at = _unix_time(timestamp, SLACK_TIMESTAMP_HEADER)
    if not signature.startswith("v0="):
        raise SignatureInvalid(f"{SLACK_HEADER} is not a v0= signature")
    signed = b"v0:" + timestamp.encode() + b":" + body
    _match_any(keys, signed, "sha256", "hex", [signature[3:]], SLACK_HEADER)
    _check_age(sent_at, now, tolerance)


def standard(body: bytes, headers: Headers, keys: Sequence[bytes], *, tolerance: float, now: float) -> None:
    """Standard Webhooks (Svix): ``webhook-signature: v1,<base64> [v1,<base64>...]``, HMAC-SHA256
    of ``{webhook-id}.{webhook-timestamp}.{body}``; `keys` are the decoded ``whsec_`` secrets
    (`standard_key`). Signatures of other versions (``v1a,`` asymmetric) are skipped."""
    message_id = _required(headers, STANDARD_ID_HEADER)
    timestamp = _required(headers, STANDARD_TIMESTAMP_HEADER)
    signatures = _required(headers, STANDARD_HEADER)
    sent_at = _unix_time(timestamp, STANDARD_TIMESTAMP_HEADER)
    offered = [
        signature
        for version, comma, signature in (item.partition(",") for item in signatures.split())
        if comma and version == "v1"
    ]
    if not offered:
        raise SignatureInvalid(f"{STANDARD_HEADER} carries no v1 signature")
    signed = message_id.encode() + b"." + timestamp.encode() + b"." + body
    _match_any(keys, signed, "sha256", "base64", offered, STANDARD_HEADER)
    _check_age(sent_at, now, tolerance)


def standard_key(secret: str) -> bytes:
    """The HMAC key a Standard Webhooks secret names: ``whsec_`` + base64 (padding optional, as
    the reference library reads it). ValueError when it is not base64 or empty."""
    encoded = secret.removeprefix(STANDARD_SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a standard webhook secret is whsec_ followed by base64") from None
    if not key:
        raise ValueError("the standard webhook secret is empty")
    return key


def shopify(body: bytes, headers: Headers, keys: Sequence[bytes]) -> None:
    """``X-Shopify-Hmac-Sha256: <base64>`` of the body."""
    hmac_signature(
        body, headers, keys, header=SHOPIFY_HEADER, algorithm="sha256", encoding="base64", prefix=""
    )


def twilio(body: bytes, headers: Headers, keys: Sequence[bytes], *, url: str) -> None:
    """``X-Twilio-Signature``: base64 HMAC-SHA1 (HMAC-SHA256 with a SharedKey, as
    ``X-Twilio-Webhooks-Signature-Settings`` says) of the URL Twilio called (`url`, query
    included), followed for form posts by every parameter sorted by name as name+value. A JSON
    body is not signed itself: the URL carries ``bodySHA256=<hex>`` of it. Twilio is inconsistent
    about the default port in the URL, so the URL is tried with and without it (as its SDK does)."""
    signature = _required(headers, TWILIO_HEADER)
    algorithm = _twilio_algorithm(headers.get(TWILIO_SETTINGS_HEADER, ""))
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    body_hash = next((value for name, value in query if name == "bodySHA256"), None)
    content_type = headers.get("Content-Type", "").partition(";")[0].strip().lower()
    params = ""
    if body_hash is not None:
        if not _equal(hashlib.sha256(body).hexdigest(), body_hash):
            raise SignatureInvalid("the body does not match the bodySHA256 the signed URL carries")
    elif content_type == _FORM:
        params = _twilio_params(body)
    elif body:
        raise SignatureInvalid("a Twilio request with a non-form body must carry bodySHA256 in its URL")
    for candidate in _with_and_without_default_port(parts):
        for key in keys:
            if _equal(_digest(key, (candidate + params).encode(), algorithm, "base64"), signature):
                return
    raise SignatureInvalid(f"{TWILIO_HEADER} does not match")


def hmac_signature(
    body: bytes,
    headers: Headers,
    keys: Sequence[bytes],
    *,
    header: str,
    algorithm: Algorithm,
    encoding: Encoding,
    prefix: str,
) -> None:
    """Generic: ``<header>: <prefix><hex or base64 HMAC of the body>``."""
    value = _required(headers, header)
    if not value.startswith(prefix):
        raise SignatureInvalid(f"{header} does not start with the configured prefix")
    _match_any(keys, body, algorithm, encoding, [value[len(prefix) :]], header)


def _required(headers: Headers, name: str) -> str:
    value = headers.get(name)
    if not value:
        raise SignatureInvalid(f"{name} header is missing")
    return value


def _comma_fields(value: str) -> list[tuple[str, str]]:
    return [
        (name.strip(), signature.strip())
        for name, _, signature in (f.partition("=") for f in value.split(","))
    ]


def _unix_time(value: str, header: str) -> int:
    if not value.isascii() or not value.isdigit():
        raise SignatureInvalid(f"{header} timestamp is not a Unix time")
    return int(value)


def _check_age(sent_at: float, now: float, tolerance: float) -> None:
    if abs(now - sent_at) > tolerance:
        raise SignatureExpired("the signed timestamp is outside the tolerance (a replay, or a skewed clock)")


def _digest(key: bytes, message: bytes, algorithm: Algorithm, encoding: Encoding) -> str:
    digest = hmac.new(key, message, algorithm).digest()
    return digest.hex() if encoding == "hex" else base64.b64encode(digest).decode()


def _match_any(
    keys: Sequence[bytes],
    message: bytes,
    algorithm: Algorithm,
    encoding: Encoding,
    offered: Sequence[str],
    header: str,
) -> None:
    """Every key against every offered signature (rotation on both sides), constant-time each."""
    if encoding == "hex":
        offered = [signature.lower() for signature in offered]
    for key in keys:
        expected = _digest(key, message, algorithm, encoding)
        if any(_equal(expected, signature) for signature in offered):
            return
    raise SignatureInvalid(f"{header} does not match")


def _equal(expected: str, given: str) -> bool:
    """Constant-time; `compare_digest` refuses non-ASCII str, which a forged header may carry."""
    return given.isascii() and hmac.compare_digest(expected.encode(), given.encode())


def _twilio_algorithm(settings: str) -> Algorithm:
    named = next((value for name, value in _comma_fields(settings) if name == "algorithm" and value), None)
    if named is None:
        return "sha1"
    algorithm = _TWILIO_ALGORITHMS.get(named.upper())
    if algorithm is None:
        raise SignatureInvalid(f"{TWILIO_SETTINGS_HEADER} names an unknown algorithm")
    return algorithm


def _twilio_params(body: bytes) -> str:
    """Form parameters as Twilio signs them: names sorted, each name's distinct values sorted."""
    try:
        pairs = parse_qsl(body.decode(), keep_blank_values=True)
    except UnicodeDecodeError:
        raise SignatureInvalid("the form body is not UTF-8") from None
    values: dict[str, set[str]] = {}
    for name, value in pairs:
        values.setdefault(name, set()).add(value)
    return "".join(name + value for name in sorted(values) for value in sorted(values[name]))


def _with_and_without_default_port(parts: tuple[str, str, str, str, str]) -> list[str]:
    scheme, netloc, path, query, fragment = parts
    default = "443" if scheme == "https" else "80"
    host, colon, port = netloc.rpartition(":")
    if colon and port.isdigit() and "]" not in port:
        if port != default:
            return [urlunsplit(parts)]
        return [urlunsplit((scheme, host, path, query, fragment)), urlunsplit(parts)]
    return [urlunsplit(parts), urlunsplit((scheme, f"{netloc}:{default}", path, query, fragment))]
