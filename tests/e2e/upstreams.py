"""Real loopback upstreams and raw HTTP/1.1 clients for the end-to-end tests.

Nothing here mocks the network: every helper opens real sockets on 127.0.0.1.

- `Recorder` + `recording_app`: an aiohttp upstream that keeps every request
  exactly as it arrived (raw target, raw header lines, raw body bytes, peer
  port) so tests can assert what Outrigger forwarded.
- `CountingUpstream`: an aiohttp upstream that counts requests per path; ``/slow`` answers
  late with a chosen status, anything else 200 ``ok`` (with chosen headers).
- `RawScriptedUpstream`: a bare asyncio TCP server that answers each path with
  pre-written response bytes, then keeps the connection, closes it, or resets
  it mid-body — the misbehaviour aiohttp's server would never produce.
- `RawConnection` / `raw_exchange`: a client that writes exact request bytes
  (no invented headers) and parses the response without hiding framing;
  `hang_up_after` sends bytes and leaves without reading an answer.
- `timed_get` / `TimedReply`: a GET whose reply knows when it was sent and
  finished, and checks an Outrigger error document (SPEC 5) for shape.
- `TlsMaterial`: a trustme CA with server and client certificates written
  to files, for `tls.ca_file` / `client_cert` / `client_key`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import aiohttp
import trustme
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict
from pytest_aiohttp import AiohttpServer

IO_TIMEOUT = 5.0
"""Upper bound for any single read in these helpers, so a hang fails a test instead of stalling it."""


# --------------------------------------------------------------------------- recording upstream


@dataclass(frozen=True)
class Seen:
    """One request as the upstream received it."""

    method: str
    raw_path: str
    raw_headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    peer_port: int

    @property
    def header_names(self) -> list[str]:
        return [name.decode("latin-1").lower() for name, _ in self.raw_headers]

    def getall(self, name: str) -> list[str]:
        wanted = name.lower().encode("latin-1")
        return [value.decode("latin-1") for key, value in self.raw_headers if key.lower() == wanted]

    def get(self, name: str) -> str | None:
        values = self.getall(name)
        return values[0] if values else None


@dataclass
class Recorder:
    seen: list[Seen] = field(default_factory=list)

    @property
    def last(self) -> Seen:
        assert self.seen, "the upstream received no request"
        return self.seen[-1]


Responder = Callable[[web.Request, Seen], Awaitable[web.StreamResponse]]


async def _ok(request: web.Request, seen: Seen) -> web.StreamResponse:
    return web.Response(body=b"ok", content_type="text/plain")


def recording_app(recorder: Recorder, respond: Responder = _ok) -> web.Application:
    """An upstream that records every request (body read in full) and answers with `respond`.

    Start it with ``aiohttp_server(app, auto_decompress=False)`` so that a
    gzip request body is recorded as the bytes on the wire.
    """

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        seen = Seen(
            method=request.method,
            raw_path=request.raw_path,
            raw_headers=tuple(request.raw_headers),
            body=body,
            peer_port=int(peer[1]) if peer else -1,
        )
        recorder.seen.append(seen)
        return await respond(request, seen)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def start_recording(
    aiohttp_server: AiohttpServer, respond: Responder = _ok, **server_kwargs: Any
) -> tuple[TestServer, Recorder]:
    """A running recording upstream on 127.0.0.1 (request bodies kept compressed)."""
    recorder = Recorder()
    server = await aiohttp_server(recording_app(recorder, respond), auto_decompress=False, **server_kwargs)
    return server, recorder


# --------------------------------------------------------------------------- counting upstream


@dataclass
class CountingUpstream:
    """Counts requests per path; /slow waits `delay` then answers `status`; anything else is 200."""

    status: int = 503
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits[request.path] = self.hits.get(request.path, 0) + 1
        with contextlib.suppress(aiohttp.ClientPayloadError, ConnectionError):
            await request.read()
        if request.path == "/slow":
            await asyncio.sleep(self.delay)
            return web.Response(status=self.status, text=f"upstream {self.status}")
        return web.Response(status=200, text="ok", headers=self.headers)

    async def start(self, aiohttp_server: AiohttpServer) -> CountingUpstream:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.server = await aiohttp_server(app)
        return self


# --------------------------------------------------------------------------- scripted raw upstream

After = Literal["keep", "close", "reset"]


@dataclass(frozen=True)
class RawScript:
    """Bytes to answer with, then what to do with the connection."""

    response: bytes
    after: After = "keep"
    pause: float = 0.0
    """Seconds to wait after writing `response` before `after` (lets the proxy relay a partial body)."""
    trickle: tuple[bytes, ...] = ()
    """Written after `response`, one piece every `trickle_interval` seconds (a slow drip)."""
    trickle_interval: float = 0.0


def response_bytes(head: str, body: bytes = b"") -> bytes:
    """`head` is the status line and header lines joined by \\n (no trailing blank line)."""
    return head.replace("\n", "\r\n").encode("latin-1") + b"\r\n\r\n" + body


class RawScriptedUpstream:
    """A minimal HTTP/1.1 server: reads one request head (+ Content-Length body), writes a script."""

    def __init__(self, scripts: dict[str, RawScript], max_requests_per_connection: int = 100) -> None:
        self.scripts = scripts
        self.max_requests_per_connection = max_requests_per_connection
        """Bounds every connection's loop; the upstream closes a connection that reaches it."""
        self.heads: list[bytes] = []
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> RawScriptedUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            for _ in range(self.max_requests_per_connection):
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.heads.append(head)
                length = _content_length(head)
                if length:
                    await reader.readexactly(length)
                target = head.split(b" ", 2)[1].decode("latin-1")
                path = target.split("?", 1)[0]
                script = self.scripts.get(path) or RawScript(
                    response_bytes("HTTP/1.1 404 Not Found\nContent-Length: 0")
                )
                writer.write(script.response)
                await writer.drain()
                for piece in script.trickle:
                    await asyncio.sleep(script.trickle_interval)
                    writer.write(piece)
                    await writer.drain()
                if script.pause:
                    await asyncio.sleep(script.pause)
                if script.after == "reset":
                    abort_with_rst(writer)
                    return
                if script.after == "close":
                    writer.close()
                    return
        finally:
            self._writers.discard(writer)
            if not writer.is_closing():
                writer.close()


def abort_with_rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), the way a crashing upstream would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


# --------------------------------------------------------------------------- raw client


@dataclass(frozen=True)
class RawResponse:
    status: int
    reason: str
    headers: CIMultiDict[str]
    body: bytes
    """The decoded body (chunked framing removed)."""
    framing: Literal["none", "length", "chunked", "close"]
    version: str = "HTTP/1.1"
    """The version on the status line, e.g. ``HTTP/1.1``."""
    closed: bool = False
    """True when the server closed the connection right after this response (`raw_exchange`
    with ``check_closed=True`` only)."""

    def getall(self, name: str) -> list[str]:
        return self.headers.getall(name, [])

    def get(self, name: str) -> str | None:
        return self.headers.get(name)

    @property
    def header_names(self) -> set[str]:
        return {key.lower() for key in self.headers}


class IncompleteBody(Exception):
    """The connection ended before the framing said the body was complete."""

    def __init__(self, received: bytes) -> None:
        super().__init__(f"body cut short after {len(received)} bytes")
        self.received = received


class RawConnection:
    """One client connection that writes exact bytes and parses responses strictly."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> RawConnection:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), IO_TIMEOUT)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_head(self, wait: float = IO_TIMEOUT) -> tuple[int, str, list[tuple[str, str]]]:
        """Read one response head, waiting at most `wait` seconds."""
        _version, status, reason, headers = await self._read_status_and_headers(wait)
        return status, reason, headers

    async def _read_status_and_headers(self, wait: float) -> tuple[str, int, str, list[tuple[str, str]]]:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), wait)
        lines = head.decode("latin-1").split("\r\n")
        match = re.match(r"(HTTP/\d\.\d) (\d{3})(?: (.*))?$", lines[0])
        assert match, f"not an HTTP response: {lines[0]!r}"
        headers = [
            (name.strip(), value.strip())
            for name, _, value in (line.partition(":") for line in lines[1:] if line)
        ]
        return match.group(1), int(match.group(2)), match.group(3) or "", headers

    async def read_response(self, method: str = "GET") -> RawResponse:
        version, status, reason, lines = await self._read_status_and_headers(IO_TIMEOUT)
        while 100 <= status < 200:  # interim responses carry no body
            version, status, reason, lines = await self._read_status_and_headers(IO_TIMEOUT)
        headers = CIMultiDict(lines)
        if method == "HEAD" or status in (204, 304):
            return RawResponse(status, reason, headers, b"", "none", version)
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return RawResponse(status, reason, headers, await self._read_chunked(), "chunked", version)
        if "content-length" in headers:
            length = int(headers["content-length"])
            try:
                body = await asyncio.wait_for(self.reader.readexactly(length), IO_TIMEOUT)
            except asyncio.IncompleteReadError as exc:
                raise IncompleteBody(exc.partial) from None
            return RawResponse(status, reason, headers, body, "length", version)
        body = await asyncio.wait_for(self.reader.read(), IO_TIMEOUT)
        return RawResponse(status, reason, headers, body, "close", version)

    async def _read_chunked(self) -> bytes:
        parts: list[bytes] = []
        try:
            for _ in range(1_000_000):
                size_line = await asyncio.wait_for(self.reader.readuntil(b"\r\n"), IO_TIMEOUT)
                size = int(size_line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    await asyncio.wait_for(self.reader.readuntil(b"\r\n"), IO_TIMEOUT)  # no trailers expected
                    return b"".join(parts)
                parts.append(await asyncio.wait_for(self.reader.readexactly(size), IO_TIMEOUT))
                await asyncio.wait_for(self.reader.readexactly(2), IO_TIMEOUT)
        except (asyncio.IncompleteReadError, ConnectionError):
            raise IncompleteBody(b"".join(parts)) from None
        raise AssertionError("too many chunks")

    async def at_eof(self) -> bool:
        """True when the peer closed the connection (reads nothing more)."""
        try:
            extra = await asyncio.wait_for(self.reader.read(1), IO_TIMEOUT)
        except ConnectionError:
            return True
        return extra == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), IO_TIMEOUT)


async def raw_exchange(
    port: int,
    request: bytes,
    method: str = "GET",
    *,
    within: float = 2 * IO_TIMEOUT,
    check_closed: bool = False,
) -> RawResponse:
    """Send exact request bytes on a fresh connection to 127.0.0.1:`port` and parse one response.

    The whole exchange takes at most `within` seconds. With `check_closed`, wait up to 0.5 s
    more to see whether the server closes the connection (`RawResponse.closed`).
    """
    async with asyncio.timeout(within):
        conn = await RawConnection.open(port)
        try:
            await conn.send(request)
            response = await conn.read_response(method)
            if check_closed:
                try:
                    async with asyncio.timeout(0.5):
                        closed = await conn.reader.read(1) == b""
                except TimeoutError:
                    closed = False
                except ConnectionError:
                    closed = True
                response = replace(response, closed=closed)
            return response
        finally:
            await conn.close()


async def hang_up_after(port: int, data: bytes, seconds: float) -> None:
    """Send `data` on a fresh connection, wait `seconds`, then close without reading an answer."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        await asyncio.sleep(seconds)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def request_bytes(head: str, body: bytes = b"") -> bytes:
    """Request head lines joined by \\n (no trailing blank line), CRLF-terminated on the wire."""
    return head.replace("\n", "\r\n").encode("latin-1") + b"\r\n\r\n" + body


def chunked(parts: list[bytes]) -> bytes:
    """Chunked transfer-coding framing for `parts`, with the last-chunk."""
    framed = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts if part)
    return framed + b"0\r\n\r\n"


# --------------------------------------------------------------------------- timed client


@dataclass(frozen=True)
class TimedReply:
    """A response read whole (header names lower-cased), with its send and finish times (loop time)."""

    status: int
    headers: dict[str, str]
    body: bytes
    started: float
    finished: float

    @property
    def elapsed(self) -> float:
        return self.finished - self.started

    def error(self, host: str = "upstream.test") -> dict[str, Any]:
        """The SPEC 5 error document, checked for shape."""
        assert self.headers.get("content-type", "").startswith("application/json"), self.headers
        document = json.loads(self.body)
        assert set(document) == {"error"}
        error: dict[str, Any] = document["error"]
        assert set(error) == {"type", "message", "host"}
        assert error["message"]
        assert error["host"] == host
        assert self.headers.get("x-outrigger-error") == error["type"]
        return error

    def error_type(self, host: str = "upstream.test") -> str | None:
        """The SPEC 5 error type when Outrigger answered itself, else None (upstream's own answer)."""
        if self.headers.get("x-outrigger-error") is None:
            return None
        return str(self.error(host)["type"])


async def timed_get(client: aiohttp.ClientSession, base: str, path: str = "/v1/things") -> TimedReply:
    """GET `base``path` with `client` and read the whole body."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with client.get(f"{base}{path}") as response:
        body = await response.read()
        headers = {k.lower(): v for k, v in response.headers.items()}
        return TimedReply(response.status, headers, body, started, loop.time())


# --------------------------------------------------------------------------- TLS


@dataclass
class TlsMaterial:
    """A private CA plus server (``localhost``) and client certificates, as PEM files."""

    ca: trustme.CA
    ca_file: Path
    server: trustme.LeafCert
    client_cert: Path
    client_key: Path
    client_name: str

    @classmethod
    def create(cls, directory: Path, server_name: str = "localhost") -> TlsMaterial:
        ca = trustme.CA()
        ca_file = directory / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        client_name = "app.client.outrigger.test"
        client = ca.issue_cert(client_name, common_name=client_name)
        client_cert = directory / "client.pem"
        client_key = directory / "client.key"
        client_cert.write_bytes(b"".join(blob.bytes() for blob in client.cert_chain_pems))
        client.private_key_pem.write_to_path(str(client_key))
        return cls(ca, ca_file, ca.issue_cert(server_name), client_cert, client_key, client_name)

    def server_context(
        self, *, require_client_cert: bool = False, sni_seen: list[str] | None = None
    ) -> ssl.SSLContext:
        """Server-side context for the upstream; records the SNI name each handshake offered."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server.configure_cert(context)
        if require_client_cert:
            self.ca.configure_trust(context)
            context.verify_mode = ssl.CERT_REQUIRED
        if sni_seen is not None:

            def remember(sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, ctx: ssl.SSLContext) -> None:
                sni_seen.append(name or "")

            context.sni_callback = remember
        return context


def peer_subject_cn(request: web.BaseRequest) -> str | None:
    """The client certificate's subject CN on an mTLS connection, or None."""
    transport = request.transport
    cert = transport.get_extra_info("peercert") if transport is not None else None
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
