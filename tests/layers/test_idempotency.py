"""Idempotency keys (injection, one key for all attempts) and the replay cache, on a fake clock."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from multidict import CIMultiDict

from proxy import errors, exchange
from proxy.exchange import ProxyResponse
from proxy.layers.idempotency import REPLAYED_HEADER, IdempotencyLayer, ReplayCache
from proxy.layers.retry import RetryLayer
from proxy.pipeline import compose
from tests.fakes import (
    FakeClock,
    FakeUpstream,
    RecordingUniform,
    TrackedBody,
    fake_upstream,
    make_request,
    make_response,
    read_body,
    settings_from,
)


class Harness:
    def __init__(self, **idempotency: Any) -> None:
        self.settings = settings_from(idempotency=idempotency)
        assert self.settings.idempotency is not None
        self.clock = FakeClock()
        replay = self.settings.idempotency.replay
        self.cache = ReplayCache(replay, self.clock) if replay else None
        self.layer = IdempotencyLayer(self.settings.idempotency, self.cache)

    async def send(
        self,
        upstream: FakeUpstream,
        method: str = "POST",
        path: str = "/v1/charges",
        key: str | None = "key-1",
        body: bytes | None = b"amount=100",
        **kwargs: Any,
    ) -> ProxyResponse:
        headers = {"Idempotency-Key": key} if key is not None else {}
        request = make_request(method, path, headers, body, settings=self.settings, **kwargs)
        return await self.layer(request, upstream)


# --- keys ----------------------------------------------------------------------------------------


async def test_key_is_injected_as_uuid4_when_absent() -> None:
    h = Harness()
    upstream = fake_upstream(200)
    request = make_request("POST", body=b"a=1", settings=h.settings)
    await h.layer(request, upstream)
    key = upstream.attempts[0].headers["Idempotency-Key"]
    assert uuid.UUID(key).version == 4
    assert str(uuid.UUID(key)) == key
    assert request.idempotency_key_injected is True


async def test_each_request_gets_its_own_key() -> None:
    h = Harness()
    upstream = fake_upstream(200)
    for _ in range(3):
        await h.send(upstream, key=None)
    keys = {a.headers["Idempotency-Key"] for a in upstream.attempts}
    assert len(keys) == 3


@pytest.mark.parametrize("key", ["key-1", "  Spaced Key/With+Symbols==  ", "UPPER-lower-0123", "ü-ñ"])
async def test_app_key_is_kept_byte_for_byte(key: str) -> None:
    h = Harness()
    upstream = fake_upstream(200)
    request = make_request("POST", headers={"idempotency-key": key}, body=b"a=1", settings=h.settings)
    await h.layer(request, upstream)
    assert upstream.attempts[0].headers.getall("Idempotency-Key") == [key]
    assert request.idempotency_key_injected is False


@pytest.mark.parametrize("blank", ["", "   ", "\t"])
async def test_blank_app_key_counts_as_absent_and_a_fresh_one_is_injected(blank: str) -> None:
    h = Harness()
    upstream = fake_upstream(200)
    request = make_request("POST", headers={"Idempotency-Key": blank}, body=b"a=1", settings=h.settings)
    await h.layer(request, upstream)
    [key] = upstream.attempts[0].headers.getall("Idempotency-Key")
    assert uuid.UUID(key).version == 4
    assert request.idempotency_key == key
    assert request.idempotency_key_injected is True


async def test_blank_keys_never_share_a_replay_slot() -> None:
    h = Harness(**REPLAY)
    upstream = fake_upstream(201, 201)
    first = await h.send(upstream, key="")
    second = await h.send(upstream, key=" ")
    assert upstream.calls == 2
    assert REPLAYED_HEADER not in second.headers
    assert first.status == 201
    assert h.cache is not None
    assert len(h.cache) == 0, "an injected key is never stored"


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "HEAD"])
async def test_methods_outside_the_list_are_untouched(method: str) -> None:
    h = Harness()
    upstream = fake_upstream(200)
    request = make_request(method, settings=h.settings)
    await h.layer(request, upstream)
    assert "Idempotency-Key" not in upstream.attempts[0].headers
    assert request.idempotency_key_injected is False


async def test_custom_methods_and_header() -> None:
    h = Harness(header="X-Request-Key", methods=["PUT"])
    upstream = fake_upstream(200)
    await h.send(upstream, method="POST", key=None)
    await h.send(upstream, method="PUT", key=None)
    post, put = upstream.attempts
    assert "X-Request-Key" not in post.headers
    assert "Idempotency-Key" not in post.headers
    assert uuid.UUID(put.headers["X-Request-Key"]).version == 4
    assert "Idempotency-Key" not in put.headers


async def test_the_same_key_on_every_attempt_idempotency_above_retry() -> None:
    h = Harness()
    retries = settings_from(retries={"on": ["503", "reset"], "max_attempts": 4, "budget": None}).retries
    assert retries is not None
    clock = FakeClock()
    retry = RetryLayer(retries, h.settings.idempotency_header, None, clock, uniform=RecordingUniform(0))
    upstream = fake_upstream(503, errors.ConnectionReset, 503, 200)
    request = make_request("POST", body=b"amount=100", settings=h.settings)
    response = await compose([h.layer, retry], upstream)(request)
    assert response.status == 200
    assert upstream.calls == 4, "POST was retried because the injected key made it safe"
    keys = [a.headers["Idempotency-Key"] for a in upstream.attempts]
    assert len(set(keys)) == 1
    assert uuid.UUID(keys[0]).version == 4
    assert [a.body for a in upstream.attempts] == [b"amount=100"] * 4


# --- replay -------------------------------------------------------------------------------------

REPLAY = {"replay": {"ttl": "1h", "max_entries": 100, "max_body_bytes": "1KiB"}}


async def test_repeat_gets_the_stored_response_without_calling_next() -> None:
    h = Harness(**REPLAY)
    upstream = fake_upstream((201, {"Content-Type": "application/json", "X-Id": "ch_1"}, b'{"id":"ch_1"}'))
    first = await h.send(upstream)
    assert await read_body(first) == b'{"id":"ch_1"}'
    assert REPLAYED_HEADER not in first.headers
    second = await h.send(upstream)
    assert upstream.calls == 1
    assert second.status == 201
    assert second.headers[REPLAYED_HEADER] == "true"
    assert second.headers["X-Id"] == "ch_1"
    assert second.headers["Content-Type"] == "application/json"
    assert await read_body(second) == b'{"id":"ch_1"}'
    third = await h.send(upstream)
    assert await read_body(third) == b'{"id":"ch_1"}'
    assert upstream.calls == 1


async def test_stored_body_read_in_chunks_is_kept_whole_and_the_upstream_body_released() -> None:
    h = Harness(**REPLAY)
    original = make_response(200, {}, b"abcdefghij" * 50, chunk_size=7)
    upstream = fake_upstream(original)
    first = await h.send(upstream)
    assert await read_body(first) == b"abcdefghij" * 50
    assert isinstance(original.body, TrackedBody)
    assert original.body.released
    second = await h.send(upstream)
    assert await read_body(second) == b"abcdefghij" * 50
    assert upstream.calls == 1


@pytest.mark.parametrize(
    ("change", "value"),
    [("body", b"amount=999"), ("path", "/v1/refunds"), ("method", "PATCH")],
)
async def test_same_key_for_a_different_request_is_refused(change: str, value: Any) -> None:
    h = Harness(methods=["POST", "PATCH"], **REPLAY)
    upstream = fake_upstream(200)
    await h.send(upstream)
    with pytest.raises(errors.IdempotencyKeyReused) as raised:
        await h.send(upstream, **{change: value})
    assert raised.value.status == 422
    assert raised.value.error_type == "idempotency_key_reused"
    assert upstream.calls == 1


async def test_different_keys_are_independent() -> None:
    h = Harness(**REPLAY)
    upstream = fake_upstream(200)
    await h.send(upstream, key="a")
    await h.send(upstream, key="b", body=b"other")
    assert upstream.calls == 2


async def test_concurrent_duplicates_wait_for_the_first() -> None:
    h = Harness(**REPLAY)
    gate = asyncio.Event()
    upstream = fake_upstream((200, {"X-Id": "ch_9"}, b"done"), gate=gate)
    tasks = [asyncio.create_task(h.send(upstream)) for _ in range(5)]
    for _ in range(10):
        await asyncio.sleep(0)
    assert upstream.calls == 1, "duplicates must not reach the upstream while the first is in flight"
    assert not any(t.done() for t in tasks)
    gate.set()
    responses = await asyncio.wait_for(asyncio.gather(*tasks), timeout=5)
    assert upstream.calls == 1
    assert [await read_body(r) for r in responses] == [b"done"] * 5
    assert sum(r.headers.get(REPLAYED_HEADER) == "true" for r in responses) == 4


async def test_concurrent_duplicate_with_a_different_body_is_refused() -> None:
    h = Harness(**REPLAY)
    gate = asyncio.Event()
    upstream = fake_upstream(200, gate=gate)
    first = asyncio.create_task(h.send(upstream))
    await asyncio.sleep(0)
    with pytest.raises(errors.IdempotencyKeyReused):
        await h.send(upstream, body=b"amount=1")
    gate.set()
    assert (await first).status == 200
    assert upstream.calls == 1


async def test_waiters_go_upstream_themselves_when_the_first_fails() -> None:
    h = Harness(**REPLAY)
    gate = asyncio.Event()
    upstream = fake_upstream(errors.ConnectFailure, (200, {}, b"ok"), gate=gate)
    first = asyncio.create_task(h.send(upstream))
    second = asyncio.create_task(h.send(upstream))
    await asyncio.sleep(0)
    gate.set()
    with pytest.raises(errors.ConnectFailure):
        await first
    response = await asyncio.wait_for(second, timeout=5)
    assert await read_body(response) == b"ok"
    assert upstream.calls == 2


@pytest.mark.parametrize("status", [500, 502, 503, 504, 409, 429])
async def test_retryable_answers_are_not_stored(status: int) -> None:
    h = Harness(**REPLAY)
    upstream = fake_upstream(status, 200)
    assert (await h.send(upstream)).status == status
    second = await h.send(upstream)
    assert second.status == 200
    assert REPLAYED_HEADER not in second.headers
    assert upstream.calls == 2


@pytest.mark.parametrize("status", [200, 201, 202, 204])
async def test_success_is_stored_by_default(status: int) -> None:
    h = Harness(**REPLAY)
    upstream = fake_upstream(status, 500)
    await h.send(upstream)
    second = await h.send(upstream)
    assert (second.status, second.headers.get(REPLAYED_HEADER)) == (status, "true")
    assert upstream.calls == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404, 408, 422])
async def test_client_errors_are_not_stored_by_default(status: int) -> None:
    """A 401 (expired token) or 403 replayed for the whole ttl would outlive its cause."""
    h = Harness(**REPLAY)
    upstream = fake_upstream(status, 200)
    assert (await h.send(upstream)).status == status
    second = await h.send(upstream)
    assert (second.status, REPLAYED_HEADER in second.headers) == (200, False)
    assert upstream.calls == 2


@pytest.mark.parametrize(
    ("status", "stored"), [(201, True), (404, True), (402, True), (403, False), (500, False)]
)
async def test_replay_statuses_choose_what_is_stored(status: int, stored: bool) -> None:
    h = Harness(replay={**REPLAY["replay"], "statuses": ["2xx", 404, "400-402"]})
    upstream = fake_upstream(status, 299)
    await h.send(upstream)
    second = await h.send(upstream)
    assert (second.status, REPLAYED_HEADER in second.headers) == ((status, True) if stored else (299, False))


@pytest.mark.parametrize("declared", [True, False])
async def test_large_response_is_passed_through_whole_and_not_stored(declared: bool) -> None:
    h = Harness(**REPLAY)  # max_body_bytes 1 KiB
    big = bytes(range(256)) * 16  # 4 KiB
    headers = {"Content-Length": str(len(big))} if declared else {}
    upstream = fake_upstream(lambda: make_response(200, headers, big, chunk_size=300))
    first = await h.send(upstream)
    assert await read_body(first) == big
    second = await h.send(upstream)
    assert REPLAYED_HEADER not in second.headers
    assert await read_body(second) == big
    assert upstream.calls == 2
    assert h.cache is not None
    assert len(h.cache) == 0


async def test_request_body_above_max_body_bytes_bypasses_the_cache() -> None:
    h = Harness(**REPLAY)
    upstream = fake_upstream(200)
    big = b"y" * 2048
    await h.send(upstream, body=big, known_length=False, chunk_size=500)
    await h.send(upstream, body=big, known_length=False, chunk_size=500)
    assert upstream.calls == 2
    assert [a.body for a in upstream.attempts] == [big, big]


async def test_entries_expire_after_ttl() -> None:
    h = Harness(replay={"ttl": "10m", "max_entries": 10, "max_body_bytes": "1KiB"})
    upstream = fake_upstream(200)
    await h.send(upstream)
    h.clock.advance(599)
    assert (await h.send(upstream)).headers.get(REPLAYED_HEADER) == "true"
    assert upstream.calls == 1
    h.clock.advance(2)
    response = await h.send(upstream)
    assert REPLAYED_HEADER not in response.headers
    assert upstream.calls == 2


async def test_max_entries_bounds_the_cache() -> None:
    h = Harness(replay={"ttl": "1h", "max_entries": 2, "max_body_bytes": "1KiB"})
    assert h.cache is not None
    upstream = fake_upstream(200)
    for key in ("a", "b", "c"):
        await h.send(upstream, key=key)
        assert len(h.cache) <= 2
    assert upstream.calls == 3
    await h.send(upstream, key="a")  # the oldest was evicted: it goes upstream again
    assert upstream.calls == 4
    assert len(h.cache) == 2


async def test_without_replay_repeats_go_upstream() -> None:
    h = Harness()
    upstream = fake_upstream(200)
    await h.send(upstream)
    response = await h.send(upstream)
    assert REPLAYED_HEADER not in response.headers
    assert upstream.calls == 2


async def test_injected_keys_are_never_replayed() -> None:
    h = Harness(**REPLAY)
    upstream = fake_upstream(200)
    await h.send(upstream, key=None)
    response = await h.send(upstream, key=None)
    assert REPLAYED_HEADER not in response.headers
    assert upstream.calls == 2


async def test_max_total_bytes_bounds_the_cache_memory() -> None:
    h = Harness(replay={"ttl": "1h", "max_entries": 100, "max_body_bytes": "1KiB", "max_total_bytes": "2KiB"})
    assert h.cache is not None
    upstream = fake_upstream(*[(200, {}, b"x" * 1000) for _ in range(5)])
    for key in ("a", "b", "c", "d", "e"):
        await h.send(upstream, key=key)
        assert len(h.cache) <= 2, "1000-byte bodies: at most two fit in 2 KiB"
    assert upstream.calls == 5
    assert (await h.send(upstream, key="e")).headers.get(REPLAYED_HEADER) == "true", "the newest stays"


# --------------------------------------------------------------------------- bodies released on failure


class BreakingBody:
    """A response body whose stream breaks off after its first chunk (like an upstream reset)."""

    def __init__(self, first: bytes = b"partial") -> None:
        self.first = first
        self.released = False

    async def chunks(self) -> AsyncIterator[bytes]:
        yield self.first
        raise errors.ConnectionReset("the upstream broke off the response body")

    def whole(self) -> bytes | None:
        return None

    def release(self) -> None:
        self.released = True


async def test_buffered_releases_the_body_when_reading_it_fails() -> None:
    body = BreakingBody()
    response = ProxyResponse(200, CIMultiDict({"Content-Length": "100"}), body)
    with pytest.raises(errors.ConnectionReset):
        await exchange.buffered(response, 1024)
    assert body.released


async def test_replay_capture_releases_the_body_when_reading_it_fails() -> None:
    settings = settings_from(idempotency={"replay": {"ttl": "1m"}})
    assert settings.idempotency is not None
    assert settings.idempotency.replay is not None
    layer = IdempotencyLayer(settings.idempotency, ReplayCache(settings.idempotency.replay, FakeClock()))
    body = BreakingBody()
    upstream_next = fake_upstream(ProxyResponse(201, CIMultiDict(), body))
    request = make_request("POST", headers={"Idempotency-Key": "k-1"}, body=b"a=1", settings=settings)
    with pytest.raises(errors.ConnectionReset):
        await layer(request, upstream_next)
    assert body.released, "a failed capture must still give the upstream connection back"


# ------------------------------------------------------------------- in-flight entries are never evicted


async def test_a_pending_request_is_never_evicted_so_duplicates_wait() -> None:
    """Stored entries may be evicted under memory pressure; the in-flight marker may not."""
    settings = settings_from(
        idempotency={"replay": {"max_entries": 100, "max_body_bytes": "100B", "max_total_bytes": "100B"}}
    )
    assert settings.idempotency is not None
    assert settings.idempotency.replay is not None
    cache = ReplayCache(settings.idempotency.replay, FakeClock())
    layer = IdempotencyLayer(settings.idempotency, cache)
    gate = asyncio.Event()
    slow = fake_upstream(200, gate=gate)

    def send(key: str, upstream: object) -> asyncio.Task[ProxyResponse]:
        request = make_request("POST", "/v1/x", {"Idempotency-Key": key}, b"a=1", settings=settings)
        return asyncio.ensure_future(layer(request, upstream))  # type: ignore[arg-type]

    first = send("held", slow)
    await asyncio.sleep(0.01)
    filler = fake_upstream(*[(200, {}, b"x" * 40) for _ in range(3)])
    for key in ("f1", "f2", "f3"):  # each stored response pushes older entries out
        await send(key, filler)
    duplicate = send("held", slow)
    await asyncio.sleep(0.01)
    gate.set()
    await asyncio.gather(first, duplicate)
    assert slow.calls == 1, "the concurrent duplicate waited for the first instead of calling again"
