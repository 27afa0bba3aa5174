"""What flows through the pipeline: a request in, a (streaming) response out.

Every layer has the shape ``async def __call__(request, next) -> ProxyResponse``
(see pipeline.py); these types are the only thing layers share.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from multidict import CIMultiDict
from opentelemetry.context import Context

from proxy import errors
from proxy.config.model import Policy, PolicySettings, UpstreamTarget

CHUNK_SIZE = 64 * 1024
"""Read/write granularity when streaming; bounds per-request buffering."""

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


CONTROL_PREFIX = "x-outrigger-"
"""Outrigger's own headers: never forwarded upstream, and an upstream's never passed to the app."""


_NEVER_NAMED = frozenset({"", "close", "content-length"})
"""Connection tokens that never remove a header: Content-Length is the message's framing, and
dropping it on the app's say-so would turn a body into a second, smuggled request."""

REQUEST_DROP = HOP_BY_HOP | {"host", "expect"}
"""Not forwarded from the app: Host is the upstream's own; Outrigger answers Expect itself."""


def end_to_end_headers(
    pairs: Iterable[tuple[str, str]], drop: frozenset[str] = HOP_BY_HOP
) -> tuple[CIMultiDict[str], list[tuple[str, str]]]:
    """The headers to pass on, without hop-by-hop ones and those Connection names (RFC 9110
    7.6.1); Outrigger's own ``x-outrigger-*`` headers come back apart (lowercase names). One pass."""
    kept: list[tuple[str, str]] = []
    control: list[tuple[str, str]] = []
    named: set[str] | None = None
    for name, value in pairs:
        lower = name.lower()
        if lower in drop:
            if lower == "connection":
                named = (named or set()).union(t.strip().lower() for t in value.split(","))
        elif lower.startswith(CONTROL_PREFIX):
            control.append((lower, value))
        else:
            kept.append((name, value))
    if named and (named := named - drop - _NEVER_NAMED):
        kept = [(name, value) for name, value in kept if name.lower() not in named]
    return CIMultiDict(kept), control


class RequestBody:
    """The app's request body, streamed once or, when small enough, kept for replay.

    Buffering happens only when a layer asks for it (the retry layer, up to
    ``max_replay_bytes``); otherwise bytes pass straight through.
    """

    def __init__(self, source: AsyncIterator[bytes] | None, length: int | None) -> None:
        self._source = source
        self.length = length
        self._buffered: bytes | None = b"" if source is None else None
        self._prefix: list[bytes] = []
        self._streamed = False
        self.failed = False
        """The app's side broke off (disconnect, bad chunking) while we read its body."""

    @classmethod
    def held(cls, data: bytes) -> RequestBody:
        """Bytes already in memory (a stored event): replayable, their length known."""
        body = cls(_held(data) if data else None, len(data))
        body._buffered = data
        return body

    @property
    def present(self) -> bool:
        """The request has a body at all (even one still to be read)."""
        return self._source is not None

    @property
    def replayable(self) -> bool:
        """The same bytes can be sent again (buffered, or no body at all)."""
        return self._buffered is not None

    async def buffer(self, limit: int) -> bool:
        """Read the whole body if it fits in `limit` bytes; True when it is then replayable."""
        if self._buffered is not None:
            return len(self._buffered) <= limit
        if self._streamed or self._source is None or (self.length is not None and self.length > limit):
            return False
        size = sum(len(c) for c in self._prefix)
        async for chunk in self._read():
            self._prefix.append(chunk)
            size += len(chunk)
            if size > limit:
                return False
        self._buffered = b"".join(self._prefix)
        self._prefix = []
        return True

    def for_attempt(self) -> bytes | AsyncIterator[bytes] | None:
        """The body for one attempt: the same bytes every time, or the stream exactly once."""
        if self._source is None:
            return None
        if self._buffered is not None:
            return self._buffered
        if self._streamed:
            raise RuntimeError("a streamed request body cannot be sent twice")
        self._streamed = True
        return self._stream()

    async def _stream(self) -> AsyncIterator[bytes]:
        assert self._source is not None
        for chunk in self._prefix:
            yield chunk
        self._prefix = []
        async for chunk in self._read():
            yield chunk

    async def _read(self) -> AsyncIterator[bytes]:
        assert self._source is not None
        chunks = aiter(self._source)
        while True:
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except Exception as exc:
                self.failed = True
                raise errors.ClientDisconnected(
                    f"the app broke off its request body ({type(exc).__name__})"
                ) from exc
            yield chunk


async def _held(data: bytes) -> AsyncIterator[bytes]:
    yield data  # never read: a held body is buffered from the start


class ResponseBody(Protocol):
    def chunks(self) -> AsyncIterator[bytes]: ...

    def whole(self) -> bytes | None:
        """The entire body when all of it has already arrived (nothing left to wait for), else
        None. Taking it consumes it: then only `release` is called."""

    def release(self) -> None:
        """Give back the upstream connection (or drop it when the body was not read)."""


class BytesBody:
    def __init__(self, data: bytes) -> None:
        self.data = data

    async def chunks(self) -> AsyncIterator[bytes]:
        if self.data:
            yield self.data

    def whole(self) -> bytes | None:
        return self.data

    def release(self) -> None:
        return None


class PrefixedBody:
    """A body whose first chunks were already read (e.g. to try to store it), then the rest."""

    def __init__(self, prefix: list[bytes], rest: AsyncIterator[bytes], source: ResponseBody) -> None:
        self._prefix = prefix
        self._rest = rest
        self._source = source

    async def chunks(self) -> AsyncIterator[bytes]:
        for chunk in self._prefix:
            yield chunk
        async for chunk in self._rest:
            yield chunk

    def whole(self) -> bytes | None:
        return None  # the rest is still a stream

    def release(self) -> None:
        self._source.release()


class ReleasingBody:
    """Runs `on_release` exactly once when the body is released (a layer's hold ends with the body)."""

    def __init__(self, inner: ResponseBody, on_release: Callable[[], None]) -> None:
        self._inner = inner
        self._on_release: Callable[[], None] | None = on_release

    def chunks(self) -> AsyncIterator[bytes]:
        return self._inner.chunks()

    def whole(self) -> bytes | None:
        return self._inner.whole()

    def release(self) -> None:
        self._inner.release()
        if self._on_release is not None:
            on_release, self._on_release = self._on_release, None
            on_release()


class TunnelSink(Protocol):
    """Who takes a tunnel's bytes from the upstream (the app's side of a splice)."""

    def received(self, data: bytes) -> None: ...

    def ended(self) -> None:
        """The upstream closed its side."""

    def upstream_writable(self, writable: bool) -> None:
        """The upstream's write buffer filled up (False) or drained (True)."""


class Tunnel(Protocol):
    """An upstream connection carrying raw bytes: after ``101 Switching Protocols``, or CONNECT."""

    def attach(self, sink: TunnelSink) -> None: ...

    def send(self, data: bytes) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None: ...


@dataclass
class ProxyResponse:
    status: int
    headers: CIMultiDict[str]
    body: ResponseBody
    reason: str | None = None
    tunnel: Tunnel | None = None
    """Set on a 101 answer to an upgrade: the connection, now raw bytes both ways."""


@dataclass(frozen=True)
class RetryRecord:
    reason: str
    """The condition that caused it: ``connect-failure``, ``reset``, ``timeout``, a status, or ``hint``."""
    delay: float


@dataclass(frozen=True)
class HeaderEdits:
    """Header rules with their secrets rendered once, at build time: what an attempt applies."""

    remove: tuple[str, ...]
    set: tuple[tuple[str, str], ...]


@dataclass
class FailoverState:
    """One request's walk over its upstreams (the failover layer's per-request memory)."""

    primary: UpstreamTarget
    """The request's own upstream (the policy's, or the requested host)."""
    settings: PolicySettings
    headers: CIMultiDict[str]
    """The headers before the first attempt: each attempt starts from these, so one upstream's
    credentials never reach another."""
    index: int = 0
    """The upstream of the latest attempt (0 is the primary)."""
    move_on: bool = False
    """The latest attempt failed with a condition in ``failover.on``: the next one goes elsewhere."""
    edits: HeaderEdits | None = None
    """The header rules of a failover upstream for this attempt (None: the policy's own)."""
    moves: list[str] = field(default_factory=list)
    """Each upstream an attempt moved to (for ``outrigger_failovers_total``)."""


PRIORITIES = ("high", "normal", "low")
"""x-outrigger-priority values, in the order the rate limiter's queue serves them."""
DEFAULT_PRIORITY = "normal"


@dataclass
class ProxyRequest:
    method: str
    host: str
    """The host the app asked for (a policy's first host on a dedicated port): for errors and logs."""
    target: UpstreamTarget
    path_qs: str
    """Raw (still percent-encoded) path and query as the app sent them."""
    upgrade: str | None = field(default=None, kw_only=True)
    """The protocol an upgrade request asks for (``websocket``); None for plain HTTP."""
    headers: CIMultiDict[str]
    body: RequestBody
    policy: Policy
    settings: PolicySettings
    """The settings of the matched route (policy settings when no route matched)."""
    received_at: float = field(default_factory=time.monotonic)
    """Arrival (loop clock): the total deadline counts from here, bulkhead queueing included."""
    timeout_override: float | None = None
    """x-outrigger-timeout-ms, in seconds: may only lower `timeouts.total`."""
    priority: str = DEFAULT_PRIORITY
    """x-outrigger-priority (one of `PRIORITIES`): the order in which the rate limiter serves waiters."""
    deadline: float | None = None
    """Loop time by which the response head must have arrived (`total`)."""
    request_id: str = ""
    trace_context: Context | None = None
    """The SERVER span's context: each attempt's CLIENT span is its child."""
    traced: bool = True
    """False when the SERVER span does not record: attempts then make no span at all."""
    traceparent: str | None = None
    """When not traced: the ``traceparent`` every attempt sends (None: the app's own, untouched)."""
    attempts: int = 0
    attempt_outcomes: list[str] = field(default_factory=list)
    """Per attempt: a status class (``5xx``) or a failure kind (``connect-failure``), for metrics."""
    events: list[str] = field(default_factory=list)
    """Local refusals that did not end the request (e.g. a retry refused by the budget)."""
    retries: list[RetryRecord] = field(default_factory=list)
    """Why and after what delay each retry happened, for spans, logs and tests."""
    idempotency_key: str | None = None
    idempotency_key_injected: bool = False
    replayed: bool = False
    ratelimit_wait: float = 0.0
    """Seconds spent waiting for rate-limit tokens, over all attempts."""
    fault_requested: bool = False
    """The app sent ``x-outrigger-fault: on``: a ``header_only`` drill applies to this request."""
    fault: str | None = None
    """The fault a drill injected (``abort`` or ``delay``), for spans, metrics and logs."""
    fallback: str | None = None
    """Why the declared fallback answered (an error type, or the upstream status), else None."""
    failover: FailoverState | None = None
    """Set by the failover layer on the first attempt (policies with ``failover`` only)."""
    cache_result: str | None = None
    """A cached policy's answer: ``hit``, ``miss``, ``stale``, ``revalidated`` or ``bypass``."""
    cache_masked_error: str | None = None
    """The upstream failure a stale answer stood in for (an error type, or a status)."""
    credential_key: int | None = None
    """Index of the pooled API key the latest attempt used (None: no key pool): a provider's pause
    or cooldown then belongs to that key, not to the whole host."""
    delivery_id: str | None = None
    """Set when the request was stored for durable delivery and answered 202."""
    retry_at_once: bool = False
    """The latest attempt failed for a reason another attempt avoids (another key took over): the
    retry layer retries without a backoff wait, still within max_attempts and the budget."""


async def buffered(response: ProxyResponse, limit: int) -> tuple[ProxyResponse, bytes | None]:
    """Read the body if it is at most `limit` bytes: the upstream connection (and the attempt's
    span) are then released and the bytes returned. A larger body is handed on unread past the
    prefix already taken, still streaming."""
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > limit:
        return response, None
    chunks: list[bytes] = []
    size = 0
    source = response.body.chunks()
    try:
        async for chunk in source:
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                body = PrefixedBody(chunks, source, response.body)
                return ProxyResponse(response.status, response.headers, body, response.reason), None
    finally:
        if size <= limit:
            response.body.release()
    data = b"".join(chunks)
    return ProxyResponse(response.status, response.headers, BytesBody(data), response.reason), data


Handler = Callable[[ProxyRequest], Awaitable[ProxyResponse]]


class Layer(Protocol):
    async def __call__(self, request: ProxyRequest, next: Handler) -> ProxyResponse: ...
