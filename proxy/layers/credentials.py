"""Credentials per attempt: an OAuth2 token, or one key of a pool (SPEC 10).

Below the rate limiter and above the attempt, so every attempt (retries
included) carries a credential chosen for it: a retry after a key's 429 goes
out with another key. Attempts sent to a failover upstream carry that
upstream's own header rules instead: one upstream's credentials never reach another.
"""

from __future__ import annotations

from opentelemetry import trace

from proxy.credentials import KeyPool, SpanParent, TokenSource
from proxy.exchange import Handler, ProxyRequest, ProxyResponse

_NOT_TRACED = trace.NoOpTracer()


def _to_primary(request: ProxyRequest) -> bool:
    return request.failover is None or request.failover.index == 0


class OAuth2Layer:
    """A bearer token on every attempt; an upstream 401 makes one refresh and one re-send."""

    def __init__(self, source: TokenSource, replay_limit: int, tracer: trace.Tracer = _NOT_TRACED) -> None:
        self.source = source
        self.replay_limit = replay_limit
        """Bodies up to this size are kept so that a 401 can be answered by a re-send."""
        self.tracer = tracer

    def _parent(self, request: ProxyRequest) -> SpanParent:
        return SpanParent(self.tracer, request.trace_context) if request.traced else SpanParent()

    async def __call__(self, request: ProxyRequest, next: Handler) -> ProxyResponse:
        if not _to_primary(request):
            return await next(request)
        await request.body.buffer(self.replay_limit)
        token = await self.source.token(self._parent(request))
        request.headers["Authorization"] = f"Bearer {token}"
        response = await next(request)
        if response.status != 401:
            return response
        self.source.rejected(token)
        if not request.body.replayable:
            return response
        response.body.release()
        token = await self.source.token(self._parent(request))
        request.headers["Authorization"] = f"Bearer {token}"
        return await next(request)


class KeyPoolLayer:
    """One key per attempt; a key that met ``cooldown_on`` rests and the retry goes out at once."""

    def __init__(self, pool: KeyPool, max_wait: float, max_pause: float) -> None:
        self.pool = pool
        self.max_wait = max_wait
        self.max_pause = max_pause

    async def __call__(self, request: ProxyRequest, next: Handler) -> ProxyResponse:
        if not _to_primary(request):
            request.credential_key = None
            return await next(request)
        index = await self.pool.acquire(self.max_wait, request.deadline)
        request.credential_key = index
        request.headers[self.pool.header] = self.pool.header_value(index)
        response = await next(request)
        if self.pool.observe(index, response.status, response.headers, self.max_pause):
            request.retry_at_once = self.pool.any_ready()
        return response
