"""The shared upstream client: pooled connections, TLS origination, SSRF-checked connects.

One aiohttp ClientSession serves every policy (owned by the server's
lifecycle). The upstream host is resolved here, every address is checked by
`addresses.refusal_reason`, and the connection is made to the checked IP with
the host name kept for SNI, certificate checks and ``Host`` — so DNS cannot
change between the check and the connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections.abc import AsyncIterator

import aiohttp
from cachetools import TTLCache
from yarl import URL

from proxy import errors
from proxy.addresses import refusal_reason
from proxy.config import defaults
from proxy.config.model import TlsSettings, UpstreamTarget
from proxy.config.units import format_duration
from proxy.exchange import CHUNK_SIZE, CONTROL_PREFIX, ProxyRequest, ProxyResponse, end_to_end_headers

_NO_CEILING = 1e9
"""aiohttp rounds timeouts above ``ceil_threshold`` up to whole seconds; we want them exact."""

_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
"""Headers aiohttp would invent; a proxy sends only what the app sent."""


class UpstreamBody:
    """The upstream response body, streamed to the app chunk by chunk."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_chunked(CHUNK_SIZE):
                yield chunk
        except aiohttp.SocketTimeoutError as exc:
            raise errors.AttemptTimeout("the upstream stopped sending the response body") from exc
        except (aiohttp.ClientPayloadError, aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
            raise errors.ConnectionReset(
                f"the upstream broke off the response body: {_describe(exc)}"
            ) from exc

    def release(self) -> None:
        self._response.release()


class UpstreamClient:
    def __init__(self, max_header_bytes: int = defaults.MAX_HEADER_BYTES) -> None:
        connector = aiohttp.TCPConnector(
            limit=defaults.POOL_LIMIT_TOTAL,
            limit_per_host=defaults.POOL_LIMIT_PER_HOST,
            keepalive_timeout=defaults.KEEPALIVE_TIMEOUT_S,
            use_dns_cache=False,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            timeout=aiohttp.ClientTimeout(total=None),
            trust_env=False,
            max_line_size=max_header_bytes,
            max_field_size=max_header_bytes,
        )
        # aiohttp silently resends idempotent requests once when a pooled connection drops; that
        # attempt would bypass retry conditions, the breaker, the limiter and x-outrigger-attempts.
        # There is no public switch (aiohttp 3.14), so turn the private one off.
        self._session._retry_connection = False
        self._dns: TTLCache[tuple[str, int], tuple[str, ...]] = TTLCache(
            maxsize=4096, ttl=defaults.DNS_CACHE_TTL_S
        )
        self._ssl_contexts: dict[TlsSettings, ssl.SSLContext] = {}

    async def close(self) -> None:
        await self._session.close()

    async def send(self, request: ProxyRequest) -> ProxyResponse:
        """One attempt: resolve, check, connect and return once the response head has arrived.

        When a connection cannot be made, the next checked address is tried (within the same
        attempt) as long as the body can be sent again.
        """
        target = request.target
        timeouts = request.settings.timeouts
        try:
            async with asyncio.timeout(timeouts.connect):
                addresses = await self._checked_addresses(target, request.settings.allow_private_addresses)
        except TimeoutError:
            raise errors.ConnectFailure(f"resolving {target.host} took longer than connect") from None
        if not request.body.replayable:
            addresses = addresses[:1]  # a streamed body can go out only once
        for address in addresses[:-1]:
            with contextlib.suppress(errors.ConnectFailure):
                return await self._send_to(address, request)
        return await self._send_to(addresses[-1], request)

    async def _send_to(self, address: str, request: ProxyRequest) -> ProxyResponse:
        target, tls, timeouts = request.target, request.settings.tls, request.settings.timeouts
        host_in_url = f"[{address}]" if ":" in address else address
        url = URL(f"{target.scheme}://{host_in_url}:{target.port}{request.path_qs}", encoded=True)
        headers = request.headers.copy()
        headers["Host"] = target.authority
        try:
            response = await self._session.request(
                request.method,
                url,
                headers=headers,
                data=request.body.for_attempt(),
                allow_redirects=False,
                ssl=self._ssl_context(tls) if target.scheme == "https" else False,
                server_hostname=(tls.sni or target.host) if target.scheme == "https" else None,
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=timeouts.connect,  # pool wait + TCP + TLS handshake
                    sock_connect=timeouts.connect,
                    sock_read=timeouts.per_try,
                    ceil_threshold=_NO_CEILING,
                ),
            )
        except aiohttp.ClientError as exc:
            if request.body.failed:
                raise errors.ClientDisconnected("the app broke off its request body") from exc
            raise _attempt_error(exc, target, timeouts.per_try) from exc
        return ProxyResponse(
            status=response.status,
            headers=end_to_end_headers(response.headers, drop_prefix=CONTROL_PREFIX),
            body=UpstreamBody(response),
            reason=response.reason,
        )

    async def _checked_addresses(self, target: UpstreamTarget, allow_private: bool) -> tuple[str, ...]:
        candidates = await self._resolve(target.host, target.port)
        if allow_private:
            return candidates
        allowed = tuple(a for a in candidates if refusal_reason(a) is None)
        if not allowed:
            reason = refusal_reason(candidates[0])
            raise errors.AddressNotAllowed(
                f"{target.host} resolves to {candidates[0]} ({reason}); set allow_private_addresses: true"
                " in its policy to permit it"
            )
        return allowed

    async def _resolve(self, host: str, port: int) -> tuple[str, ...]:
        cached = self._dns.get((host, port))
        if cached is not None:
            return cached
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise errors.ConnectFailure(f"cannot resolve {host}: {exc.strerror or exc}") from exc
        addresses = tuple(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses:
            raise errors.ConnectFailure(f"{host} has no addresses")
        self._dns[(host, port)] = addresses
        return addresses

    def forget_tls_contexts(self) -> None:
        """New attempts build their contexts (and pooled connections) from the files as they are now."""
        self._ssl_contexts.clear()

    def _ssl_context(self, tls: TlsSettings) -> ssl.SSLContext:
        """One context per distinct TLS section, so pooled connections are keyed by it."""
        context = self._ssl_contexts.get(tls)
        if context is None:
            context = self._ssl_contexts[tls] = tls.ssl_context()
        return context


def _attempt_error(exc: aiohttp.ClientError, target: UpstreamTarget, per_try: float) -> errors.OutriggerError:
    """aiohttp's failure as the attempt outcome it is (the retry and breaker conditions)."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return errors.ConnectFailure(f"TLS certificate of {target.host} rejected: {exc.certificate_error}")
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return errors.ConnectFailure(f"cannot connect to {target.authority}: {_describe(exc)}")
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return errors.AttemptTimeout(f"{target.authority} sent nothing for {format_duration(per_try)}")
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError | aiohttp.ClientPayloadError):
        return errors.ConnectionReset(
            f"connection to {target.authority} closed before a response: {_describe(exc)}"
        )
    return errors.UpstreamUnreachable(f"{target.authority} sent an invalid response ({type(exc).__name__})")


def _describe(exc: BaseException) -> str:
    """The cause, never aiohttp's own message: that can carry the full URL with its query values."""
    os_error = getattr(exc, "os_error", None) or (exc if isinstance(exc, OSError) else None)
    if isinstance(os_error, OSError) and os_error.errno:
        return os.strerror(os_error.errno)  # not .strerror: aiohttp puts its own text (and the URL) there
    return type(exc).__name__
