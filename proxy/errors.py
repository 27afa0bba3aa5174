"""Errors Outrigger answers itself (SPEC 5), as one exception family.

    OutriggerError                      -> JSON body + x-outrigger-error
    ├── BadRequest              400 bad_request
    ├── HostNotAllowed          403 host_not_allowed
    ├── AddressNotAllowed       403 address_not_allowed
    ├── ConnectNotSupported     405 connect_not_supported
    ├── RequestTimeout          408 request_timeout (no complete request head within header_timeout;
    │                               a webhook body not whole in time)
    ├── BodyTooLarge            413 body_too_large (a fire-and-forget or webhook body above its
    │                               max_body_bytes)
    ├── IdempotencyKeyReused    422 idempotency_key_reused
    ├── HeadersTooLarge         431 headers_too_large
    ├── Rejected                    refused locally to protect the upstream or the app
    │   ├── RateLimited         429 rate_limited (Retry-After)
    │   ├── CircuitOpen         503 circuit_open (Retry-After)
    │   └── Overloaded          503 overloaded (Retry-After)
    ├── StoreUnavailable        503 store_unavailable (the delivery store cannot write: nothing stored
    │                               or acknowledged, a request or a webhook event)
    ├── UpstreamUnreachable     502 upstream_unreachable
    │   ├── ConnectFailure          retry condition "connect-failure"
    │   └── ConnectionReset         retry condition "reset"
    ├── CredentialsUnavailable  502 credentials_unavailable (the token endpoint failed)
    └── Timeout                 504 timeout (the total deadline)
        └── AttemptTimeout          retry condition "timeout" (one attempt's per_try)
    FaultInjected               faults.abort.status fault_injected (a drill, not a failure)
    WebhookRefused                  answered by the webhook listener (SPEC 11), never by the proxy
    ├── SignatureInvalid        401 signature_invalid
    ├── SignatureExpired        401 signature_expired (authentic, but outside `tolerance`)
    ├── WebhookNotFound         404 not_found (no route has that path)
    └── WebhookMethodNotAllowed 405 method_not_allowed (routes take POST only)

Layers raise these; only the server turns them into responses, so the error
body is written in exactly one place.
"""

from __future__ import annotations

import json
import math
from typing import ClassVar

from multidict import CIMultiDict

ERROR_HEADER = "x-outrigger-error"


class OutriggerError(Exception):
    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "internal_error"
    condition: ClassVar[str | None] = None
    """The attempt outcome this error is, in `retries.on` / `failure_on` terms, if any."""

    def __init__(self, message: str, *, retry_after: float | None = None, host: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.host = host
        """The requested host, when known where the error is raised."""

    def body(self, host: str) -> bytes:
        return json.dumps(
            {"error": {"type": self.error_type, "message": self.message, "host": host}}
        ).encode()

    def headers(self) -> CIMultiDict[str]:
        headers = CIMultiDict({"Content-Type": "application/json", ERROR_HEADER: self.error_type})
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return headers


class BadRequest(OutriggerError):
    status = 400
    error_type = "bad_request"


class HostNotAllowed(OutriggerError):
    status = 403
    error_type = "host_not_allowed"


class AddressNotAllowed(OutriggerError):
    status = 403
    error_type = "address_not_allowed"


class ConnectNotSupported(OutriggerError):
    status = 405
    error_type = "connect_not_supported"


class RequestTimeout(OutriggerError):
    status = 408
    error_type = "request_timeout"


class BodyTooLarge(OutriggerError):
    status = 413
    error_type = "body_too_large"


class StoreUnavailable(OutriggerError):
    """The delivery store could not commit (disk full, read-only, I/O error): nothing was stored,
    so nothing was acknowledged."""

    status = 503
    error_type = "store_unavailable"


class IdempotencyKeyReused(OutriggerError):
    status = 422
    error_type = "idempotency_key_reused"


class HeadersTooLarge(OutriggerError):
    status = 431
    error_type = "headers_too_large"


class Rejected(OutriggerError):
    """Refused before reaching the upstream. On a retry, the previous upstream outcome is returned instead."""


class RateLimited(Rejected):
    status = 429
    error_type = "rate_limited"


class CircuitOpen(Rejected):
    status = 503
    error_type = "circuit_open"


class Overloaded(Rejected):
    status = 503
    error_type = "overloaded"


class UpstreamUnreachable(OutriggerError):
    status = 502
    error_type = "upstream_unreachable"


class ConnectFailure(UpstreamUnreachable):
    """No connection could be made (refused, DNS, TLS handshake, connect timeout)."""

    condition = "connect-failure"


class ConnectionReset(UpstreamUnreachable):
    """The connection closed before a complete response head arrived."""

    condition = "reset"


class CredentialsUnavailable(OutriggerError):
    """No credential to send: the OAuth2 token endpoint failed or answered nonsense. Not an attempt
    outcome (the upstream was never asked), so neither retried nor counted by the breaker."""

    status = 502
    error_type = "credentials_unavailable"


class ClientDisconnected(OutriggerError):
    """The app went away (or broke off its body): not the upstream's fault, so neither retried
    nor counted by the breaker."""

    status = 499
    error_type = "client_disconnected"


class Timeout(OutriggerError):
    status = 504
    error_type = "timeout"


class AttemptTimeout(Timeout):
    """One attempt exceeded per_try; the request deadline may still allow another."""

    condition = "timeout"


class FaultInjected(OutriggerError):
    """An abort injected by a fault drill (`faults.abort`): answered with the drill's status, never
    retried, never counted by the breaker, never replaced by a fallback."""

    error_type = "fault_injected"

    def __init__(self, message: str, *, status: int, host: str = "") -> None:
        super().__init__(message, host=host)
        self.status = status  # type: ignore[misc]  # the drill's own status, per instance


class WebhookRefused(OutriggerError):
    """An inbound webhook refused before it was handed on; messages name what failed, never the
    signature or the secret."""


class SignatureInvalid(WebhookRefused):
    status = 401
    error_type = "signature_invalid"


class SignatureExpired(WebhookRefused):
    status = 401
    error_type = "signature_expired"


class WebhookNotFound(WebhookRefused):
    status = 404
    error_type = "not_found"


class WebhookMethodNotAllowed(WebhookRefused):
    status = 405
    error_type = "method_not_allowed"

    def headers(self) -> CIMultiDict[str]:
        headers = super().headers()
        headers["Allow"] = "POST"
        return headers


LOCAL_REFUSALS = frozenset(
    cls.error_type
    for cls in (
        BadRequest,
        HostNotAllowed,
        AddressNotAllowed,
        ConnectNotSupported,
        IdempotencyKeyReused,
        HeadersTooLarge,
        BodyTooLarge,
        StoreUnavailable,
        RateLimited,
        CircuitOpen,
        Overloaded,
    )
)
"""Error types that mean "refused locally" (counted in outrigger_rejections_total)."""
