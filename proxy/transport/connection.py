"""One HTTP/1.1 connection to an upstream, driven by httptools (llhttp) from an asyncio.Protocol.

A connection carries one exchange at a time. The parser's callbacks fill the
response head and queue body chunks; the pipeline reads them through
`ResponseStream`. Reading pauses when the app is slower than the upstream, so
a response never piles up in memory. Nothing is ever resent here: a failure
becomes an error of our family (`failures.py`) for the retry layer to judge.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import cast

import httptools

from proxy import errors
from proxy.config.model import Timeouts
from proxy.exchange import TunnelSink
from proxy.transport import failures

HIGH_WATER = 256 * 1024
"""Buffered response bytes at which reading from the upstream pauses."""
LOW_WATER = 64 * 1024
"""...and below which it resumes."""


@dataclass(slots=True)
class ResponseHead:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    """As received, in order, repeated names kept (trailers are not part of it)."""


class _HeadDone(Exception):
    """Stops the parser: after the head of a HEAD request's response, or at a head too large."""


class UpstreamConnection(asyncio.Protocol):
    """The protocol object of one upstream connection (see the module docstring)."""

    def __init__(self, authority: str, max_head_bytes: int, on_close: Callable[[UpstreamConnection], None]):
        self.authority = authority
        """host[:port] the connection serves, for error messages (never a path or query)."""
        self._max_head_bytes = max_head_bytes
        self._on_close = on_close
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.reusable = False
        """True once an exchange finished cleanly and both sides allow keep-alive."""
        self._parser = httptools.HttpResponseParser(self)
        """One parser for the connection's life: llhttp reads response after response."""
        self._busy = False
        self._head_waiter: asyncio.Future[ResponseHead] | None = None
        self._reason = ""
        self._headers: list[tuple[str, str]] = []
        self._head_bytes = 0
        self._head_only = False
        self._interim = False
        self._head_done = False
        self._body: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._body_waiter: asyncio.Future[None] | None = None
        self._complete = False
        self._close_delimited = False
        self._keep_alive = False
        self._request_written = False
        self._failure: errors.OutriggerError | None = None
        self._reading_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._writing_paused = False
        self._upgrade_requested = False
        self._switched = False
        """After 101 (or for CONNECT): raw bytes both ways, handed to `_sink` (see `attach`)."""
        self._sink: TunnelSink | None = None
        self._early: list[bytes] = []
        """Tunnel bytes that arrived before a sink was attached."""

    @property
    def open(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        if self._switched:
            self._tunnel_bytes(data)
            return
        if not self._busy or self._complete:
            self.abort()  # bytes nobody asked for: this connection can no longer be trusted
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:  # after a 101: the rest is the new protocol
            if self._switched and (tail := data[upgrade.args[0] :]):
                self._tunnel_bytes(tail)
            elif not self._switched:
                self._fail(failures.invalid_response(self.authority, "an upgrade nobody asked for"))
                self.abort()
            return
        except httptools.HttpParserError as exc:
            if self._head_only and self._head_done and self._failure is None:
                self._finish_message()  # stopped on purpose by on_headers_complete (HEAD)
                if data.endswith(b"\r\n\r\n"):  # nothing after the head: the connection stays good
                    self._parser = httptools.HttpResponseParser(self)  # llhttp stays stopped otherwise
                    return
            elif self._failure is None:
                self._fail(failures.invalid_response(self.authority, str(exc) or type(exc).__name__))
            self.abort()  # nothing after this point can be trusted to belong to an exchange
            return
        if not self._head_done:
            self._head_bytes += len(data)  # all of it is head so far
            if self._head_bytes > self._max_head_bytes:
                self._fail(failures.head_too_large(self.authority, self._max_head_bytes))
                self.abort()

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost finishes the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        if self._sink is not None:
            self._sink.ended()
        if self._head_done and not self._complete and self._close_delimited and self._failure is None:
            self._finish_message()  # the upstream's close is this body's end
        elif not self._complete:
            if self._head_done:
                self._fail(failures.body_cut(self.authority, exc))
            elif self._busy:
                self._fail(failures.closed_before_response(self.authority, exc))
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._on_close(self)

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self._sink is not None:
            self._sink.upstream_writable(False)

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._sink is not None:
            self._sink.upstream_writable(True)
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ------------------------------------------------------------------ httptools callbacks

    def on_status(self, reason: bytes) -> None:
        self._reason += reason.decode("utf-8", "surrogateescape")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._head_done:  # after the head: chunked trailers, dropped
            self._headers.append(
                (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
            )

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if not 100 <= status <= 599:
            self._fail(failures.invalid_response(self.authority, f"status {status} is not HTTP's"))
            raise _HeadDone
        if status == 101 and self._upgrade_requested:
            self._switched = self._head_done = True
            if self._head_waiter is not None and not self._head_waiter.done():
                self._head_waiter.set_result(ResponseHead(status, self._reason, self._headers))
            return
        if 100 <= status < 200:  # 100 Continue and friends: wait for the final head
            self._interim = True
            self._reason, self._headers = "", []
            return
        if len(self._reason) + sum(len(n) + len(v) + 4 for n, v in self._headers) > self._max_head_bytes:
            self._fail(failures.head_too_large(self.authority, self._max_head_bytes))
            raise _HeadDone  # stop parsing; data_received aborts the connection
        self._head_done = True
        self._keep_alive = self._parser.should_keep_alive()
        bodyless = self._head_only or status in (204, 304)
        codings = [
            coding.strip().lower()
            for name, value in self._headers
            if name.lower() == "transfer-encoding"
            for coding in value.split(",")
        ]
        if not bodyless and any(coding != "chunked" for coding in codings):
            # Transfer-codings are hop-by-hop: the app would get gzip bytes labelled as plain ones
            unsupported = ", ".join(c for c in codings if c != "chunked")
            self._fail(
                failures.invalid_response(self.authority, f"unsupported transfer-coding {unsupported}")
            )
            raise _HeadDone
        if not bodyless:
            self._close_delimited = not codings and not any(
                name.lower() == "content-length" for name, _ in self._headers
            )
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(ResponseHead(status, self._reason, self._headers))
        if self._head_only:
            raise _HeadDone

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake_reader()

    def on_message_complete(self) -> None:
        if self._switched:
            return
        if self._interim:
            self._interim = False
            return
        self._keep_alive = self._keep_alive and self._parser.should_keep_alive()
        self._finish_message()

    # ------------------------------------------------------------------ one exchange

    async def exchange(
        self,
        head: bytes,
        body: bytes | AsyncIterator[bytes] | None,
        chunked: bool,
        head_only: bool,
        timeouts: Timeouts,
        upgrade: bool = False,
    ) -> ResponseHead:
        """Send one request and return once its response head has arrived.

        `per_try` runs from the moment the whole request was written; while a streamed body is
        uploaded, `idle` bounds each silence instead (SPEC 4)."""
        transport = self.transport
        assert transport is not None, "not connected"
        assert not self._busy, "one exchange at a time"
        self._busy = True
        self._upgrade_requested = upgrade
        self._head_only = head_only
        waiter: asyncio.Future[ResponseHead] = asyncio.get_running_loop().create_future()
        self._head_waiter = waiter
        if body is None or isinstance(body, bytes):
            transport.write(head + _framed(body, chunked) if body is not None else head)
            self._request_written = True
            return await self._head(waiter, timeouts.per_try)
        transport.write(head)
        writer = asyncio.ensure_future(self._write_stream(body, chunked, timeouts.idle))
        try:
            await asyncio.wait((waiter, writer), return_when=asyncio.FIRST_COMPLETED)
            if not waiter.done():
                writer.result()  # the body failed first (app gone or stalled, upstream closed): raise that
                return await self._head(waiter, timeouts.per_try)
        finally:
            if not writer.done():  # the upstream answered before reading the whole body
                writer.cancel()
        return waiter.result()

    async def _head(self, waiter: asyncio.Future[ResponseHead], per_try: float) -> ResponseHead:
        if waiter.done():
            return waiter.result()
        timer = asyncio.get_running_loop().call_later(per_try, self._no_head, per_try)
        try:
            return await waiter
        finally:
            timer.cancel()

    def _no_head(self, per_try: float) -> None:
        self._fail(failures.no_head(self.authority, per_try))
        self.abort()

    async def _write_stream(self, body: AsyncIterator[bytes], chunked: bool, idle: float) -> None:
        transport = self.transport
        assert transport is not None
        chunks = aiter(body)
        while not self.closed:
            try:
                async with asyncio.timeout(idle):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise failures.upload_stalled(idle) from None
            if chunk:
                transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            if self._writing_paused:
                await self._drained(idle)
        if self.closed:
            raise self._failure or failures.closed_before_response(self.authority, None)
        if chunked:
            transport.write(b"0\r\n\r\n")
        self._request_written = True

    async def _drained(self, idle: float) -> None:
        loop = asyncio.get_running_loop()
        self._drain_waiter = waiter = loop.create_future()
        timer = loop.call_later(idle, _expire, waiter)
        try:
            await waiter
        except TimeoutError:
            raise failures.upload_not_read(self.authority, idle) from None
        finally:
            timer.cancel()
            self._drain_waiter = None

    def stream(self, idle_timeout: float, on_done: Callable[[UpstreamConnection], None]) -> ResponseStream:
        return ResponseStream(self, idle_timeout, on_done)

    async def next_chunk(self, idle_timeout: float) -> bytes | None:
        """The next body bytes (all that is buffered, joined), or None at the end of the body."""
        while True:
            if self._body:
                chunk = self._body.popleft() if len(self._body) == 1 else b"".join(self._body)
                self._body.clear()
                self._buffered = 0
                if self._reading_paused and self.transport is not None and not self.closed:
                    self._reading_paused = False
                    self.transport.resume_reading()
                return chunk
            if self._failure is not None:
                raise self._failure
            if self._complete:
                return None
            loop = asyncio.get_running_loop()
            self._body_waiter = waiter = loop.create_future()
            timer = loop.call_later(idle_timeout, _expire, waiter)
            try:
                await waiter
            except TimeoutError:
                raise failures.body_stalled(self.authority, idle_timeout) from None
            finally:
                timer.cancel()
                self._body_waiter = None

    def whole_body(self) -> bytes | None:
        """The body when it has fully arrived already (small responses come with their head)."""
        if not self._complete or self._failure is not None:
            return None
        body = b"".join(self._body)
        self._body.clear()
        self._buffered = 0
        return body

    def done_with_exchange(self) -> None:
        """Ready for the next exchange when this one ended cleanly; otherwise the connection goes."""
        self.reusable = self._complete and self._keep_alive and self._request_written and not self.closed
        self._busy = False
        self._head_waiter = None
        self._reason, self._headers, self._head_bytes = "", [], 0
        self._head_only = self._interim = self._head_done = self._complete = False
        self._close_delimited = self._keep_alive = self._request_written = False
        self._body.clear()
        self._buffered = 0
        self._failure = None
        if self._reading_paused and self.reusable and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    # ------------------------------------------------------------------ tunnel mode

    def as_tunnel(self) -> UpstreamConnection:
        """A raw connection from the start (CONNECT): no HTTP is read from it."""
        self._switched = True
        return self

    def attach(self, sink: TunnelSink) -> None:
        """Deliver the tunnel's bytes to `sink` from now on (those already here first)."""
        self._sink = sink
        early, self._early = self._early, []
        for data in early:
            sink.received(data)
        self.resume_reading()  # in case the early bytes had paused it
        if self.closed:
            sink.ended()

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        """Flush what is written, then close (a tunnel's orderly end)."""
        self.reusable = False
        if self.transport is not None and not self.closed:
            self.transport.close()

    def _tunnel_bytes(self, data: bytes) -> None:
        if self._sink is not None:
            self._sink.received(data)
        else:
            self._early.append(data)
            if sum(map(len, self._early)) > HIGH_WATER:
                self.pause_reading()  # attach() runs soon; until then, do not pile up

    def abort(self) -> None:
        self.reusable = False
        if self.transport is not None and not self.closed and not self.transport.is_closing():
            self.transport.abort()  # a close already under way (a tunnel's end) flushes first

    # ------------------------------------------------------------------ internals

    def _finish_message(self) -> None:
        self._complete = True
        self._wake_reader()

    def _fail(self, failure: errors.OutriggerError) -> None:
        if self._failure is not None:
            return
        self._failure = failure
        head = self._head_waiter
        if head is not None and not head.done():
            head.set_exception(failure)
        self._wake_reader()

    def _wake_reader(self) -> None:
        waiter = self._body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


def _framed(body: bytes, chunked: bool) -> bytes:
    if not chunked:
        return body
    return (b"%x\r\n%b\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"


class ResponseStream:
    """The upstream response body as the pipeline reads it (`exchange.ResponseBody`)."""

    __slots__ = ("_connection", "_idle_timeout", "_on_done")

    def __init__(
        self,
        connection: UpstreamConnection,
        idle_timeout: float,
        on_done: Callable[[UpstreamConnection], None],
    ) -> None:
        self._connection: UpstreamConnection | None = connection
        self._idle_timeout = idle_timeout
        self._on_done = on_done

    async def chunks(self) -> AsyncIterator[bytes]:
        connection = self._connection
        if connection is None:
            raise RuntimeError("the response body was already released")
        while (chunk := await connection.next_chunk(self._idle_timeout)) is not None:
            yield chunk

    def whole(self) -> bytes | None:
        connection = self._connection
        return None if connection is None else connection.whole_body()

    def release(self) -> None:
        """Give the connection back to its pool when the body was read to its end, else close it."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.done_with_exchange()
            self._on_done(connection)
