"""Idempotency keys and the replay cache end to end, with real upstreams counting what they receive."""

from __future__ import annotations

import asyncio
import json
import uuid

import aiohttp

from tests.conftest import StartProxy, start_on_own_port
from tests.fakes import CALL_TIMEOUT, AiohttpServerFactory, ScriptedUpstream, call

FAST_BACKOFF = {"base": "10ms", "max": "10ms"}
CREATED = (201, {"Content-Type": "application/json", "Request-Id": "req_1"}, b'{"id": "ch_1", "amount": 100}')


async def test_injected_key_is_the_same_on_every_attempt(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(503, 503, CREATED).start(aiohttp_server)
    base = await start_on_own_port(
        start_proxy, upstream.url, idempotency={}, retries={"on": [503], "backoff": FAST_BACKOFF}
    )
    reply = await call("POST", f"{base}/v1/charges", data=b"amount=100")
    assert reply.status == 201
    assert reply.headers["x-outrigger-attempts"] == "3"
    keys = upstream.keys()
    assert len(keys) == 3
    assert len(set(keys)) == 1
    assert keys[0] is not None
    assert uuid.UUID(keys[0]).version == 4
    assert [seen.body for seen in upstream.seen] == [b"amount=100"] * 3


async def test_custom_header_name_is_injected_and_makes_post_retryable(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(503, CREATED).start(aiohttp_server)
    base = await start_on_own_port(
        start_proxy,
        upstream.url,
        idempotency={"header": "X-Request-Key"},
        retries={"on": [503], "backoff": FAST_BACKOFF},
    )
    reply = await call("POST", f"{base}/v1/charges", data=b"amount=100")
    assert reply.status == 201
    assert reply.headers["x-outrigger-attempts"] == "2"
    keys = upstream.keys("X-Request-Key")
    assert keys[0] is not None
    assert keys == [keys[0]] * 2
    assert upstream.keys() == [None, None], "the default header is not added when another is configured"


async def test_app_key_is_kept_as_sent(aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy) -> None:
    upstream = await ScriptedUpstream(503, CREATED).start(aiohttp_server)
    base = await start_on_own_port(
        start_proxy, upstream.url, idempotency={}, retries={"on": [503], "backoff": FAST_BACKOFF}
    )
    key = "Order 42/attempt+A=="
    reply = await call("POST", f"{base}/v1/charges", data=b"a=1", headers={"Idempotency-Key": key})
    assert reply.status == 201
    assert upstream.keys() == [key, key]


async def test_repeat_is_replayed_without_an_upstream_call(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(CREATED).start(aiohttp_server)
    base = await start_on_own_port(start_proxy, upstream.url, idempotency={"replay": {"ttl": "1h"}})
    headers = {"Idempotency-Key": "order-7"}
    async with aiohttp.ClientSession(timeout=CALL_TIMEOUT) as client:
        async with client.post(f"{base}/v1/charges", data=b"amount=100", headers=headers) as resp:
            assert resp.status == 201
            first_body = await resp.read()
            assert "x-outrigger-replayed" not in resp.headers
        assert upstream.count == 1
        async with client.post(f"{base}/v1/charges", data=b"amount=100", headers=headers) as resp:
            assert resp.status == 201
            assert resp.headers["x-outrigger-replayed"] == "true"
            assert resp.headers["Request-Id"] == "req_1"
            assert resp.headers["Content-Type"] == "application/json"
            assert await resp.read() == first_body == CREATED[2]
    assert upstream.count == 1


async def test_concurrent_duplicates_reach_the_upstream_once(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(CREATED, delay=0.3).start(aiohttp_server)
    base = await start_on_own_port(start_proxy, upstream.url, idempotency={"replay": {}})

    async def post(client: aiohttp.ClientSession) -> tuple[int, bytes, str | None]:
        async with client.post(
            f"{base}/v1/charges", data=b"amount=100", headers={"Idempotency-Key": "dup-1"}
        ) as resp:
            return resp.status, await resp.read(), resp.headers.get("x-outrigger-replayed")

    async with aiohttp.ClientSession(timeout=CALL_TIMEOUT) as client:
        results = await asyncio.wait_for(asyncio.gather(*(post(client) for _ in range(5))), timeout=10)
    assert upstream.count == 1
    assert [(status, body) for status, body, _ in results] == [(201, CREATED[2])] * 5
    assert sorted(str(replayed) for _, _, replayed in results) == ["None"] + ["true"] * 4


async def test_reused_key_with_another_body_is_422(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(CREATED).start(aiohttp_server)
    base = await start_on_own_port(start_proxy, upstream.url, idempotency={"replay": {}})
    headers = {"Idempotency-Key": "order-8"}
    async with aiohttp.ClientSession(timeout=CALL_TIMEOUT) as client:
        async with client.post(f"{base}/v1/charges", data=b"amount=100", headers=headers) as resp:
            assert resp.status == 201
        async with client.post(f"{base}/v1/charges", data=b"amount=999", headers=headers) as resp:
            assert resp.status == 422
            assert resp.headers["x-outrigger-error"] == "idempotency_key_reused"
            body = json.loads(await resp.read())
    assert body["error"]["type"] == "idempotency_key_reused"
    assert body["error"]["message"]
    assert upstream.count == 1


async def test_5xx_is_not_replayed(aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy) -> None:
    upstream = await ScriptedUpstream(503, CREATED).start(aiohttp_server)
    base = await start_on_own_port(start_proxy, upstream.url, idempotency={"replay": {}})
    headers = {"Idempotency-Key": "order-9"}
    async with aiohttp.ClientSession(timeout=CALL_TIMEOUT) as client:
        async with client.post(f"{base}/v1/charges", data=b"amount=100", headers=headers) as resp:
            assert resp.status == 503
        async with client.post(f"{base}/v1/charges", data=b"amount=100", headers=headers) as resp:
            assert resp.status == 201
            assert "x-outrigger-replayed" not in resp.headers
    assert upstream.count == 2


async def test_large_response_passes_through_and_is_not_stored(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    big = bytes(range(256)) * 8192  # 2 MiB
    upstream = await ScriptedUpstream((200, {}, big)).start(aiohttp_server)
    base = await start_on_own_port(
        start_proxy, upstream.url, idempotency={"replay": {"max_body_bytes": "1MiB"}}
    )
    headers = {"Idempotency-Key": "big-1"}
    async with aiohttp.ClientSession(timeout=CALL_TIMEOUT) as client:
        for _ in range(2):
            async with client.post(f"{base}/v1/exports", data=b"x", headers=headers) as resp:
                assert resp.status == 200
                assert "x-outrigger-replayed" not in resp.headers
                assert await resp.read() == big
    assert upstream.count == 2
