"""Retries: may this be retried (policy), can we afford it (budget), and when (backoff).

A request is retried only when all hold: the outcome is a condition in `on`
(or the provider's hint header says so), the method is safe (or carries an
idempotency key), the body was small enough to keep, attempts remain, the
backoff ends before the deadline, and the budget has room. Otherwise the last
upstream response, or the last error, goes back as it is. An attempt that left
`retry_at_once` set (its key rests, another is ready) is retried without a wait.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from proxy import errors
from proxy.clock import Clock
from proxy.config.defaults import KEYED_METHODS
from proxy.config.model import OutcomeSet, Retries
from proxy.exchange import BytesBody, Handler, ProxyRequest, ProxyResponse, RetryRecord, buffered
from proxy.layers.backoff import DEFAULT_UNIFORM, full_jitter
from proxy.layers.budget import RetryBudget
from proxy.layers.idempotency import present_key
from proxy.provider_headers import retry_after_seconds

log = logging.getLogger("outrigger.retry")

BUDGET_EXHAUSTED = "retry_budget_exhausted"
"""Span event and `outrigger_rejections_total` type when the budget refuses a retry."""
RetryableFailure = errors.ConnectFailure | errors.ConnectionReset | errors.AttemptTimeout


class RetryLayer:
    def __init__(
        self,
        retries: Retries,
        idempotency_header: str,
        budget: RetryBudget | None,
        clock: Clock,
        circuit_open: Callable[[], bool] | None = None,
        uniform: Callable[[float, float], float] = DEFAULT_UNIFORM,
    ) -> None:
        self.settings = retries
        outcomes = OutcomeSet(retries.on)
        self.statuses = outcomes.statuses
        self.failures = outcomes.errors
        self.methods = frozenset(retries.methods)
        self.idempotency_header = idempotency_header
        self.budget = budget
        self.clock = clock
        self.circuit_open = circuit_open
        """Retries stop as soon as the policy's breaker opens (the tripping response is returned)."""
        self.uniform = uniform

    def _method_safe(self, request: ProxyRequest) -> bool:
        if request.method in self.methods:
            return True
        keyed = present_key(request.headers, self.idempotency_header) is not None
        return request.method in KEYED_METHODS and keyed

    def _reason(self, response: ProxyResponse | None, failure: RetryableFailure | None) -> str | None:
        """The retry condition this outcome meets, or None."""
        if failure is not None:
            return failure.condition if failure.condition in self.failures else None
        assert response is not None
        hint = self.settings.hint_header
        verdict = response.headers.get(hint, "").strip().lower() if hint else ""
        if verdict == "false":
            return None
        if response.status in self.statuses:
            return str(response.status)
        return "hint" if verdict == "true" else None

    def _delay(self, retry: int, response: ProxyResponse | None) -> float | None:
        """Backoff before retry number `retry`; None when Retry-After asks for longer than allowed."""
        retry_after = self.settings.retry_after
        if response is not None and retry_after.honour:
            asked = retry_after_seconds(response.headers.get("Retry-After"), self.clock.wall())
            if asked is not None:
                return asked if asked <= retry_after.max else None
        backoff = self.settings.backoff
        return full_jitter(retry, backoff.base, backoff.max, self.uniform)

    async def __call__(self, request: ProxyRequest, next: Handler) -> ProxyResponse:
        if self.budget is not None:
            self.budget.record_request()
        replayable = (
            self.settings.max_attempts > 1
            and self._method_safe(request)
            and await request.body.buffer(self.settings.max_replay_bytes)
        )
        attempt = 0
        previous: ProxyResponse | RetryableFailure | None = None
        try:
            while True:
                attempt += 1
                response: ProxyResponse | None = None
                failure: RetryableFailure | None = None
                request.retry_at_once = False
                try:
                    response = await next(request)
                except (errors.ConnectFailure, errors.ConnectionReset, errors.AttemptTimeout) as exc:
                    failure = exc
                except errors.Rejected as rejection:
                    # A retry refused locally (breaker, rate limit): the previous upstream outcome stands.
                    if previous is None:
                        raise
                    request.events.append(rejection.error_type)
                    return _final(previous)
                if isinstance(previous, ProxyResponse):
                    previous.body.release()
                previous = response or failure
                retry = self._plan_retry(request, attempt, replayable, response, failure)
                if retry is None:
                    return _final(previous)
                request.retries.append(retry)
                if response is not None:
                    previous = await _settle(response)
                await self.clock.sleep(retry.delay)
        except BaseException:
            if isinstance(previous, ProxyResponse):
                previous.body.release()
            raise

    def _plan_retry(
        self,
        request: ProxyRequest,
        attempt: int,
        replayable: bool,
        response: ProxyResponse | None,
        failure: RetryableFailure | None,
    ) -> RetryRecord | None:
        """Why and how long to wait before the next attempt, or None when this outcome is final."""
        reason = self._reason(response, failure)
        if reason is None or not replayable or attempt >= self.settings.max_attempts:
            return None
        if self.circuit_open is not None and self.circuit_open():
            log.debug("not retrying %s: the circuit breaker is open", request.target.host)
            return None
        # another key takes over at once: the wait the response asked for is that key's alone
        delay = 0.0 if request.retry_at_once else self._delay(attempt, response)
        if delay is None:
            log.debug("not retrying %s: Retry-After exceeds retry_after.max", request.target.host)
            return None
        if request.deadline is not None and self.clock.now() + delay >= request.deadline:
            log.debug("not retrying %s: backoff %.3fs would cross the deadline", request.target.host, delay)
            return None
        if self.budget is not None and not self.budget.try_withdraw():
            log.info("retry budget exhausted for %s; returning the last outcome", request.target.host)
            request.events.append(BUDGET_EXHAUSTED)
            return None
        return RetryRecord(reason, delay)


def _final(outcome: ProxyResponse | RetryableFailure | None) -> ProxyResponse:
    if isinstance(outcome, ProxyResponse):
        return outcome
    assert outcome is not None
    raise outcome


_SETTLE_LIMIT = 64 * 1024
"""A discarded response up to this size is read before the backoff, freeing its connection and span."""
_SETTLE_TIMEOUT_S = 0.5
"""How long that read may take; a body that stalls is dropped, keeping only status and headers."""


async def _settle(response: ProxyResponse) -> ProxyResponse:
    """Keep a small copy of a response we may still have to return (if the retry is refused)."""
    try:
        async with asyncio.timeout(_SETTLE_TIMEOUT_S):
            settled, _ = await buffered(response, _SETTLE_LIMIT)
    except (TimeoutError, errors.ConnectionReset, errors.AttemptTimeout):
        response.body.release()
        headers = response.headers.copy()
        headers.popall("Content-Length", None)
        headers["Content-Length"] = "0"
        return ProxyResponse(response.status, headers, BytesBody(b""), response.reason)
    return settled
