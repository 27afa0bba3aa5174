"""The upstream client the pipeline's last layer calls: one attempt, one exchange.

Resolve and check the host (`resolver.py`), take a pooled connection to a
checked address or open one (`pool.py`), write the request exactly as the
app sent it (target, header order and repeats; nothing invented), and
return at the response head with the body still streaming.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

from proxy import errors
from proxy.config import defaults
from proxy.config.model import PolicySettings, TlsSettings, UpstreamTarget
from proxy.exchange import ProxyRequest, ProxyResponse, end_to_end_headers
from proxy.tls import client_context
from proxy.transport import failures
from proxy.transport.connection import UpstreamConnection
from proxy.transport.pool import ConnectionPool, PoolKey
from proxy.transport.resolver import CheckedResolver


class UpstreamClient:
    def __init__(
        self,
        max_header_bytes: int = defaults.MAX_HEADER_BYTES,
        resolver: CheckedResolver | None = None,
        *,
        max_connections_per_upstream: int = defaults.POOL_MAX_PER_UPSTREAM,
        keepalive: float = defaults.KEEPALIVE_TIMEOUT_S,
    ) -> None:
        self.resolver = resolver or CheckedResolver()
        self._max_head_bytes = max_header_bytes
        self.pool = ConnectionPool(max_connections_per_upstream, keepalive)
        self._ssl_contexts: dict[TlsSettings, tuple[_FileStamps, ssl.SSLContext]] = {}

    async def close(self) -> None:
        self.pool.close_all()

    async def open_tunnel(self, host: str, port: int, settings: PolicySettings) -> UpstreamConnection:
        """A raw TCP connection for CONNECT, to a checked address of `host` (never pooled)."""
        loop = asyncio.get_running_loop()
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        timeout = settings.timeouts.connect
        try:
            async with asyncio.timeout(timeout):
                addresses = await self.resolver.resolve(host, port, settings.allow_private_addresses)
                failure: OSError | None = None
                for address in addresses:
                    try:
                        _, connection = await loop.create_connection(
                            lambda: UpstreamConnection(
                                authority, self._max_head_bytes, _unpooled
                            ).as_tunnel(),
                            host=address,
                            port=port,
                        )
                        return connection
                    except OSError as exc:
                        failure = exc
        except TimeoutError:
            raise failures.connect_timed_out(authority, timeout) from None
        assert failure is not None
        raise failures.cannot_connect(authority, failure) from failure

    async def send(self, request: ProxyRequest) -> ProxyResponse:
        """One attempt: resolve, check, connect and return once the response head has arrived.

        When a connection cannot be made, the next checked address is tried (within the same
        attempt) as long as the body can be sent again.
        """
        target, settings = request.target, request.settings
        # one `connect` budget for the attempt: DNS, pool wait, TCP and TLS, every address (SPEC 4)
        connect_by = asyncio.get_running_loop().time() + settings.timeouts.connect
        addresses = self.resolver.cached(target.host, target.port, settings.allow_private_addresses)
        if addresses is None:
            try:
                async with asyncio.timeout_at(connect_by):
                    addresses = await self.resolver.resolve(
                        target.host, target.port, settings.allow_private_addresses
                    )
            except TimeoutError:
                raise errors.ConnectFailure(f"resolving {target.host} took longer than connect") from None
        if not request.body.replayable:
            addresses = addresses[:1]  # a streamed body can go out only once
        for address in addresses[:-1]:
            with contextlib.suppress(errors.ConnectFailure):
                return await self._send_to(address, request, connect_by)
        return await self._send_to(addresses[-1], request, connect_by)

    async def _send_to(self, address: str, request: ProxyRequest, connect_by: float) -> ProxyResponse:
        target, settings = request.target, request.settings
        if target.scheme == "https":
            key = PoolKey(
                address, target.port, self._ssl_context(settings.tls), settings.tls.sni or target.host
            )
        else:
            key = PoolKey(address, target.port, None, None)
        connection = self.pool.idle(key)
        if connection is None:
            connection = await self._connect(key, target, settings.timeouts.connect, connect_by)
        body = request.body.for_attempt()
        chunked = body is not None and request.body.length is None
        try:
            head = await connection.exchange(
                _request_head(request, chunked),
                body,
                chunked,
                request.method == "HEAD",
                settings.timeouts,
                upgrade=request.upgrade is not None,
            )
        except BaseException as exc:
            connection.done_with_exchange()
            self.pool.give_back(connection)
            if request.body.failed and not isinstance(exc, errors.ClientDisconnected):
                raise errors.ClientDisconnected("the app broke off its request body") from exc
            raise
        headers = end_to_end_headers(head.headers)[0]  # an upstream's x-outrigger-* never reach the app
        switched = head.status == 101
        if switched:  # the hop-by-hop pair that says which protocol now runs goes back to the app
            headers["Connection"] = "Upgrade"
            headers["Upgrade"] = next((v for n, v in head.headers if n.lower() == "upgrade"), "")
        return ProxyResponse(
            status=head.status,
            headers=headers,
            body=connection.stream(settings.timeouts.idle, self.pool.give_back),
            reason=head.reason,
            tunnel=connection if switched else None,
        )

    async def _connect(
        self, key: PoolKey, target: UpstreamTarget, within: float, connect_by: float
    ) -> UpstreamConnection:
        """A connection for `key` within `connect`: pool wait, TCP and the TLS handshake."""
        loop = asyncio.get_running_loop()
        authority = target.authority

        async def open_connection() -> UpstreamConnection:
            _, connection = await loop.create_connection(
                lambda: UpstreamConnection(authority, self._max_head_bytes, self.pool.closed),
                host=key.address,
                port=key.port,
                ssl=key.tls,
                server_hostname=key.server_name,
            )
            return connection

        try:
            async with asyncio.timeout_at(connect_by):
                return await self.pool.connect(key, open_connection)
        except TimeoutError:
            raise failures.connect_timed_out(authority, within) from None
        except OSError as exc:
            raise failures.cannot_connect(authority, exc) from exc

    def forget_tls_contexts(self) -> None:
        """Contexts whose files changed are built again from the files as they are now (and so get
        new pool keys); the others, and their pooled connections, stay."""
        for tls, (files, _) in list(self._ssl_contexts.items()):
            if _tls_files(tls) != files:
                del self._ssl_contexts[tls]

    def _ssl_context(self, tls: TlsSettings) -> ssl.SSLContext:
        """One context per distinct TLS section: pooled connections are keyed by it."""
        cached = self._ssl_contexts.get(tls)
        if cached is None:
            cached = self._ssl_contexts[tls] = (_tls_files(tls), client_context(tls))
        return cached[1]


def _request_head(request: ProxyRequest, chunked: bool) -> bytes:
    """Request line and headers as the app sent them; Host names the upstream (SPEC 4)."""
    headers = request.headers
    headers.popall("Host", None)
    # Framing comes from the body as parsed, never from the header map: nothing a header rule or
    # the app's Connection tokens did to it may turn a body into a second, smuggled request.
    headers.popall("Transfer-Encoding", None)
    length = None if chunked else request.body.length
    framing = ""
    if headers.getall("Content-Length", []) != ([] if length is None else [str(length)]):
        headers.popall("Content-Length", None)  # kept in place only when it is exactly right
        framing = "" if length is None else f"Content-Length: {length}\r\n"
    lines = [f"{request.method} {request.path_qs} HTTP/1.1\r\nHost: {request.target.authority}\r\n"]
    lines.extend(f"{name}: {value}\r\n" for name, value in headers.items())
    if request.upgrade is not None:
        lines.append(f"Connection: Upgrade\r\nUpgrade: {request.upgrade}\r\n")
    if chunked:
        lines.append("Transfer-Encoding: chunked\r\n")
    lines.append(framing)
    lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


_FileStamps = tuple[tuple[str, int, int], ...]


def _tls_files(tls: TlsSettings) -> _FileStamps:
    """(path, mtime, size) of each file a TLS section reads: a rotation changes one of them."""
    stamps = []
    for path in (tls.ca_file, tls.client_cert, tls.client_key):
        if path is not None:
            try:
                stat = path.stat()
            except OSError:
                stamps.append((str(path), -1, -1))
            else:
                stamps.append((str(path), stat.st_mtime_ns, stat.st_size))
    return tuple(stamps)


def _unpooled(connection: UpstreamConnection) -> None:
    """A tunnel's connection belongs to no pool: nothing to tell when it closes."""
