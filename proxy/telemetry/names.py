"""Every name SREs rely on (SPEC 8): span attributes, headers, label values and the redaction rule.

Dashboards, alerts and log queries are written against these strings, so they
live in one module and nothing else spells them.
"""

from __future__ import annotations

REQUEST_ID_HEADER = "x-request-id"
TRACEPARENT_HEADER = "traceparent"
REDACTED_VALUE = "REDACTED"
UNKNOWN_HOST_LABEL = "(none)"
"""`host` label for requests that matched no policy: raw requested hosts would be unbounded."""
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})

# Span attribute names beyond the HTTP semantic conventions (SPEC 8).
ATTR_POLICY = "outrigger.policy"
ATTR_ATTEMPTS = "outrigger.attempts"
ATTR_RETRY_REASON = "outrigger.retry.reason"
ATTR_RETRY_BACKOFF_MS = "outrigger.retry.backoff_ms"
ATTR_BREAKER_STATE = "outrigger.breaker.state"
ATTR_RATELIMIT_WAIT_MS = "outrigger.ratelimit.wait_ms"
ATTR_IDEMPOTENCY_KEY = "outrigger.idempotency.key"
ATTR_IDEMPOTENCY_INJECTED = "outrigger.idempotency.injected"
ATTR_CONFIG_VERSION = "outrigger.config.version"
ATTR_REPLAYED = "outrigger.replayed"
ATTR_CACHE = "outrigger.cache"
"""hit | miss | stale | revalidated | bypass, on the SERVER span of a cached policy's request."""
ATTR_CACHE_MASKED_ERROR = "outrigger.cache.masked_error"
"""The upstream failure (error type or status) a stale answer stood in for."""
ATTR_REQUEST_ID = "http.request.header.x-request-id"
ATTR_FALLBACK = "outrigger.fallback"
"""Why the declared fallback answered: the real failure (an error type, or the upstream status)."""
ATTR_FAULT = "outrigger.fault"
"""The fault a drill injected: ``abort`` or ``delay``."""
ATTR_UPSTREAM = "outrigger.upstream"
"""With failover: the upstream of the last attempt (scheme://host[:port])."""
ATTR_DELIVERY_ID = "outrigger.delivery.id"
"""The stored delivery: on the SERVER span of the request that was accepted (202), and on every
delivery attempt's span."""
ATTR_DELIVERY_ATTEMPT = "outrigger.delivery.attempt"
"""1 for the first delivery attempt."""
ATTR_DELIVERY_SOURCE = "outrigger.delivery.source"
"""The policy name, or the webhook route, a delivery belongs to."""
DELIVERY_ID_HEADER = "x-outrigger-delivery-id"
WEBHOOK_VERIFIED_HEADER = "x-outrigger-webhook-verified"
"""On each event forwarded to the app: the scheme whose signature Outrigger verified."""

ATTR_WEBHOOK_ROUTE = "outrigger.webhook.route"
ATTR_WEBHOOK_RESULT = "outrigger.webhook.result"
"""accepted | duplicate | signature_invalid | signature_expired | too_large | unavailable."""
ATTR_WEBHOOK_SCHEME = "outrigger.webhook.scheme"
ATTR_WEBHOOK_EVENT_ID = "outrigger.webhook.event_id"
"""The provider's event id (not a secret: it names the event, like a request id)."""

CIRCUIT_STATE_VALUES = {"closed": 0, "half-open": 1, "open": 2}
"""`outrigger_circuit_state` gauge values, keyed by the breaker's state name."""


def redact_query(path_qs: str) -> str:
    """Keep query names, drop their values: they often carry tokens, emails or card data."""
    path, sep, query = path_qs.partition("?")
    if not sep:
        return path
    parts = (part.partition("=") for part in query.split("&") if part)
    return (
        path + "?" + "&".join(f"{name}={REDACTED_VALUE}" if eq else REDACTED_VALUE for name, eq, _ in parts)
    )


def method_label(method: str) -> str:
    """The `method` label: arbitrary methods would make the series unbounded."""
    return method if method in _KNOWN_METHODS else "OTHER"


def outcome_label(status: int | None, error_type: str | None) -> str:
    """`outrigger_attempts_total` outcome: a status class, or the failure kind."""
    return f"{status // 100}xx" if status is not None else (error_type or "error")
