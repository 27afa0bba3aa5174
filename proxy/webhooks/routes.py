"""The webhook routes of one config, ready to verify: settings plus rendered keys, by exact path.

Built with the rest of a `Runtime` (in a thread on reload: rendering reads ``${file:}`` secrets),
so a reload swaps routes and rotated secrets together and each request uses one snapshot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from proxy import secrets
from proxy.config.model import WebhookRouteSettings, Webhooks, WebhookVerify
from proxy.webhooks import verify
from proxy.webhooks.verify import Headers

EVENT_ID_HEADERS = {
    "standard": verify.STANDARD_ID_HEADER,
    "github": "X-GitHub-Delivery",
    "shopify": "X-Shopify-Webhook-Id",
    "twilio": "I-Twilio-Idempotency-Token",
}
"""Schemes whose provider names each event (each redelivery the same) in a header."""
EVENT_ID_BODY_KEYS = {"stripe": "id", "slack": "event_id"}
"""Schemes whose JSON body names the event (Slack's only in Events API callbacks)."""


def route_key(scheme: str, template: str, base_dir: Path) -> bytes:
    """The HMAC key one secret template names. Raises `SecretError` (unset variable, unreadable
    file) or ValueError (a standard secret that is not ``whsec_`` + base64)."""
    secret = secrets.render(template, base_dir)
    return verify.standard_key(secret) if scheme == "standard" else secret.encode()


def route_keys(settings: WebhookVerify, base_dir: Path) -> tuple[bytes, ...]:
    """Every key of a route, in the order they are tried."""
    return tuple(route_key(settings.scheme, template, base_dir) for template in settings.templates)


@dataclass(frozen=True, eq=False)
class WebhookRoute:
    """One route: its validated settings and its keys (kept out of repr, logs and errors)."""

    settings: WebhookRouteSettings
    keys: tuple[bytes, ...] = field(repr=False)

    @property
    def name(self) -> str:
        """The route's ``route`` label and span attribute: its path (configured, so bounded)."""
        return self.settings.path

    @property
    def scheme(self) -> str:
        return self.settings.verify.scheme

    def verify(self, body: bytes, headers: Headers, query: str, now: float) -> None:
        """Raise `SignatureInvalid`/`SignatureExpired` unless the request is authentic. `query` is
        the raw query string as received (Twilio signs the URL with it); `now` is Unix time."""
        v = self.settings.verify
        match v.scheme:
            case "stripe":
                verify.stripe(body, headers, self.keys, tolerance=v.tolerance, now=now)
            case "github":
                verify.github(body, headers, self.keys)
            case "slack":
                verify.slack(body, headers, self.keys, tolerance=v.tolerance, now=now)
            case "standard":
                verify.standard(body, headers, self.keys, tolerance=v.tolerance, now=now)
            case "shopify":
                verify.shopify(body, headers, self.keys)
            case "twilio":
                assert v.public_url is not None  # the model requires it for twilio
                url = f"{v.public_url}?{query}" if query else v.public_url
                verify.twilio(body, headers, self.keys, url=url)
            case "hmac":
                assert v.header is not None  # the model requires it for hmac
                verify.hmac_signature(
                    body,
                    headers,
                    self.keys,
                    header=v.header,
                    algorithm=v.algorithm,
                    encoding=v.encoding,
                    prefix=v.prefix,
                )

    def event_id(self, body: bytes, headers: Headers) -> str | None:
        """The provider's id of a verified event, when its scheme has one (for dedupe)."""
        scheme = self.scheme
        header = self.settings.verify.id_header if scheme == "hmac" else EVENT_ID_HEADERS.get(scheme)
        if header is not None:
            return headers.get(header) or None
        key = EVENT_ID_BODY_KEYS.get(scheme)
        return None if key is None else _json_string(body, key)


def _json_string(body: bytes, key: str) -> str | None:
    """``body[key]`` when the body is a JSON object whose `key` is a non-empty string."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # not JSON (a Slack slash command is a form post), or absurd
        return None
    value = document.get(key) if isinstance(document, dict) else None
    return value if isinstance(value, str) and value else None


class WebhookRoutes:
    """Every route of a config by exact path."""

    def __init__(self, webhooks: Webhooks, base_dir: Path) -> None:
        self.by_path = {
            route.path: WebhookRoute(route, route_keys(route.verify, base_dir)) for route in webhooks.routes
        }

    def get(self, path: str) -> WebhookRoute | None:
        return self.by_path.get(path)
