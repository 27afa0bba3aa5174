"""Bulkhead: in-flight cap, bounded FIFO queue with a timeout, 503 `overloaded`, slot held by the body.

Queue timeouts use real (loop) time, so they are kept to a few tens of milliseconds.
"""

from __future__ import annotations

import asyncio

import pytest
from multidict import CIMultiDict

from proxy import errors
from proxy.config.model import Concurrency
from proxy.exchange import ProxyRequest, ProxyResponse
from proxy.layers.concurrency import Bulkhead, ConcurrencyLayer
from tests.fakes import TrackedBody, fake_upstream, make_request, make_response, read_body

LONG = 5.0
"""A queue_timeout no test reaches (bounds a hang instead)."""


def _bulkhead(max_in_flight: int = 1, max_queued: int = 10, queue_timeout: float = LONG) -> Bulkhead:
    return Bulkhead(
        "api.test",
        Concurrency(max_in_flight=max_in_flight, max_queued=max_queued, queue_timeout=queue_timeout),
    )


async def _settle(rounds: int = 10) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


async def test_max_in_flight_is_enforced() -> None:
    bulkhead = _bulkhead(max_in_flight=3)
    for _ in range(3):
        await bulkhead.acquire()
    assert bulkhead.in_flight == 3
    waiter = asyncio.create_task(bulkhead.acquire())
    await _settle()
    assert not waiter.done(), "a fourth request must wait"
    assert bulkhead.snapshot() == {"in_flight": 3, "queued": 1}
    bulkhead.release()
    await _settle()
    assert waiter.done()
    assert bulkhead.snapshot() == {"in_flight": 3, "queued": 0}
    for _ in range(3):
        bulkhead.release()
    assert bulkhead.snapshot() == {"in_flight": 0, "queued": 0}


async def test_waiters_are_served_in_fifo_order() -> None:
    bulkhead = _bulkhead(max_in_flight=1)
    await bulkhead.acquire()
    order: list[int] = []

    async def wait(index: int) -> None:
        await bulkhead.acquire()
        order.append(index)

    tasks = []
    for index in range(6):
        tasks.append(asyncio.create_task(wait(index)))
        await _settle(2)  # each one queues before the next arrives
    assert bulkhead.queued == 6
    for expected in range(6):
        bulkhead.release()
        await _settle()
        assert order == list(range(expected + 1)), "exactly the oldest waiter got the slot"
        assert bulkhead.in_flight == 1
    await asyncio.gather(*tasks)


async def test_a_new_arrival_does_not_overtake_queued_waiters() -> None:
    bulkhead = _bulkhead(max_in_flight=1)
    await bulkhead.acquire()
    first = asyncio.create_task(bulkhead.acquire())
    await _settle()
    bulkhead.release()  # handed to `first`, which has not run yet
    late = asyncio.create_task(bulkhead.acquire())
    await _settle()
    assert first.done()
    assert not late.done(), "the slot belongs to the queued waiter, not to a newcomer"
    assert bulkhead.snapshot() == {"in_flight": 1, "queued": 1}
    bulkhead.release()
    await _settle()
    assert late.done()


async def test_excess_beyond_max_queued_is_refused_at_once() -> None:
    bulkhead = _bulkhead(max_in_flight=2, max_queued=2, queue_timeout=LONG)
    await bulkhead.acquire()
    await bulkhead.acquire()
    queued = [asyncio.create_task(bulkhead.acquire()) for _ in range(2)]
    await _settle()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(errors.Overloaded) as raised:
        await bulkhead.acquire()
    assert loop.time() - started < 0.5, "refused at once, not after queue_timeout"
    assert raised.value.status == 503
    assert raised.value.error_type == "overloaded"
    assert raised.value.retry_after == LONG
    assert bulkhead.snapshot() == {"in_flight": 2, "queued": 2}
    bulkhead.release()
    bulkhead.release()
    await asyncio.gather(*queued)


async def test_max_queued_zero_sheds_everything_above_max_in_flight() -> None:
    bulkhead = _bulkhead(max_in_flight=1, max_queued=0)
    await bulkhead.acquire()
    with pytest.raises(errors.Overloaded):
        await bulkhead.acquire()
    assert bulkhead.snapshot() == {"in_flight": 1, "queued": 0}


async def test_queue_timeout_answers_overloaded_and_leaves_the_queue() -> None:
    bulkhead = _bulkhead(max_in_flight=1, max_queued=5, queue_timeout=0.03)
    await bulkhead.acquire()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(errors.Overloaded) as raised:
        await bulkhead.acquire()
    waited = loop.time() - started
    assert 0.025 <= waited < 1.0
    assert "queue_timeout" in raised.value.message
    assert raised.value.retry_after == pytest.approx(0.03)
    assert bulkhead.snapshot() == {"in_flight": 1, "queued": 0}
    bulkhead.release()
    assert bulkhead.snapshot() == {"in_flight": 0, "queued": 0}, "the timed-out waiter took no slot"


async def test_cancelled_waiters_leave_the_queue_and_take_no_slot() -> None:
    bulkhead = _bulkhead(max_in_flight=1, max_queued=2)
    await bulkhead.acquire()
    first = asyncio.create_task(bulkhead.acquire())
    second = asyncio.create_task(bulkhead.acquire())
    await _settle()
    assert bulkhead.queued == 2
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert bulkhead.queued == 1, "the cancelled waiter left the queue at once"
    # its place is free again for a newcomer (max_queued 2)
    third = asyncio.create_task(bulkhead.acquire())
    await _settle()
    assert bulkhead.queued == 2
    bulkhead.release()
    await _settle()
    assert second.done(), "the slot went to the oldest live waiter, not the cancelled one"
    assert not third.done()
    assert bulkhead.snapshot() == {"in_flight": 1, "queued": 1}
    bulkhead.release()
    await _settle()
    assert third.done()
    bulkhead.release()
    assert bulkhead.snapshot() == {"in_flight": 0, "queued": 0}


async def test_a_waiter_cancelled_after_its_slot_was_handed_over_passes_it_on() -> None:
    bulkhead = _bulkhead(max_in_flight=1)
    await bulkhead.acquire()
    first = asyncio.create_task(bulkhead.acquire())
    second = asyncio.create_task(bulkhead.acquire())
    await _settle()
    bulkhead.release()  # hands the slot to `first` ...
    first.cancel()  # ... which is cancelled before it could run
    with pytest.raises(asyncio.CancelledError):
        await first
    await _settle()
    assert second.done(), "the handed-over slot was passed to the next waiter"
    assert bulkhead.snapshot() == {"in_flight": 1, "queued": 0}
    bulkhead.release()
    assert bulkhead.snapshot() == {"in_flight": 0, "queued": 0}


async def test_a_waiter_cancelled_just_before_a_release_still_raises_cancelled_error() -> None:
    bulkhead = _bulkhead(max_in_flight=1)
    await bulkhead.acquire()
    waiter = asyncio.create_task(bulkhead.acquire())
    await _settle()
    waiter.cancel()  # the client went away ...
    bulkhead.release()  # ... in the same loop iteration as another response finished
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert bulkhead.snapshot() == {"in_flight": 0, "queued": 0}


# --------------------------------------------------------------------------- the layer


async def test_the_slot_is_held_until_the_response_body_is_released() -> None:
    bulkhead = _bulkhead(max_in_flight=1, max_queued=5)
    layer = ConcurrencyLayer(bulkhead, 30.0)
    body = TrackedBody(b"payload")
    upstream = fake_upstream(ProxyResponse(200, CIMultiDict(), body), 200)
    response = await layer(make_request(), upstream)
    assert bulkhead.in_flight == 1, "the head arrived but the body is still streaming"
    second = asyncio.create_task(layer(make_request(), upstream))
    await _settle()
    assert not second.done()
    assert upstream.calls == 1, "the second request waits for the slot, not the upstream"
    assert await read_body(response) == b"payload"
    await _settle()
    assert not second.done(), "reading the body is not releasing it"
    response.body.release()
    assert body.released, "the inner body is released too"
    await _settle()
    assert second.done()
    assert upstream.calls == 2
    assert bulkhead.in_flight == 1
    response.body.release()  # releasing twice hands over nothing more
    assert bulkhead.in_flight == 1
    (await second).body.release()
    assert bulkhead.snapshot() == {"in_flight": 0, "queued": 0}


async def test_release_hands_the_slot_to_the_next_waiter_in_order() -> None:
    bulkhead = _bulkhead(max_in_flight=1, max_queued=5)
    layer = ConcurrencyLayer(bulkhead, 30.0)
    reached: list[str] = []

    async def upstream(request: ProxyRequest) -> ProxyResponse:
        reached.append(request.path_qs)
        return make_response(200)

    first = await layer(make_request(path_qs="/0"), upstream)
    tasks = []
    for index in range(1, 4):
        tasks.append(asyncio.create_task(layer(make_request(path_qs=f"/{index}"), upstream)))
        await _settle(2)
    assert reached == ["/0"]
    first.body.release()
    for index in range(1, 4):
        await _settle()
        assert reached == [f"/{i}" for i in range(index + 1)]
        (await tasks[index - 1]).body.release()
    assert bulkhead.snapshot() == {"in_flight": 0, "queued": 0}


@pytest.mark.parametrize("failure", [errors.ConnectFailure, asyncio.CancelledError, RuntimeError])
async def test_the_slot_is_released_when_next_raises(failure: type[BaseException]) -> None:
    bulkhead = _bulkhead(max_in_flight=1, max_queued=0)
    layer = ConcurrencyLayer(bulkhead, 30.0)
    with pytest.raises(failure):
        await layer(make_request(), fake_upstream(failure))
    assert bulkhead.snapshot() == {"in_flight": 0, "queued": 0}
    response = await layer(make_request(), fake_upstream(200))
    assert response.status == 200


async def test_the_layer_sheds_with_overloaded_without_calling_next() -> None:
    bulkhead = _bulkhead(max_in_flight=1, max_queued=0)
    layer = ConcurrencyLayer(bulkhead, 30.0)
    held = await layer(make_request(), fake_upstream(200))
    upstream = fake_upstream(200)
    with pytest.raises(errors.Overloaded):
        await layer(make_request(), upstream)
    assert upstream.calls == 0
    held.body.release()


async def test_the_queue_wait_never_outlasts_the_requests_own_deadline() -> None:
    """queue_timeout 10s, but the request has 200ms of total left: 504 timeout at ~200ms."""
    bulkhead = _bulkhead(max_in_flight=1, queue_timeout=10.0)
    await bulkhead.acquire()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(errors.Timeout) as raised:
        await bulkhead.acquire(deadline=started + 0.2)
    assert not isinstance(raised.value, errors.Overloaded)
    assert 0.15 <= loop.time() - started < 1.0
    assert bulkhead.queued == 0


async def test_the_layer_queues_within_the_total_counted_from_arrival() -> None:
    bulkhead = _bulkhead(max_in_flight=1, queue_timeout=10.0)
    await bulkhead.acquire()
    layer = ConcurrencyLayer(bulkhead, 0.3)
    request = make_request()
    with pytest.raises(errors.Timeout, match="total ran out while it queued"):
        await layer(request, fake_upstream(200))
