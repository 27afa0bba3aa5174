"""The delivery worker's state machine, on a real store, a fake clock and a scripted source."""

from __future__ import annotations

import asyncio

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from proxy.config.model import Delivery as DeliverySettings
from proxy.delivery.sqlite import SqliteStore
from proxy.delivery.store import Delivery, NewDelivery
from proxy.delivery.worker import Attempt, DeliveryWorker, decide
from tests.fakes import FakeClock, RecordingUniform

SETTINGS = DeliverySettings(max_attempts=3, backoff={"base": 1.0, "max": 8.0}, ttl=3600)
NOT_TRACED = trace.NoOpTracer()
ORIGIN = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class ScriptedSource:
    """A `Dispatcher` answering attempt i with `script[i]` (the last repeats)."""

    def __init__(self, *script: Attempt, settings: DeliverySettings | str = SETTINGS) -> None:
        self.script = script
        self.sent: list[Delivery] = []
        self.current = settings

    def settings(self, delivery: Delivery) -> DeliverySettings | str:
        return self.current

    async def send(self, delivery: Delivery, context: Context, traced: bool) -> Attempt:
        self.sent.append(delivery)
        return self.script[min(len(self.sent), len(self.script)) - 1]


class Results:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def delivery_result(self, source: str, result: str) -> None:
        self.seen.append((source, result))


def make_worker(
    store: SqliteStore,
    source: ScriptedSource,
    clock: FakeClock,
    tracer: trace.Tracer = NOT_TRACED,
) -> tuple[DeliveryWorker, Results]:
    results = Results()
    worker = DeliveryWorker(store, {"policy": source}, clock, tracer, results, uniform=RecordingUniform(1.0))
    return worker, results


async def enqueue(store: SqliteStore, clock: FakeClock, ttl: float = 3600) -> str:
    delivery = NewDelivery(
        kind="policy",
        source="api.test",
        method="POST",
        host="api.test",
        path_qs="/v1",
        headers=(),
        body=b"{}",
        expires_at=clock.wall() + ttl,
        target="https://api.test:443",
        traceparent=ORIGIN,
    )
    return (await store.enqueue(delivery, clock.wall())).id


async def run_due(worker: DeliveryWorker) -> int:
    """One look at the store: start what is due and wait for those attempts."""
    tasks = await worker.tick()
    await asyncio.gather(*tasks)
    return len(tasks)


async def test_retryable_failures_back_off_exponentially_then_succeed(store: SqliteStore) -> None:
    clock = FakeClock()
    source = ScriptedSource(
        Attempt(503, retryable=True), Attempt(None, "connect-failure", True), Attempt(200)
    )
    worker, results = make_worker(store, source, clock)
    delivery_id = await enqueue(store, clock)

    assert await run_due(worker) == 1
    first = await store.get(delivery_id)
    assert first is not None
    assert (first.state, first.attempts, first.last_status) == ("pending", 1, 503)
    assert first.next_attempt_at == clock.wall() + 1.0  # base * 2**0, full jitter at its ceiling
    assert await run_due(worker) == 0  # not due yet
    clock.advance(1.0)
    assert await run_due(worker) == 1
    second = await store.get(delivery_id)
    assert second is not None
    assert (second.last_error, second.next_attempt_at) == ("connect-failure", clock.wall() + 2.0)
    clock.advance(2.0)
    assert await run_due(worker) == 1
    done = await store.get(delivery_id)
    assert done is not None
    assert (done.state, done.attempts, done.last_status) == ("done", 3, 200)
    assert results.seen == [("api.test", "retried"), ("api.test", "retried"), ("api.test", "delivered")]


async def test_retry_after_from_the_upstream_replaces_the_backoff(store: SqliteStore) -> None:
    clock = FakeClock()
    worker, _ = make_worker(store, ScriptedSource(Attempt(429, retryable=True, retry_after=30.0)), clock)
    delivery_id = await enqueue(store, clock)

    await run_due(worker)

    pending = await store.get(delivery_id)
    assert pending is not None
    assert pending.next_attempt_at == clock.wall() + 30.0


async def test_a_non_retryable_answer_is_done_with_its_status(store: SqliteStore) -> None:
    clock = FakeClock()
    worker, results = make_worker(store, ScriptedSource(Attempt(422)), clock)
    delivery_id = await enqueue(store, clock)

    await run_due(worker)

    done = await store.get(delivery_id)
    assert done is not None
    assert (done.state, done.last_status, done.attempts) == ("done", 422, 1)
    assert results.seen == [("api.test", "rejected")]


async def test_dead_after_max_attempts(store: SqliteStore) -> None:
    clock = FakeClock()
    source = ScriptedSource(Attempt(503, retryable=True))
    worker, results = make_worker(store, source, clock)
    delivery_id = await enqueue(store, clock)

    for _ in range(3):
        await run_due(worker)
        clock.advance(10.0)

    dead = await store.get(delivery_id)
    assert dead is not None
    assert (dead.state, dead.attempts) == ("dead", 3)
    assert dead.last_error == "status 503; gave up after 3 attempt(s)"
    assert len(source.sent) == 3
    assert results.seen[-1] == ("api.test", "dead")
    clock.advance(100.0)
    assert await run_due(worker) == 0


async def test_dead_when_the_next_attempt_would_come_after_the_ttl(store: SqliteStore) -> None:
    clock = FakeClock()
    worker, _ = make_worker(store, ScriptedSource(Attempt(503, retryable=True)), clock)
    delivery_id = await enqueue(store, clock, ttl=0.5)  # the first backoff is 1 s

    await run_due(worker)

    dead = await store.get(delivery_id)
    assert dead is not None
    assert dead.state == "dead"
    assert "ttl" in (dead.last_error or "")


async def test_a_source_not_configured_now_waits_without_counting_an_attempt(store: SqliteStore) -> None:
    clock = FakeClock()
    source = ScriptedSource(Attempt(200), settings="policy api.test is not in the current config")
    worker, results = make_worker(store, source, clock)
    delivery_id = await enqueue(store, clock)

    await run_due(worker)

    waiting = await store.get(delivery_id)
    assert waiting is not None
    assert (waiting.state, waiting.attempts) == ("pending", 0)
    assert waiting.last_error == "policy api.test is not in the current config"
    assert source.sent == []
    assert results.seen == [("api.test", "waiting")]
    source.current = SETTINGS  # a reload brought the policy back
    clock.advance(30.0)
    await run_due(worker)
    done = await store.get(delivery_id)
    assert done is not None
    assert (done.state, done.attempts) == ("done", 1)


async def test_each_attempt_is_a_span_of_its_own_linked_to_the_original_request(
    store: SqliteStore, span_exporter: tuple[trace.Tracer, InMemorySpanExporter]
) -> None:
    tracer, exporter = span_exporter
    clock = FakeClock()
    worker, _ = make_worker(store, ScriptedSource(Attempt(503, retryable=True), Attempt(200)), clock, tracer)
    delivery_id = await enqueue(store, clock)

    await run_due(worker)
    clock.advance(1.0)
    await run_due(worker)

    spans = exporter.get_finished_spans()
    assert [s.attributes["outrigger.delivery.attempt"] for s in spans] == [1, 2]  # type: ignore[index]
    for span in spans:
        assert span.attributes is not None
        assert span.attributes["outrigger.delivery.id"] == delivery_id
        assert span.parent is None
        assert [format(link.context.trace_id, "032x") for link in span.links] == [ORIGIN.split("-")[1]]
        assert [format(link.context.span_id, "016x") for link in span.links] == [ORIGIN.split("-")[2]]
    assert spans[0].status.is_ok is False
    assert spans[1].attributes["http.response.status_code"] == 200  # type: ignore[index]


def test_a_local_refusal_that_is_not_transient_is_done_with_its_status() -> None:
    clock = FakeClock()
    delivery = Delivery(
        id="d",
        kind="policy",
        source="api.test",
        state="pending",
        method="POST",
        host="api.test",
        path_qs="/",
        target="",
        traceparent=None,
        created_at=clock.wall(),
        expires_at=clock.wall() + 10,
        next_attempt_at=clock.wall(),
        attempts=0,
        last_status=None,
        last_error=None,
        last_attempt_at=None,
        finished_at=None,
    )

    outcome = decide(delivery, Attempt(403, "address_not_allowed"), SETTINGS, clock.wall())

    assert (outcome.state, outcome.status, outcome.error) == ("done", 403, "address_not_allowed")


async def test_stop_leaves_an_attempt_that_does_not_finish_in_time_pending(store: SqliteStore) -> None:
    clock = FakeClock()
    release = asyncio.Event()

    class Hanging(ScriptedSource):
        async def send(self, delivery: Delivery, context: Context, traced: bool) -> Attempt:
            await release.wait()
            return Attempt(200)

    worker, _ = make_worker(store, Hanging(), clock)
    delivery_id = await enqueue(store, clock)
    tasks = await worker.tick()

    await worker.stop(grace=0.05)

    assert all(task.done() for task in tasks)
    left = await store.get(delivery_id)
    assert left is not None
    assert (left.state, left.attempts) == ("pending", 0)
