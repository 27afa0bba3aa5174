"""Every way the upstream leg fails, as the error of our family it is (SPEC 5, retry conditions).

The one place transport failures are named: messages carry the upstream's
authority and the OS's own text for an errno, never a URL (paths and
queries can hold secrets).
"""

from __future__ import annotations

import os
import ssl

from proxy import errors
from proxy.config.units import format_duration


def describe(exc: BaseException | None) -> str:
    """The cause in words: the OS text for an errno, else the exception's type."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return exc.verify_message or "certificate verification failed"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    if exc is None:
        return "closed by the upstream"
    return type(exc).__name__


def cannot_connect(authority: str, exc: OSError) -> errors.ConnectFailure:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return errors.ConnectFailure(f"TLS certificate of {authority} rejected: {describe(exc)}")
    if isinstance(exc, ssl.SSLError):
        return errors.ConnectFailure(f"TLS handshake with {authority} failed: {exc.reason or describe(exc)}")
    return errors.ConnectFailure(f"cannot connect to {authority}: {describe(exc)}")


def connect_timed_out(authority: str, connect: float) -> errors.ConnectFailure:
    return errors.ConnectFailure(
        f"no connection to {authority} within connect {format_duration(connect)}"
        " (DNS, pool wait, TCP and TLS)"
    )


def cannot_resolve(host: str, exc: OSError | None) -> errors.ConnectFailure:
    if exc is None:
        return errors.ConnectFailure(f"{host} has no addresses")
    return errors.ConnectFailure(f"cannot resolve {host}: {exc.strerror or describe(exc)}")


def closed_before_response(authority: str, exc: BaseException | None) -> errors.ConnectionReset:
    return errors.ConnectionReset(f"connection to {authority} closed before a response: {describe(exc)}")


def body_cut(authority: str, exc: BaseException | None) -> errors.ConnectionReset:
    return errors.ConnectionReset(f"{authority} broke off the response body: {describe(exc)}")


def body_stalled(authority: str, idle: float) -> errors.AttemptTimeout:
    return errors.AttemptTimeout(f"{authority} stopped sending the response body for {format_duration(idle)}")


def invalid_response(authority: str, reason: str) -> errors.UpstreamUnreachable:
    return errors.UpstreamUnreachable(f"{authority} sent an invalid HTTP response: {reason}")


def head_too_large(authority: str, limit: int) -> errors.UpstreamUnreachable:
    return errors.UpstreamUnreachable(f"{authority} sent a response head larger than {limit} bytes")


def no_head(authority: str, per_try: float) -> errors.AttemptTimeout:
    return errors.AttemptTimeout(
        f"{authority} sent no response head within per_try {format_duration(per_try)}"
    )


def upload_not_read(authority: str, idle: float) -> errors.AttemptTimeout:
    return errors.AttemptTimeout(f"{authority} stopped reading the request body for {format_duration(idle)}")


def upload_stalled(idle: float) -> errors.Timeout:
    """The app's fault, not the upstream's: answered 504, never retried, neutral for the breaker."""
    return errors.Timeout(f"the app's request body stalled for longer than idle {format_duration(idle)}")
