"""The delivery worker: claims due deliveries, sends each through its source, records the outcome.

Per attempt (`decide`)::

    ttl passed before the attempt ............................ dead
    source not configured now (policy gone) .................. pending, rechecked later, not counted
    2xx ...................................................... done
    a non-retryable answer (status kept) ..................... done
    retryable, attempts == max_attempts ...................... dead
    retryable, the next try would be after the ttl ........... dead
    retryable ................................................ pending, after Retry-After if the
                                                               upstream sent one, else full-jitter backoff

Each attempt is one span (a new trace) linked to the trace of the request that was accepted, so
a trace view leads from the 202 to every try. A source (`Dispatcher`) says what settings apply now
and makes the attempt: the policy kind replays through the policy's pipeline; the webhook kind
forwards to the app. Time comes from an injected clock (wall time: store times survive restarts).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanKind, StatusCode

from proxy import errors
from proxy.clock import Clock
from proxy.config.model import DeliveryRetries
from proxy.delivery.store import Delivery, DeliveryStore, Kind, Outcome
from proxy.exchange import ProxyResponse, buffered
from proxy.layers.backoff import DEFAULT_UNIFORM, full_jitter
from proxy.telemetry.names import (
    ATTR_DELIVERY_ATTEMPT,
    ATTR_DELIVERY_ID,
    ATTR_DELIVERY_SOURCE,
    TRACEPARENT_HEADER,
)
from proxy.telemetry.tracing import extract_context

log = logging.getLogger("outrigger.delivery")

CONCURRENCY = 32
"""Attempts in flight at once, over every source (each policy's own limits apply as well)."""
CLAIM_LEASE_S = 60.0
"""How long a claim holds: an outcome the store could not record (disk full) is tried again after it
(this worker never runs one delivery twice at once; a restart releases every claim at once)."""
IDLE_POLL_S = 5.0
"""The longest the worker sleeps without looking at the store (an enqueue wakes it at once)."""
UNCONFIGURED_RECHECK_S = 30.0
"""A delivery whose source is not in the current config waits this long before it is looked at again."""
PURGE_INTERVAL_S = 60.0
ANSWER_READ_LIMIT = 64 * 1024


@dataclass(frozen=True)
class Attempt:
    """What one try got: a status, or the error that stood in for one."""

    status: int | None
    error: str | None = None
    """An error type (``connect-failure``, ``circuit_open``...) when no answer came back."""
    retryable: bool = False
    retry_after: float | None = None
    """Seconds the upstream (or a local limiter) asked to wait."""


async def settle(response: ProxyResponse) -> None:
    """Done with an attempt's answer: a body up to `ANSWER_READ_LIMIT` is read (its connection
    then serves the next attempt), a larger one dropped. The status is what counts: a body cut
    short does not fail the delivery."""
    try:
        response, _ = await buffered(response, ANSWER_READ_LIMIT)
    except errors.OutriggerError:
        pass
    finally:
        response.body.release()


class Dispatcher(Protocol):
    def settings(self, delivery: Delivery) -> DeliveryRetries | str:
        """The delivery settings in force now, or why the delivery cannot be attempted now."""

    async def send(self, delivery: Delivery, context: Context, traced: bool) -> Attempt:
        """One try; `context` holds the attempt's span (parent of the pipeline's CLIENT spans)."""


class DeliveryRecorder(Protocol):
    """Where results are counted (`outrigger_deliveries_total{source,result}`)."""

    def delivery_result(self, source: str, result: str) -> None: ...


def decide(
    delivery: Delivery,
    attempt: Attempt,
    settings: DeliveryRetries,
    now: float,
    uniform: Callable[[float, float], float] = DEFAULT_UNIFORM,
) -> Outcome:
    """The state after an attempt (see the module docstring)."""
    attempts = delivery.attempts + 1
    status, error = attempt.status, attempt.error
    if status is not None and 200 <= status < 300:
        return Outcome("done", now, status)
    if not attempt.retryable:
        return Outcome("done", now, status, error)
    reason = error or f"status {status}"
    if attempts >= settings.max_attempts:
        return Outcome("dead", now, status, f"{reason}; gave up after {attempts} attempt(s)")
    delay = attempt.retry_after
    if delay is None:
        delay = full_jitter(attempts, settings.backoff.base, settings.backoff.max, uniform)
    if now + delay >= delivery.expires_at:
        return Outcome("dead", now, status, f"{reason}; ttl ends before the next attempt")
    return Outcome("pending", now, status, error, next_attempt_at=now + delay)


def result_label(outcome: Outcome) -> str:
    """The ``result`` label of `outrigger_deliveries_total` for one recorded outcome."""
    if outcome.state == "done":
        return "delivered" if outcome.status is not None and 200 <= outcome.status < 300 else "rejected"
    if outcome.state == "dead":
        return "dead"
    return "retried" if outcome.counted else "waiting"


class DeliveryWorker:
    def __init__(
        self,
        store: DeliveryStore,
        dispatchers: Mapping[Kind, Dispatcher],
        clock: Clock,
        tracer: trace.Tracer,
        recorder: DeliveryRecorder,
        uniform: Callable[[float, float], float] = DEFAULT_UNIFORM,
    ) -> None:
        self.store = store
        self.dispatchers = dispatchers
        self.clock = clock
        self.tracer = tracer
        self.recorder = recorder
        self.uniform = uniform
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self._last_purge = 0.0

    def wake(self) -> None:
        """Something became due now (an enqueue, a retry): look at the store at once."""
        self._wake.set()

    def start(self) -> None:
        self._loop = asyncio.create_task(self._run(), name="outrigger-delivery-worker")

    async def stop(self, grace: float) -> None:
        """Stop claiming; give attempts in flight `grace` seconds to finish, then cancel them (a
        cancelled attempt stays pending, due again at the next start)."""
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
            self._loop = None
        tasks = list(self._in_flight.values())
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=max(grace, 0.0))
            for task in late:
                task.cancel()
            if late:
                log.info("shutdown: %d delivery attempt(s) left due for the next start", len(late))
                await asyncio.wait(late, timeout=1.0)

    async def tick(self) -> list[asyncio.Task[None]]:
        """Claim what is due (as many as there are free slots) and start an attempt for each."""
        free = CONCURRENCY - len(self._in_flight)
        if free <= 0:
            return []
        now = self.clock.wall()
        started: list[asyncio.Task[None]] = []
        for delivery in await self.store.claim(now, free, CLAIM_LEASE_S):
            if delivery.id in self._in_flight:
                continue  # still running from an earlier claim whose lease ran out
            task = asyncio.create_task(self._attempt(delivery))
            self._in_flight[delivery.id] = task
            task.add_done_callback(functools.partial(self._finished, delivery.id))
            started.append(task)
        return started

    def _finished(self, delivery_id: str, _: asyncio.Task[None]) -> None:
        self._in_flight.pop(delivery_id, None)
        self._wake.set()  # a slot is free; the delivery may be due again soon

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
                await self._maybe_purge()
                wait = await self._idle_time()
            except errors.StoreUnavailable as error:
                log.warning("delivery worker: %s", error)
                wait = IDLE_POLL_S
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def _idle_time(self) -> float:
        if len(self._in_flight) >= CONCURRENCY:
            return IDLE_POLL_S  # a finishing attempt wakes the loop
        due = await self.store.next_due()
        if due is None:
            return IDLE_POLL_S
        return min(max(due - self.clock.wall(), 0.0), IDLE_POLL_S)

    async def _maybe_purge(self) -> None:
        now = self.clock.wall()
        if now - self._last_purge >= PURGE_INTERVAL_S:
            self._last_purge = now
            await self.store.purge(now)

    async def _attempt(self, delivery: Delivery) -> None:
        try:
            outcome = await self._outcome(delivery)
            await self.store.record(delivery.id, outcome)
        except errors.StoreUnavailable as error:
            log.warning("delivery %s: outcome not recorded (%s); it will be tried again", delivery.id, error)
            return
        except Exception:
            log.exception("delivery %s: attempt failed unexpectedly; it will be tried again", delivery.id)
            return
        self.recorder.delivery_result(delivery.source, result_label(outcome))
        if outcome.state == "dead":
            log.warning("delivery %s (%s) is dead: %s", delivery.id, delivery.source, outcome.error)

    async def _outcome(self, delivery: Delivery) -> Outcome:
        now = self.clock.wall()
        if now >= delivery.expires_at:
            return Outcome("dead", now, delivery.last_status, "ttl passed before the attempt", counted=False)
        dispatcher = self.dispatchers.get(delivery.kind)
        settings = (
            dispatcher.settings(delivery) if dispatcher else f"no source of kind {delivery.kind} is running"
        )
        if isinstance(settings, str):
            recheck = min(now + UNCONFIGURED_RECHECK_S, delivery.expires_at)
            return Outcome(
                "pending", now, delivery.last_status, settings, next_attempt_at=recheck, counted=False
            )
        assert dispatcher is not None
        attempt = await self._traced_send(dispatcher, delivery)
        return decide(delivery, attempt, settings, self.clock.wall(), self.uniform)

    async def _traced_send(self, dispatcher: Dispatcher, delivery: Delivery) -> Attempt:
        links: list[Link] = []
        if delivery.traceparent:
            origin = trace.get_current_span(extract_context({TRACEPARENT_HEADER: delivery.traceparent}))
            if origin.get_span_context().is_valid:
                links.append(Link(origin.get_span_context()))
        span = self.tracer.start_span(
            f"delivery {delivery.method}",
            context=Context(),  # a trace of its own: the accepting request ended long ago
            kind=SpanKind.CONSUMER,
            links=links,
        )
        recording = span.is_recording()
        if recording:
            span.set_attributes(
                {
                    ATTR_DELIVERY_ID: delivery.id,
                    ATTR_DELIVERY_ATTEMPT: delivery.attempts + 1,
                    ATTR_DELIVERY_SOURCE: delivery.source,
                    "http.request.method": delivery.method,
                }
            )
        try:
            attempt = await dispatcher.send(delivery, trace.set_span_in_context(span), recording)
        except BaseException:
            span.set_status(StatusCode.ERROR)
            span.end()
            raise
        if recording:
            if attempt.status is not None:
                span.set_attribute("http.response.status_code", attempt.status)
            if attempt.error is not None or (attempt.status is not None and attempt.status >= 400):
                span.set_attribute("error.type", attempt.error or str(attempt.status))
                span.set_status(StatusCode.ERROR)
        span.end()
        return attempt
