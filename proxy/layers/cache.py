"""Response cache for GET and HEAD (RFC 9111 basics) with stale-if-error (SPEC 9).

A fresh entry answers without any upstream work (``Age`` set); a stale one
with a validator is revalidated (``If-None-Match`` / ``If-Modified-Since``)
and a ``304`` refreshes it; concurrent misses for one key make one upstream
call (the others wait for its result, each within its own deadline). When the
upstream fails (unreachable, timeout, circuit open, or a 5xx the retry or
breaker lists name), an entry at most ``stale_if_error`` past its freshness
answers instead, with ``x-outrigger-stale: true``.

What is never stored: responses to anything but GET, to requests with a body,
``no-store``, ``private``, ``Set-Cookie`` or ``Vary: *`` responses, statuses
other than 2xx (206 aside) and — with explicit freshness only — 301, 404 and
410, and bodies above ``max_entry_bytes`` (those stream through unbuffered).
The key is a sha256 of the upstream, the raw path and query, and the
``key_headers`` values: no header value is kept in clear. One variant is kept
per key: a request whose ``Vary``'d headers differ from the stored one's is a
miss, and its response replaces the entry.

The store is a cachetools `TLRUCache` (least recently used first; entries
without validators expire once too stale even for stale-if-error), bounded by
both ``max_entries`` and ``max_bytes`` (layers/bounded.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from cachetools import TLRUCache, TTLCache
from multidict import CIMultiDict

from proxy import errors
from proxy.clock import Clock
from proxy.config.defaults import CACHE_PASS_TTL_S
from proxy.config.model import Cache, OutcomeSet, PolicySettings
from proxy.config.units import format_duration
from proxy.exchange import BytesBody, Handler, ProxyRequest, ProxyResponse, buffered
from proxy.layers.bounded import headers_size, put, weigher

CACHE_HEADER = "x-outrigger-cache"
STALE_HEADER = "x-outrigger-stale"

HIT, MISS, STALE, REVALIDATED, BYPASS = "hit", "miss", "stale", "revalidated", "bypass"
"""`x-outrigger-cache` values, also the `result` label of `outrigger_cache_total`."""

_ALWAYS_STORABLE = frozenset(range(200, 300)) - {206}
"""Stored with the default ttl when the upstream says nothing (206 would need range merging)."""
_EXPLICIT_ONLY = frozenset({301, 404, 410})
"""Stored only when the upstream gives explicit freshness (max-age, s-maxage or Expires)."""
_CONDITIONAL = ("If-None-Match", "If-Modified-Since", "If-Match", "If-Unmodified-Since", "If-Range", "Range")
"""The app's own conditional or range requests are forwarded as they are (their 304/206 is theirs)."""
_STALE_ERRORS = (errors.UpstreamUnreachable, errors.Timeout, errors.CircuitOpen)
"""Failures from below that a stale entry may answer for (connect-failure, reset, timeout, circuit_open)."""


def parse_cache_control(values: Iterable[str]) -> dict[str, str | None]:
    """``max-age=60, no-cache`` -> {"max-age": "60", "no-cache": None}; names lowercased, quotes dropped."""
    directives: dict[str, str | None] = {}
    for value in values:
        for part in value.split(","):
            name, eq, argument = part.strip().partition("=")
            if name:
                directives.setdefault(name.lower(), argument.strip().strip('"') if eq else None)
    return directives


def _seconds(value: str | None) -> float | None:
    """A delta-seconds argument; None when missing or malformed (RFC 9111 1.2.2)."""
    return float(value) if value is not None and value.isdigit() else None


def _http_date(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


@dataclass(frozen=True, slots=True)
class Freshness:
    lifetime: float
    must_revalidate: bool
    """must-revalidate, proxy-revalidate or s-maxage: never answer stale, not even for an error."""


@dataclass(frozen=True, slots=True)
class CacheEntry:
    status: int
    reason: str | None
    headers: tuple[tuple[str, str], ...]
    """End-to-end response headers as the upstream sent them (the transport dropped hop-by-hop ones)."""
    body: bytes
    stored_at: float
    """Clock time when the response (or the 304 that refreshed it) arrived."""
    initial_age: float
    """The upstream's own ``Age`` at that time."""
    freshness: Freshness
    etag: str | None
    last_modified: str | None
    vary: tuple[str, ...]
    """Lowercased request header names the response varies on."""
    vary_digest: str
    """sha256 of the storing request's values of those headers."""

    def size(self) -> int:
        return len(self.body) + headers_size(self.headers) + 256  # plus the entry's own bookkeeping

    def age(self, now: float) -> float:
        return self.initial_age + max(0.0, now - self.stored_at)

    def fresh(self, now: float) -> bool:
        return self.age(now) < self.freshness.lifetime

    @property
    def validated(self) -> bool:
        return self.etag is not None or self.last_modified is not None

    def answer(self, now: float) -> ProxyResponse:
        headers = CIMultiDict(self.headers)
        headers["Age"] = str(int(self.age(now)))
        return ProxyResponse(self.status, headers, BytesBody(self.body), self.reason)


@dataclass(frozen=True, slots=True)
class _Shared:
    """What a coalesced miss hands its waiters: the entry and how to answer from it."""

    entry: CacheEntry
    result: str
    masked_error: str | None = None


def _vary_digest(names: tuple[str, ...], headers: CIMultiDict[str]) -> str:
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode() + b"\0")
        for value in headers.getall(name, ()):
            digest.update(value.encode("utf-8", "surrogateescape") + b"\1")
    return digest.hexdigest()


def matches(entry: CacheEntry, headers: CIMultiDict[str]) -> bool:
    """Whether a request may use `entry`: same values of the headers the response varies on."""
    return not entry.vary or _vary_digest(entry.vary, headers) == entry.vary_digest


class ResponseCache:
    """One policy's stored responses and in-flight misses (state that survives a reload)."""

    def __init__(self, settings: Cache, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock
        self.key_headers = tuple(name.lower() for name in settings.key_headers)
        self._keyed_by_credential = "authorization" in self.key_headers
        self._entries: TLRUCache[str, CacheEntry] = TLRUCache(
            maxsize=settings.max_bytes,
            ttu=self._expires,
            timer=clock.now,
            getsizeof=weigher(settings.max_bytes, settings.max_entries, CacheEntry.size),
        )
        self.inflight: dict[str, asyncio.Future[_Shared | None]] = {}
        """Misses being fetched, by key: never evicted, so a concurrent miss always finds its leader."""
        self.passes: TTLCache[str, bool] = TTLCache(
            maxsize=settings.max_entries, ttl=CACHE_PASS_TTL_S, timer=clock.now
        )
        """Keys whose last response could not be stored: their misses are not coalesced for a while."""

    def _expires(self, key: str, entry: CacheEntry, now: float) -> float:
        """An entry with a validator stays until evicted (it can be revalidated); one without is
        dropped once it is too stale to answer even for an error."""
        if entry.validated:
            return math.inf
        grace = 0.0 if entry.freshness.must_revalidate else self.settings.stale_if_error
        return now + entry.freshness.lifetime - entry.initial_age + grace

    def __len__(self) -> int:
        return len(self._entries)

    def snapshot(self) -> dict[str, int]:
        """For /state: entries and the bytes they hold (bodies plus headers)."""
        self._entries.expire()
        return {
            "entries": len(self._entries),
            "bytes": sum(entry.size() for entry in self._entries.values()),
            "in_flight": len(self.inflight),
        }

    def key(self, request: ProxyRequest) -> str:
        """GET and HEAD share a key; the key headers' values go into the hash, never into memory."""
        digest = hashlib.sha256(f"{request.target}\0{request.path_qs}\0".encode("utf-8", "surrogateescape"))
        for name in self.key_headers:
            digest.update(name.encode() + b"\0")
            for value in request.headers.getall(name, ()):
                digest.update(value.encode("utf-8", "surrogateescape") + b"\1")
        return digest.hexdigest()

    def lookup(self, key: str, headers: CIMultiDict[str]) -> CacheEntry | None:
        """The stored entry for `key` if the request matches its ``Vary``'d headers."""
        entry = self._entries.get(key)
        return entry if entry is not None and matches(entry, headers) else None

    def stale_usable(self, entry: CacheEntry, now: float) -> bool:
        if entry.freshness.must_revalidate:
            return False
        return entry.age(now) - entry.freshness.lifetime <= self.settings.stale_if_error

    def freshness(
        self, status: int, headers: CIMultiDict[str], request: CIMultiDict[str]
    ) -> Freshness | None:
        """How long a response stays fresh, or None when it must not be stored at all."""
        if status not in _ALWAYS_STORABLE and status not in _EXPLICIT_ONLY:
            return None
        if "Set-Cookie" in headers or "*" in headers.get("Vary", ""):
            return None
        cc = parse_cache_control(headers.getall("Cache-Control", ()))
        if "no-store" in cc or "private" in cc:  # never stored, whether or not Cache-Control is honoured
            return None
        # RFC 9111 3.5: a shared cache keeps a credentialed response only when the upstream says so
        credentialed = "authorization" in request and not self._keyed_by_credential
        if credentialed and not {"public", "s-maxage", "must-revalidate"} & cc.keys():
            return None
        explicit: float | None = None
        must_revalidate = False
        if self.settings.honour_cache_control:
            explicit = _seconds(cc.get("s-maxage"))
            if explicit is None:
                explicit = _seconds(cc.get("max-age"))
            if explicit is None and "Expires" in headers:
                expires = _http_date(headers["Expires"])
                date = _http_date(headers.get("Date")) or self.clock.wall()
                explicit = max(0.0, expires - date) if expires is not None else 0.0
            if "no-cache" in cc:
                explicit = 0.0  # may be stored, but every use is revalidated first
            must_revalidate = bool({"must-revalidate", "proxy-revalidate", "s-maxage"} & cc.keys())
        if explicit is None:
            if status in _EXPLICIT_ONLY or self.settings.ttl == 0:
                return None
            explicit = self.settings.ttl
        return Freshness(explicit, must_revalidate)

    def store(
        self,
        key: str,
        response: ProxyResponse,
        body: bytes,
        freshness: Freshness,
        request_headers: CIMultiDict[str],
        now: float,
    ) -> CacheEntry | None:
        headers = response.headers
        vary = tuple(
            sorted({t.strip().lower() for v in headers.getall("Vary", ()) for t in v.split(",") if t.strip()})
        )
        age = _seconds(headers.get("Age")) or 0.0
        entry = CacheEntry(
            status=response.status,
            reason=response.reason,
            headers=tuple(headers.items()),
            body=body,
            stored_at=now,
            initial_age=age,
            freshness=freshness,
            etag=headers.get("ETag"),
            last_modified=headers.get("Last-Modified"),
            vary=vary,
            vary_digest=_vary_digest(vary, request_headers) if vary else "",
        )
        return entry if put(self._entries, key, entry) else None

    def refresh(
        self, key: str, entry: CacheEntry, not_modified: CIMultiDict[str], request_headers: CIMultiDict[str]
    ) -> CacheEntry:
        """A 304 for `entry`: its headers replace the stored ones of the same name (RFC 9111 4.3.4);
        the entry is stored again as new, or dropped if the merged headers no longer allow storing."""
        now = self.clock.now()
        merged = CIMultiDict(entry.headers)
        merged.popall("Age", None)  # the stored response's age is over: the 304 is the new origin
        for name in {n for n in not_modified if n.lower() != "content-length"}:
            merged.popall(name, None)
            for value in not_modified.getall(name):
                merged.add(name, value)
        response = ProxyResponse(entry.status, merged, BytesBody(entry.body), entry.reason)
        freshness = self.freshness(entry.status, merged, request_headers)
        stored = self.store(key, response, entry.body, freshness, request_headers, now) if freshness else None
        if stored is not None:
            return stored
        self._entries.pop(key, None)
        return CacheEntry(
            entry.status, entry.reason, tuple(merged.items()), entry.body, now, 0.0,
            Freshness(0.0, True), None, None, (), "",
        )  # fmt: skip


class CacheLayer:
    """Built per route (stale-if-error follows the route's retry conditions); the store is the policy's."""

    def __init__(self, cache: ResponseCache, settings: PolicySettings) -> None:
        self.cache = cache
        self.clock = cache.clock
        self.max_entry_bytes = cache.settings.max_entry_bytes
        self.total = settings.timeouts.total
        statuses: set[int] = set()
        for conditions in (
            settings.retries.on if settings.retries else (),
            settings.circuit_breaker.failure_on if settings.circuit_breaker else (),
        ):
            statuses |= OutcomeSet(conditions).statuses
        self.stale_statuses = frozenset(s for s in statuses if s >= 500)
        """Upstream answers that count as failures a stale entry may answer for."""

    async def __call__(self, request: ProxyRequest, next: Handler) -> ProxyResponse:
        response = await self._serve(request, next)
        if request.cache_result is not None:
            response.headers[CACHE_HEADER] = request.cache_result
        return response

    async def _serve(self, request: ProxyRequest, next: Handler) -> ProxyResponse:
        if _bypasses(request):
            request.cache_result = BYPASS
            return await next(request)
        cache = self.cache
        key = cache.key(request)
        entry = cache.lookup(key, request.headers)
        if entry is not None and entry.fresh(self.clock.now()):
            return self._answer(request, entry, HIT)
        if request.method != "GET" or any(name in request.headers for name in _CONDITIONAL):
            return await self._forward(request, next, entry)
        if key in cache.passes:  # its last response was not storable: waiting would only add latency
            return (await self._fetch(key, entry, request, next))[0]
        pending = cache.inflight.get(key)
        if pending is None:
            return await self._lead(key, entry, request, next)
        try:
            shared = await self._wait(request, pending)
        except errors.Timeout as error:
            if entry is None or not cache.stale_usable(entry, self.clock.now()):
                raise
            return self._stale(request, entry, error.error_type)
        if shared is None or not matches(shared.entry, request.headers):
            return await self._forward(request, next, entry)  # not shareable: a call of its own
        request.cache_masked_error = shared.masked_error
        return self._answer(request, shared.entry, shared.result)

    def _answer(self, request: ProxyRequest, entry: CacheEntry, result: str) -> ProxyResponse:
        request.cache_result = result
        response = entry.answer(self.clock.now())
        if result == STALE:
            response.headers[STALE_HEADER] = "true"
        return response

    def _stale(self, request: ProxyRequest, entry: CacheEntry, masked: str) -> ProxyResponse:
        request.cache_masked_error = masked
        return self._answer(request, entry, STALE)

    async def _wait(self, request: ProxyRequest, pending: asyncio.Future[_Shared | None]) -> _Shared | None:
        """Wait for the leader's result, within this request's own total deadline."""
        budget = self.total if request.timeout_override is None else min(self.total, request.timeout_override)
        try:
            async with asyncio.timeout_at(request.received_at + budget):
                return await asyncio.shield(pending)
        except TimeoutError:
            request.cache_result = MISS
            raise errors.Timeout(
                f"no response within {format_duration(budget)} (waiting for the same request in flight)"
            ) from None

    async def _call(
        self, request: ProxyRequest, next: Handler, entry: CacheEntry | None
    ) -> tuple[ProxyResponse, bool]:
        """Call the upstream; when it fails and `entry` may answer for it, the stale answer (True)."""
        request.cache_result = MISS
        try:
            response = await next(request)
        except _STALE_ERRORS as error:
            if entry is None or not self.cache.stale_usable(entry, self.clock.now()):
                raise
            return self._stale(request, entry, error.error_type), True
        if (
            entry is not None
            and response.status in self.stale_statuses
            and self.cache.stale_usable(entry, self.clock.now())
        ):
            response.body.release()
            return self._stale(request, entry, str(response.status)), True
        return response, False

    async def _forward(self, request: ProxyRequest, next: Handler, entry: CacheEntry | None) -> ProxyResponse:
        """An upstream call that stores nothing (HEAD, the app's conditionals, an unshareable wait)."""
        response, _ = await self._call(request, next, entry)
        return response

    async def _lead(
        self, key: str, entry: CacheEntry | None, request: ProxyRequest, next: Handler
    ) -> ProxyResponse:
        future: asyncio.Future[_Shared | None] = asyncio.get_running_loop().create_future()
        self.cache.inflight[key] = future
        shared: _Shared | None = None
        try:
            response, shared = await self._fetch(key, entry, request, next)
            return response
        finally:
            del self.cache.inflight[key]
            future.set_result(shared)

    async def _fetch(
        self, key: str, entry: CacheEntry | None, request: ProxyRequest, next: Handler
    ) -> tuple[ProxyResponse, _Shared | None]:
        cache = self.cache
        original = request.headers.copy()  # lower layers add headers (credentials) in place
        revalidating = entry is not None and entry.validated
        if revalidating:
            assert entry is not None
            if entry.etag is not None:
                request.headers["If-None-Match"] = entry.etag
            if entry.last_modified is not None:
                request.headers["If-Modified-Since"] = entry.last_modified
        response, stale = await self._call(request, next, entry)
        if stale:
            assert entry is not None
            return response, _Shared(entry, STALE, request.cache_masked_error)
        if revalidating and response.status == 304:
            assert entry is not None
            response.body.release()
            refreshed = cache.refresh(key, entry, response.headers, original)
            return self._answer(request, refreshed, REVALIDATED), _Shared(refreshed, HIT)
        freshness = cache.freshness(response.status, response.headers, original)
        body = None
        if freshness is not None and _known_small(response, self.max_entry_bytes):
            response, body = await buffered(response, self.max_entry_bytes)
        stored = None
        if freshness is not None and body is not None:
            stored = cache.store(key, response, body, freshness, original, self.clock.now())
        if stored is None:
            cache.passes[key] = True
            return response, None
        cache.passes.pop(key, None)
        return response, _Shared(stored, HIT)


def _known_small(response: ProxyResponse, limit: int) -> bool:
    """Read the body ahead of the app only when its length is declared and fits: a stream without
    a length (SSE, an LLM answer, anything chunked) must reach the app as it comes, never after
    the cache has waited for its end (it is not stored)."""
    if response.status == 204:
        return True  # never a body
    if "text/event-stream" in response.headers.get("Content-Type", "").lower():
        return False
    length = response.headers.get("Content-Length", "")
    return length.isdigit() and int(length) <= limit


def _bypasses(request: ProxyRequest) -> bool:
    """Not for the cache: other methods, upgrades, requests with a body, the app's no-cache/no-store."""
    if request.method not in ("GET", "HEAD") or request.upgrade is not None or request.body.present:
        return True
    values = request.headers.getall("Cache-Control", ())
    if not values:
        return False
    directives = parse_cache_control(values)
    return "no-cache" in directives or "no-store" in directives
