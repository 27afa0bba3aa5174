"""OAuth2 client credentials (RFC 6749 4.4): one cached token per policy, fetched once, refreshed early.

oauthlib prepares the token request body and parses the token response (its
checks: JSON or form body, ``error`` responses, ``access_token`` present,
``expires_in`` an integer); this module owns the HTTP call (timeouts, a small
retry with backoff, a CLIENT span) and the cache. Every concurrent request
shares one fetch; a token within ``refresh_before`` of its expiry is still
served while one background refresh replaces it. Neither the secret nor the
token goes into a message, a span or /state; the token endpoint's body is
never echoed (an RFC 6749 5.2 error code, a fixed vocabulary, is named).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

import aiohttp
from oauthlib.oauth2 import BackendApplicationClient, MissingTokenError, OAuth2Error
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, StatusCode
from yarl import URL

from proxy import errors
from proxy.clock import Clock
from proxy.config import defaults
from proxy.config.model import OAuth2Settings
from proxy.layers.backoff import DEFAULT_UNIFORM, full_jitter
from proxy.telemetry.names import redact_query

log = logging.getLogger("outrigger.credentials")

ATTR_TOKEN_FETCH = "outrigger.credentials.token_fetch"
"""On the token endpoint's CLIENT span: ``first`` (a request waits), ``refresh`` (background) or
``rejected`` (after an upstream 401)."""

_RFC6749_ERRORS = frozenset(
    {
        "invalid_request",
        "invalid_client",
        "invalid_grant",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
    }
)
"""Error codes a token endpoint may answer (RFC 6749 5.2): safe to name, unlike its description."""

_NOT_TRACED = trace.NoOpTracer()


@dataclass(frozen=True)
class SpanParent:
    """Where a token fetch's span goes: the tracer and the SERVER span of the request that needed it."""

    tracer: trace.Tracer = _NOT_TRACED
    context: Context | None = None


@dataclass(frozen=True)
class _Token:
    value: str
    expires_at: float
    """Loop-clock time after which the token is not sent any more."""
    refresh_at: float


class _Retryable(Exception):
    """One call failed in a way another call may not (connect failure, timeout, 429, 5xx)."""


class TokenSource:
    """The token of one client (settings plus rendered id and secret), cached and refreshed."""

    def __init__(
        self,
        name: str,
        settings: OAuth2Settings,
        client_id: str,
        client_secret: str,
        clock: Clock,
        uniform: Callable[[float, float], float] = DEFAULT_UNIFORM,
    ) -> None:
        self.name = name
        self.settings = settings
        self._client_id = client_id
        self._client_secret = client_secret
        self._clock = clock
        self._uniform = uniform
        self._url = URL(settings.token_url)
        self._shown_url = redact_query(
            f"{self._url.scheme}://{self._url.raw_authority}{self._url.raw_path_qs}"
        )
        self._token: _Token | None = None
        self._fetch: asyncio.Task[_Token] | None = None
        self._refresh_not_before = -math.inf
        self.fetches = 0
        """Completed token fetches, successful or not (for /state)."""
        self.last_error: str | None = None

    def same_client(self, settings: OAuth2Settings, client_id: str, client_secret: str) -> bool:
        """Whether a reloaded config names this very client (then its token carries over)."""
        return (settings, client_id, client_secret) == (self.settings, self._client_id, self._client_secret)

    async def token(self, parent: SpanParent) -> str:
        """A valid token: the cached one (starting a background refresh when it is due), else the
        result of the one fetch every waiting request shares."""
        now = self._clock.now()
        token = self._token
        if token is not None and now < token.expires_at:
            if now >= token.refresh_at and self._fetch is None and now >= self._refresh_not_before:
                self._start(parent, "refresh")
            return token.value
        task = self._fetch or self._start(parent, "first")
        return (await asyncio.shield(task)).value  # a request that gives up leaves the fetch running

    def rejected(self, value: str) -> None:
        """The upstream answered 401 to `value`: it is not sent again (a newer token is kept)."""
        if self._token is not None and self._token.value == value:
            self._token = None

    def snapshot(self) -> dict[str, object]:
        """For /state: whether a token is held and for how long, never the token."""
        now = self._clock.now()
        token = self._token if self._token is not None and now < self._token.expires_at else None
        return {
            "token_url": self._shown_url,
            "token": "valid" if token is not None else "none",
            "expires_in_seconds": round(token.expires_at - now, 3) if token is not None else None,
            "refreshing": self._fetch is not None,
            "fetches": self.fetches,
            "last_error": self.last_error,
        }

    def _start(self, parent: SpanParent, why: str) -> asyncio.Task[_Token]:
        task = asyncio.get_running_loop().create_task(self._run(parent, why))
        self._fetch = task
        task.add_done_callback(_retrieve)
        return task

    async def _run(self, parent: SpanParent, why: str) -> _Token:
        try:
            token = await self._fetch_with_retries(parent, why)
        except errors.CredentialsUnavailable as error:
            self.last_error = error.message
            self._refresh_not_before = self._clock.now() + defaults.OAUTH2_REFRESH_RETRY_S
            if why == "refresh":
                log.warning("%s; the current token serves until it expires", error.message)
            raise
        finally:
            self.fetches += 1
            self._fetch = None
        self._token = token
        self.last_error = None
        return token

    async def _fetch_with_retries(self, parent: SpanParent, why: str) -> _Token:
        timeout = aiohttp.ClientTimeout(
            total=defaults.OAUTH2_REQUEST_TIMEOUT_S, sock_connect=defaults.OAUTH2_CONNECT_TIMEOUT_S
        )
        async with aiohttp.ClientSession(timeout=timeout, cookie_jar=aiohttp.DummyCookieJar()) as session:
            for attempt in range(1, defaults.OAUTH2_ATTEMPTS + 1):
                try:
                    return await self._call(session, parent, why, attempt)
                except _Retryable as failure:
                    if attempt == defaults.OAUTH2_ATTEMPTS:
                        raise errors.CredentialsUnavailable(
                            f"the token endpoint {self._shown_url} failed {attempt} times"
                            f" (last: {failure}); no token for {self.name}"
                        ) from None
                    log.info("token endpoint %s: %s; trying again", self._shown_url, failure)
                await self._clock.sleep(
                    full_jitter(
                        attempt, defaults.OAUTH2_BACKOFF_BASE_S, defaults.OAUTH2_BACKOFF_MAX_S, self._uniform
                    )
                )
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _call(
        self, session: aiohttp.ClientSession, parent: SpanParent, why: str, attempt: int
    ) -> _Token:
        """One POST to the token endpoint, in its own CLIENT span."""
        span = parent.tracer.start_span("POST", context=parent.context, kind=SpanKind.CLIENT)
        if span.is_recording():
            span.set_attributes(
                {
                    "http.request.method": "POST",
                    "url.full": self._shown_url,
                    "server.address": self._url.host or "",
                    "server.port": self._url.port or 0,
                    ATTR_TOKEN_FETCH: why,
                    **({"http.request.resend_count": attempt - 1} if attempt > 1 else {}),
                }
            )
        try:
            status, body = await self._post(session)
            span.set_attribute("http.response.status_code", status)
            if status == 429 or status >= 500:
                raise _Retryable(f"answered {status}")
            return self._parse(status, body)
        except (_Retryable, errors.CredentialsUnavailable) as failure:
            span.set_attribute("error.type", _error_type(failure))
            span.set_status(StatusCode.ERROR)
            raise
        finally:
            span.end()

    async def _post(self, session: aiohttp.ClientSession) -> tuple[int, bytes]:
        body_auth = self.settings.auth == "body"
        form = BackendApplicationClient(self._client_id).prepare_request_body(
            scope=self.settings.scope,
            include_client_id=body_auth,
            client_secret=self._client_secret if body_auth else None,
            audience=self.settings.audience,
        )
        headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
        if not body_auth:
            pair = f"{quote(self._client_id, safe='')}:{quote(self._client_secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        try:
            async with session.post(
                self._url, data=form.encode(), headers=headers, allow_redirects=False
            ) as response:
                data = await response.content.read(defaults.OAUTH2_MAX_RESPONSE_BYTES + 1)
                status = response.status
        except TimeoutError:
            raise _Retryable("timed out") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise _Retryable(f"cannot connect ({type(exc).__name__})") from None
        return status, data

    def _parse(self, status: int, data: bytes) -> _Token:
        """A token from a 200 response; anything else is CredentialsUnavailable, without the body."""

        def unavailable(problem: str) -> errors.CredentialsUnavailable:
            return errors.CredentialsUnavailable(
                f"the token endpoint {self._shown_url} answered {status} with {problem};"
                f" no token for {self.name}"
            )

        if len(data) > defaults.OAUTH2_MAX_RESPONSE_BYTES:
            raise unavailable("a body over the size limit")
        try:
            parsed = BackendApplicationClient(self._client_id).parse_request_body_response(
                data.decode("utf-8")
            )
        except MissingTokenError:
            raise unavailable("no access_token") from None
        except OAuth2Error as exc:
            named = f"error {exc.error}" if exc.error in _RFC6749_ERRORS else "an error response"
            raise unavailable(named) from None
        except (ValueError, TypeError, AttributeError, Warning):  # not JSON, a scope warning, ...
            raise unavailable("a malformed token response") from None
        value = parsed.get("access_token")
        if status != 200:
            raise unavailable("a token but not status 200")
        if not isinstance(value, str) or not value or not value.isprintable():
            raise unavailable("a malformed access_token")
        expires_in = parsed.get("expires_in")
        lifetime = float(expires_in) if isinstance(expires_in, int) and expires_in > 0 else None
        lifetime = lifetime or defaults.OAUTH2_DEFAULT_LIFETIME_S
        now = self._clock.now()
        early = min(self.settings.refresh_before, lifetime / 2)  # a short-lived token is still used a while
        return _Token(value, now + lifetime, now + lifetime - early)


def _error_type(failure: Exception) -> str:
    return "token_endpoint_failed" if isinstance(failure, _Retryable) else "credentials_unavailable"


def _retrieve(task: asyncio.Task[_Token]) -> None:
    """A background refresh nobody awaits must not log "exception was never retrieved"."""
    if not task.cancelled():
        with contextlib.suppress(BaseException):
            task.exception()
