"""The app-facing HTTP/1.1 parser (proxy/server/protocol.py and aiohttp's parser under it) against
hostile request heads, on a real `outrigger run` process over raw sockets.

Named cases: request smuggling (obfuscated Transfer-Encoding, duplicate Content-Length), bare CR
or LF inside header values, invalid UTF-8 in header values and paths, absolute URIs with userinfo
or odd ports. Each gets its SPEC 5 answer, never reaches the upstream as something else, and the
next request on a new connection is served. (Malformed request lines, CL+TE, conflicting lengths
and oversized heads are in test_limits.py; the head deadline too.)

Then a hypothesis fuzz of request heads: whatever bytes arrive, the answer is a well-formed HTTP
response or a clean close within a bound, and the proxy stays healthy.
"""

from __future__ import annotations

import http.server
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from tests.conftest import Launch, loopback_policy, write_config
from tests.e2e.procs import OutriggerProcess, assert_error, config_ports

HEADER_TIMEOUT = 0.3
READ_BOUND_S = 5.0
"""Any answer (or close) must come within this; a partial head is answered at HEADER_TIMEOUT."""
FUZZ_EXAMPLES = 300


class _Upstream(http.server.BaseHTTPRequestHandler):
    """Answers 200 with the request it saw (method, path, framing headers), reading any body."""

    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self._read_chunked()  # left unread, its bytes would be a bogus next request on this connection
        elif length:
            self.rfile.read(length)
        seen = f"{self.command} {self.path} te={self.headers.get('Transfer-Encoding')} cl={length}"
        body = seen.encode("latin-1", "replace")
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _read_chunked(self) -> None:
        for _ in range(10_000):
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return
            self.rfile.read(size + 2)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _answer  # noqa: N815

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class Proxy:
    process: OutriggerProcess
    port: int
    upstream: http.server.ThreadingHTTPServer


@pytest.fixture
def proxy(launch: Launch, tmp_path: Path) -> Iterator[Proxy]:
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    upstream.daemon_threads = True
    thread = threading.Thread(target=upstream.serve_forever, daemon=True)
    thread.start()
    policy = loopback_policy(
        f"http://127.0.0.1:{upstream.server_address[1]}",
        timeouts={"connect": "1s", "per_try": "2s", "total": "3s", "idle": "1s"},
    )
    config = write_config(
        tmp_path,
        [policy],
        limits={"header_timeout": f"{HEADER_TIMEOUT * 1000:.0f}ms"},
        telemetry={"access_log": False},
    )
    port, _ = config_ports(config)
    process = launch(config)
    _wait_ready(process)
    yield Proxy(process, port, upstream)
    upstream.shutdown()
    upstream.server_close()
    assert "Traceback" not in process.output, process.output[-3000:]


def _wait_ready(process: OutriggerProcess, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    for _ in range(int(within / 0.05)):
        if time.monotonic() > deadline:
            break
        try:
            with socket.create_connection(("127.0.0.1", process.admin_port), timeout=1) as sock:
                sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"not ready:\n{process.output}")


INTERIM = re.compile(rb"^(?:HTTP/1\.[01] 1\d\d[^\r]*\r\n(?:[^\r]+\r\n)*\r\n)+")
"""``100 Continue`` and other 1xx heads before the final response."""


@dataclass(frozen=True)
class Exchange:
    """What came back on one connection (interim 1xx heads dropped), and whether it was closed."""

    raw: bytes
    closed: bool

    @property
    def data(self) -> bytes:
        return INTERIM.sub(b"", self.raw)

    @property
    def status(self) -> int | None:
        match = re.match(rb"HTTP/1\.[01] (\d{3}) ", self.data)
        return int(match.group(1)) if match else None

    @property
    def head(self) -> CIMultiDict[str]:
        head, _, _ = self.data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")[1:]
        return CIMultiDict(
            (name.strip(), value.strip()) for name, _, value in (ln.partition(":") for ln in lines)
        )

    @property
    def body(self) -> bytes:
        return self.data.partition(b"\r\n\r\n")[2]


def exchange(port: int, data: bytes, bound: float = READ_BOUND_S) -> Exchange:
    """Send `data`, then read until the first response is complete (by Content-Length; the head
    alone for HEAD) or the proxy closes; fail if neither happens within `bound` seconds."""
    head_only = data.startswith(b"HEAD ")
    received = b""
    deadline = time.monotonic() + bound
    with socket.create_connection(("127.0.0.1", port), timeout=bound) as sock:
        try:
            sock.sendall(data)
        except ConnectionError:
            return Exchange(received, True)
        for _ in range(10_000):
            left = deadline - time.monotonic()
            assert left > 0, (
                f"no answer and no close within {bound}s to {data[:200]!r}: got {received[:200]!r}"
            )
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return Exchange(received, True)
            except TimeoutError:
                raise AssertionError(f"hung: {data[:200]!r} -> {received[:200]!r}") from None
            if not chunk:
                return Exchange(received, True)
            received += chunk
            final = INTERIM.sub(b"", received)
            head, sep, body = final.partition(b"\r\n\r\n")
            if sep and head_only:
                return Exchange(received, False)
            if sep and b"\r\ncontent-length:" in head.lower():
                length = int(re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
                if len(body) >= length:
                    return Exchange(received, False)
    raise AssertionError("too many chunks")


def healthy(proxy: Proxy) -> None:
    """A normal request on a new connection is served end to end."""
    reply = exchange(proxy.port, b"GET /health HTTP/1.1\r\nHost: upstream.test\r\n\r\n")
    assert reply.status == 200, reply.data[:300]
    assert reply.body.startswith(b"GET /health "), reply.body


def _assert_refused(reply: Exchange, status: int, error_type: str) -> None:
    assert reply.status is not None, reply.data
    assert_error(reply.status, reply.head, reply.body, expected_status=status, error_type=error_type)


# --------------------------------------------------------------------------- smuggling

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: upstream.test\r\n\r\n"
OBFUSCATED_TE = {
    "xchunked": b"Transfer-Encoding: xchunked\r\n",
    "leading-space-value": b"Transfer-Encoding:  chunked\r\n",
    "chunked-then-identity": b"Transfer-Encoding: chunked, identity\r\n",
    "identity-then-chunked-twice": b"Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n",
    "space-before-colon": b"Transfer-Encoding : chunked\r\n",
    "tab-separated": b"Transfer-Encoding:\tchunked\r\n",
    "vertical-tab": b"Transfer-Encoding:\x0bchunked\r\n",
    "uppercase": b"Transfer-Encoding: CHUNKED\r\n",
}


@pytest.mark.parametrize("te", list(OBFUSCATED_TE.values()), ids=list(OBFUSCATED_TE))
def test_an_obfuscated_transfer_encoding_never_smuggles_a_request(proxy: Proxy, te: bytes) -> None:
    """With Content-Length beside it or not, a Transfer-Encoding Outrigger does not read as plain
    ``chunked`` is refused (400) or framed one way only: the upstream never sees /smuggled."""
    for framing in (b"", b"Content-Length: %d\r\n" % (len(b"0\r\n\r\n") + len(SMUGGLED))):
        request = b"POST /first HTTP/1.1\r\nHost: upstream.test\r\n" + te + framing + b"\r\n"
        reply = exchange(proxy.port, request + b"0\r\n\r\n" + SMUGGLED)
        if reply.status == 400:
            _assert_refused(reply, 400, "bad_request")
        else:
            assert reply.status == 200, reply.data[:300]
            assert b"/smuggled" not in reply.body
        healthy(proxy)


def test_duplicate_equal_content_lengths_are_refused_or_read_once(proxy: Proxy) -> None:
    request = (
        b"POST /first HTTP/1.1\r\nHost: upstream.test\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab"
    )
    reply = exchange(proxy.port, request + SMUGGLED)
    if reply.status == 400:
        _assert_refused(reply, 400, "bad_request")
    else:
        assert reply.status == 200
        assert reply.body.endswith(b"cl=2"), reply.body
    healthy(proxy)


# --------------------------------------------------------------------------- CR / LF / UTF-8 in heads

BAD_BYTES = {
    "bare-cr-in-value": b"GET /x HTTP/1.1\r\nHost: upstream.test\r\nX-A: a\rInjected: 1\r\n\r\n",
    "bare-lf-in-value": b"GET /x HTTP/1.1\r\nHost: upstream.test\r\nX-A: a\nInjected: 1\r\n\r\n",
    "cr-in-request-line": b"GET /x\r HTTP/1.1\r\nHost: upstream.test\r\n\r\n",
    "lf-in-request-target": b"GET /x\nGET /y HTTP/1.1\r\nHost: upstream.test\r\n\r\n",
}


@pytest.mark.parametrize("request_bytes", list(BAD_BYTES.values()), ids=list(BAD_BYTES))
def test_cr_or_lf_inside_a_line_is_a_bad_request(proxy: Proxy, request_bytes: bytes) -> None:
    _assert_refused(exchange(proxy.port, request_bytes), 400, "bad_request")
    healthy(proxy)


def test_invalid_utf8_in_a_header_value_passes_as_bytes_or_is_refused(proxy: Proxy) -> None:
    reply = exchange(proxy.port, b"GET /x HTTP/1.1\r\nHost: upstream.test\r\nX-Bin: \xff\xfe\xc3(\r\n\r\n")
    if reply.status == 400:
        _assert_refused(reply, 400, "bad_request")
    else:
        assert reply.status == 200, reply.data[:300]
    healthy(proxy)


@pytest.mark.parametrize("target", [b"/caf\xc3(", b"/\xff\xfe", b"/%ff%fe", b"/a%00b"])
def test_invalid_utf8_in_the_path_is_refused_or_forwarded_unchanged(proxy: Proxy, target: bytes) -> None:
    reply = exchange(proxy.port, b"GET " + target + b" HTTP/1.1\r\nHost: upstream.test\r\n\r\n")
    if reply.status == 400:
        _assert_refused(reply, 400, "bad_request")
    else:
        assert reply.status == 200, reply.data[:300]
        assert reply.body.startswith(b"GET " + target.decode("latin-1").encode("latin-1", "replace"))
    healthy(proxy)


ABSOLUTE = {
    "userinfo": (b"http://user:pw@upstream.test/x", 400, "bad_request"),
    "userinfo-no-password": (b"http://user@upstream.test/x", 400, "bad_request"),
    "empty-userinfo": (b"http://@upstream.test/x", 400, "bad_request"),
    "odd-port": (b"http://upstream.test:8081/x", 403, "host_not_allowed"),
    "port-65536": (b"http://upstream.test:65536/x", 400, "bad_request"),
    "empty-port": (b"http://upstream.test:/x", None, None),
    "https-scheme": (b"https://upstream.test/x", None, None),
    "ftp-scheme": (b"ftp://upstream.test/x", 400, "bad_request"),
}


@pytest.mark.parametrize(("target", "status", "error_type"), list(ABSOLUTE.values()), ids=list(ABSOLUTE))
def test_absolute_uris_with_userinfo_or_odd_ports(
    proxy: Proxy, target: bytes, status: int | None, error_type: str | None
) -> None:
    """`None`: any SPEC 5 refusal or a served request is fine, but never a 500 or a hang."""
    reply = exchange(proxy.port, b"GET " + target + b" HTTP/1.1\r\nHost: upstream.test\r\n\r\n")
    if status is not None and error_type is not None:
        _assert_refused(reply, status, error_type)
    else:
        assert reply.status is not None, reply.data
        assert reply.status < 500, reply.data[:300]
        if reply.status != 200:
            _assert_refused(reply, reply.status, reply.head["x-outrigger-error"])
    healthy(proxy)


# --------------------------------------------------------------------------- fuzz

METHODS = st.sampled_from(
    [b"GET", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"CONNECT", b"PATCH", b"G\x00T", b""]
)
TARGETS = st.one_of(
    st.sampled_from(
        [b"/", b"/x?a=1", b"*", b"http://upstream.test/x", b"http://u@upstream.test/", b"upstream.test:443",
         b"http://[::1]:80/", b"//x", b"/%", b"/\xff"]
    ),
    st.binary(max_size=30),
)  # fmt: skip
VERSIONS = st.sampled_from(
    [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.1 ", b"http/1.1", b""]
)
NAMES = st.one_of(
    st.sampled_from(
        [b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Expect", b"Upgrade", b"Te",
         b"x-outrigger-timeout-ms", b"x-outrigger-fault", b"Idempotency-Key", b"Host ", b""]
    ),
    st.binary(min_size=1, max_size=12),
)  # fmt: skip
VALUES = st.one_of(
    st.sampled_from(
        [b"upstream.test", b"0", b"5", b"-1", b"chunked", b"xchunked", b"keep-alive, Upgrade", b"close",
         b"100-continue", b"websocket", b"99999999999999999999", b"\xff\xfe"]
    ),
    st.binary(max_size=24),
)  # fmt: skip
EOLS = st.sampled_from([b"\r\n", b"\n", b"\r"])


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    eol = draw(EOLS)
    line = draw(METHODS) + b" " + draw(TARGETS) + b" " + draw(VERSIONS)
    headers = draw(st.lists(st.tuples(NAMES, VALUES), max_size=6))
    if draw(st.booleans()):
        headers.insert(0, (b"Host", b"upstream.test"))
    head = line + eol + b"".join(name + b": " + value + eol for name, value in headers)
    ending = draw(st.sampled_from([eol, b"", eol + draw(st.binary(max_size=40))]))
    data = head + ending
    if draw(st.integers(0, 9)) == 0:  # a mutation anywhere: bytes flipped, inserted or cut
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(max_size=8)) + data[at + draw(st.integers(0, 8)) :]
    return data


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=request_heads())
@example(data=b"HEAD / HTTP/1.0\r\n\r\n")
@example(data=b"HEAD / HTTP/1.1\r\nHost: upstream.test\r\n\r\n")
@example(data=b"GET /x HTTP/2.0\r\nHost: upstream.test\r\n\r\n")  # was: answered "HTTP/2.0 400"
@example(data=b"GET /x\r\nHost: upstream.test\r\n\r\n")  # was: answered "HTTP/0.9 400"
@example(data=b"GET /x HTTP/1.1\r\nHost: upstream.test\r\nContent-Length: 5\r\n\r\nab")
@example(data=b"GET /x HTTP/1.1\r\nHost: upstream.test\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
@example(data=b"GET /x HTTP/1.1\r\nHost: upstream.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
def test_any_request_head_gets_a_well_formed_answer_or_a_clean_close(proxy: Proxy, data: bytes) -> None:
    reply = exchange(proxy.port, data)
    if reply.data:
        assert re.match(rb"HTTP/1\.[01] [1-5]\d\d[ \r]", reply.data), reply.data[:200]
        assert b"\r\n\r\n" in reply.data, reply.data[:300]
        status = reply.status
        assert status is not None
        assert status != 500, (data, reply.data[:500])
        if reply.head.get("x-outrigger-error") and not data.startswith(b"HEAD "):
            _assert_refused(reply, status, reply.head["x-outrigger-error"])
    healthy(proxy)
