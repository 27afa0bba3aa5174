"""The declared fallback (SPEC 9): the answer when nothing better exists.

Outermost in the stack, so it sees every failure a request can end with: the
bulkhead's ``overloaded``, the deadline's ``timeout``, the breaker's
``circuit_open``, the limiter's ``rate_limited``, ``upstream_unreachable`` after
the last attempt, and the upstream's own final response (after retries; a stale
cache answer never gets here). A failure matching ``fallback.on`` is answered
with the declared status, headers and body plus ``x-outrigger-fallback: true``
and ``x-outrigger-error: <reason>``: the error type, or the upstream's status
(``503``) whose response was discarded. The reason is kept on the request
(`ProxyRequest.fallback`) so spans, metrics and the access log show the real failure.
"""

from __future__ import annotations

from multidict import CIMultiDict

from proxy import errors
from proxy.config.model import FALLBACK_ERROR_TYPES, Fallback, OutcomeSet
from proxy.exchange import BytesBody, Handler, ProxyRequest, ProxyResponse

FALLBACK_HEADER = "x-outrigger-fallback"


class FallbackLayer:
    def __init__(self, settings: Fallback) -> None:
        self.settings = settings
        self.error_types = frozenset(c for c in settings.on if c in FALLBACK_ERROR_TYPES)
        self.statuses = OutcomeSet(tuple(c for c in settings.on if c not in FALLBACK_ERROR_TYPES)).statuses
        self._body = settings.body.encode()
        headers: CIMultiDict[str] = CIMultiDict(settings.headers)
        headers[FALLBACK_HEADER] = "true"
        if settings.status not in (204, 304):
            headers["Content-Length"] = str(len(self._body))
        self._headers = headers

    def answer(self, reason: str) -> ProxyResponse:
        headers = self._headers.copy()
        headers[errors.ERROR_HEADER] = reason
        return ProxyResponse(self.settings.status, headers, BytesBody(self._body))

    async def __call__(self, request: ProxyRequest, next: Handler) -> ProxyResponse:
        try:
            response = await next(request)
        except errors.OutriggerError as error:
            if error.error_type not in self.error_types:
                raise
            request.fallback = error.error_type
            return self.answer(error.error_type)
        if response.status in self.statuses and response.tunnel is None:
            response.body.release()  # the upstream's answer is discarded: give its connection back
            request.fallback = str(response.status)
            return self.answer(request.fallback)
        return response
