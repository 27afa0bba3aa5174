"""Idempotency keys: one key per request, shared by all its attempts; optional replay.

The key is added before the retry layer runs, so every attempt carries the
same one and the provider can de-duplicate. With `replay`, a completed
response is kept (cachetools TTLCache, bounded by entries, TTL and body size)
and a repeat of the same request — same key, method, path and body — gets it
back without an upstream call; a concurrent repeat waits for the first.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from dataclasses import dataclass

from cachetools import TTLCache
from multidict import CIMultiDict

from proxy import errors
from proxy.clock import Clock
from proxy.config.model import Idempotency, OutcomeSet, Replay
from proxy.exchange import BytesBody, Handler, ProxyRequest, ProxyResponse, buffered
from proxy.layers.bounded import headers_size, put, weigher

REPLAYED_HEADER = "x-outrigger-replayed"


@dataclass(frozen=True)
class StoredResponse:
    fingerprint: str
    status: int
    reason: str | None
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def size(self) -> int:
        return len(self.body) + headers_size(self.headers)

    def replay(self) -> ProxyResponse:
        headers = CIMultiDict(self.headers)
        headers[REPLAYED_HEADER] = "true"
        return ProxyResponse(self.status, headers, BytesBody(self.body), self.reason)


@dataclass(frozen=True)
class _Pending:
    fingerprint: str
    done: asyncio.Future[StoredResponse | None]


def present_key(headers: CIMultiDict[str], header: str) -> str | None:
    """The app's key, or None when absent or blank: a blank key names no request, so it must
    neither make a POST retryable nor share a replay slot with every other blank key."""
    key = headers.get(header)
    return key if key is not None and key.strip() else None


class ReplayCache:
    """Per-policy store of completed responses by idempotency key (state that survives reload)."""

    def __init__(self, settings: Replay, clock: Clock) -> None:
        self.settings = settings
        self.statuses = OutcomeSet(settings.statuses).statuses
        weight = weigher(settings.max_total_bytes, settings.max_entries, StoredResponse.size)
        self._entries: TTLCache[str, StoredResponse] = TTLCache(
            maxsize=settings.max_total_bytes, ttl=settings.ttl, timer=clock.now, getsizeof=weight
        )
        self._pending: dict[str, _Pending] = {}
        """Requests in flight by key: never evicted, so a concurrent duplicate always finds them."""

    def __len__(self) -> int:
        return len(self._entries)

    async def serve(self, key: str, request: ProxyRequest, next: Handler) -> ProxyResponse:
        if not await request.body.buffer(self.settings.max_body_bytes):
            return await next(request)
        fingerprint = _fingerprint(request)
        while True:
            entry: StoredResponse | _Pending | None = self._pending.get(key) or self._entries.get(key)
            if entry is None:
                return await self._lead(key, fingerprint, request, next)
            if entry.fingerprint != fingerprint:
                raise errors.IdempotencyKeyReused(
                    "this idempotency key was already used for a different request (method, path or body)"
                )
            stored = entry if isinstance(entry, StoredResponse) else await asyncio.shield(entry.done)
            if stored is not None:
                request.replayed = True
                return stored.replay()

    async def _lead(self, key: str, fingerprint: str, request: ProxyRequest, next: Handler) -> ProxyResponse:
        pending = self._pending[key] = _Pending(fingerprint, asyncio.get_running_loop().create_future())
        stored: StoredResponse | None = None
        try:
            response = await next(request)
            response, stored = await self._capture(response, fingerprint)
            return response
        finally:
            del self._pending[key]
            if stored is not None and not put(self._entries, key, stored):
                stored = None  # heavier than the whole cache (huge headers)
            pending.done.set_result(stored)

    async def _capture(
        self, response: ProxyResponse, fingerprint: str
    ) -> tuple[ProxyResponse, StoredResponse | None]:
        """Read the body to keep it when it is storable and small enough; else pass it on unread."""
        if response.status not in self.statuses:
            return response, None
        response, data = await buffered(response, self.settings.max_body_bytes)
        if data is None:
            return response, None
        stored = StoredResponse(
            fingerprint, response.status, response.reason, tuple(response.headers.items()), data
        )
        return response, stored


def _fingerprint(request: ProxyRequest) -> str:
    body = request.body.for_attempt()
    assert body is None or isinstance(body, bytes), "fingerprinting needs a buffered body"
    digest = hashlib.sha256(f"{request.method}\0{request.host}\0{request.path_qs}\0".encode())
    digest.update(body or b"")
    return digest.hexdigest()


class IdempotencyLayer:
    def __init__(self, settings: Idempotency, cache: ReplayCache | None) -> None:
        self.header = settings.header
        self.methods = frozenset(settings.methods)
        self.cache = cache

    async def __call__(self, request: ProxyRequest, next: Handler) -> ProxyResponse:
        if request.method not in self.methods:
            return await next(request)
        key = ensure_key(request, self.header)
        if request.idempotency_key_injected or self.cache is None:
            return await next(request)  # a key made just now names no earlier request
        return await self.cache.serve(key, request, next)


def ensure_key(request: ProxyRequest, header: str) -> str:
    """The request's idempotency key: the app's own, kept as is, else a new uuid4 added to its
    headers. Used by this layer and by fire-and-forget intake (before the request is stored)."""
    key = present_key(request.headers, header)
    if key is None:
        key = request.headers[header] = str(uuid.uuid4())
        request.idempotency_key_injected = True
    request.idempotency_key = key
    return key
