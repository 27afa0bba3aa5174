"""Retries end to end: a real Outrigger in front of real upstreams that fail on purpose."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator

import aiohttp
import requests

from tests.conftest import StartProxy, free_port, loopback_policy, start_on_own_port
from tests.e2e.upstreams import CountingUpstream, hang_up_after
from tests.fakes import CALL_TIMEOUT, AiohttpServerFactory, ScriptedUpstream, app_get, call

HOST = "upstream.test"
FAST_BACKOFF = {"base": "10ms", "max": "10ms"}


async def test_503_503_200_get_is_retried_to_success(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(503, 503, (200, {"X-From": "upstream"}, b"hello")).start(aiohttp_server)
    base = await start_on_own_port(start_proxy, upstream.url, retries={"on": [503], "backoff": FAST_BACKOFF})
    reply = await call("GET", f"{base}/v1/things?id=1")
    assert reply.status == 200
    assert reply.body == b"hello"
    assert reply.headers["X-From"] == "upstream"
    assert reply.headers["x-outrigger-attempts"] == "3"
    assert upstream.count == 3
    assert {seen.path_qs for seen in upstream.seen} == {"/v1/things?id=1"}


async def test_requests_post_without_key_is_sent_exactly_once(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    unavailable = (503, {"X-Upstream-Trace": "t-42", "Content-Type": "application/json"}, b'{"down": true}')
    upstream = await ScriptedUpstream(unavailable).start(aiohttp_server)
    base = await start_on_own_port(
        start_proxy,
        upstream.url,
        retries={"on": ["connect-failure", "reset", "timeout", "5xx", "429"], "backoff": FAST_BACKOFF},
    )

    def post() -> requests.Response:
        with requests.Session() as session:
            session.trust_env = False
            return session.post(f"{base}/v1/charges", data={"amount": "100"}, timeout=10)

    response = await asyncio.to_thread(post)
    assert response.status_code == 503
    assert response.content == b'{"down": true}'
    assert response.headers["X-Upstream-Trace"] == "t-42"
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["x-outrigger-attempts"] == "1"
    assert upstream.count == 1
    assert upstream.seen[0].body == b"amount=100"
    assert "Idempotency-Key" not in upstream.seen[0].headers


async def test_connection_reset_then_200_is_retried(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    # A keyed POST, so the retry comes from Outrigger's "reset" condition and its idempotency key.
    upstream = await ScriptedUpstream("reset", (200, {}, b"second time lucky")).start(aiohttp_server)
    base = await start_on_own_port(
        start_proxy, upstream.url, retries={"on": ["reset"], "backoff": FAST_BACKOFF}
    )
    reply = await call("POST", f"{base}/v1/charges", data=b"amount=1", headers={"Idempotency-Key": "reset-1"})
    assert reply.status == 200
    assert reply.body == b"second time lucky"
    assert reply.headers["x-outrigger-attempts"] == "2"
    assert upstream.count == 2
    assert upstream.keys() == ["reset-1", "reset-1"]
    assert [seen.body for seen in upstream.seen] == [b"amount=1"] * 2


async def test_reset_get_upstream_sees_exactly_the_counted_attempts(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream("reset", 200).start(aiohttp_server)
    base = await start_on_own_port(
        start_proxy, upstream.url, retries={"on": ["reset"], "backoff": FAST_BACKOFF}
    )
    reply = await call("GET", f"{base}/v1/things")
    assert reply.status == 200
    assert upstream.count == int(reply.headers["x-outrigger-attempts"]) == 2


async def test_reset_not_in_on_is_answered_502(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream("reset", 200).start(aiohttp_server)
    base = await start_on_own_port(
        start_proxy, upstream.url, retries={"on": ["5xx"], "backoff": FAST_BACKOFF}
    )
    reply = await call("GET", f"{base}/v1/things")
    assert reply.status == 502
    assert reply.json()["error"]["type"] == "upstream_unreachable"
    assert upstream.count == 1


async def test_connect_failure_exhausts_attempts_then_502(start_proxy: StartProxy) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    retries = {"on": ["connect-failure"], "max_attempts": 3, "backoff": FAST_BACKOFF}
    base = await start_on_own_port(start_proxy, closed, retries=retries)
    reply = await call("GET", f"{base}/v1/things")
    assert reply.status == 502
    assert reply.headers["x-outrigger-error"] == "upstream_unreachable"
    assert reply.headers["x-outrigger-attempts"] == "3"


async def test_retry_after_one_second_is_waited_for(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream((503, {"Retry-After": "1"}, b"later"), 200).start(aiohttp_server)
    # The computed backoff is at most 10 ms, so a gap of >= 1 s can only come from Retry-After.
    base = await start_on_own_port(start_proxy, upstream.url, retries={"on": [503], "backoff": FAST_BACKOFF})
    reply = await call("GET", f"{base}/v1/things")
    assert reply.status == 200
    assert reply.headers["x-outrigger-attempts"] == "2"
    assert upstream.count == 2
    gap = upstream.seen[1].at - upstream.seen[0].at
    assert 1.0 <= gap < 3.0, f"retry came {gap:.3f}s after the first attempt"


async def test_retry_after_above_max_is_passed_through_without_retry(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    for status in (429, 503):
        upstream = await ScriptedUpstream((status, {"Retry-After": "30"}, b"go away"), 200).start(
            aiohttp_server
        )
        base = await start_on_own_port(
            start_proxy,
            upstream.url,
            retries={"on": [429, 503], "backoff": FAST_BACKOFF, "retry_after": {"max": "2s"}},
        )
        started = time.monotonic()
        reply = await call("GET", f"{base}/v1/things")
        assert reply.status == status
        assert reply.headers["Retry-After"] == "30"
        assert reply.body == b"go away"
        assert reply.headers["x-outrigger-attempts"] == "1"
        assert time.monotonic() - started < 1.5
        assert upstream.count == 1


async def test_no_retry_past_the_total_deadline(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream((503, {"Retry-After": "2"}, b"busy"), 200).start(aiohttp_server)
    base = await start_on_own_port(
        start_proxy,
        upstream.url,
        timeouts={"connect": "500ms", "per_try": "1s", "total": "1s"},
        retries={"on": [503], "backoff": FAST_BACKOFF, "retry_after": {"max": "60s"}},
    )
    started = time.monotonic()
    reply = await call("GET", f"{base}/v1/things")
    assert reply.status == 503
    assert reply.body == b"busy"
    assert reply.headers["x-outrigger-attempts"] == "1"
    elapsed = time.monotonic() - started
    assert elapsed < 0.9, f"Outrigger waited {elapsed:.2f}s for a retry it could not make in time"
    await asyncio.sleep(0.3)
    assert upstream.count == 1


async def test_per_try_timeouts_stop_at_the_total_deadline(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(200, delay=2.0).start(aiohttp_server)
    base = await start_on_own_port(
        start_proxy,
        upstream.url,
        timeouts={"connect": "200ms", "per_try": "300ms", "total": "800ms"},
        retries={"on": ["timeout"], "max_attempts": 10, "backoff": FAST_BACKOFF, "budget": None},
    )
    started = time.monotonic()
    reply = await call("GET", f"{base}/v1/slow")
    assert reply.status == 504
    assert reply.headers["x-outrigger-error"] == "timeout"
    elapsed = time.monotonic() - started
    assert 0.7 <= elapsed < 1.5
    assert 2 <= upstream.count <= 3, "about total / per_try attempts, never max_attempts"


async def test_every_attempt_carries_the_full_body(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(503, 503, 200).start(aiohttp_server)
    base = await start_on_own_port(start_proxy, upstream.url, retries={"on": [503], "backoff": FAST_BACKOFF})
    payload = bytes(range(256)) * 400  # 100 KiB

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 8192):
            yield payload[start : start + 8192]

    reply = await call("PUT", f"{base}/v1/files/1", data=chunked())
    assert reply.status == 200
    assert reply.headers["x-outrigger-attempts"] == "3"
    assert [seen.body == payload for seen in upstream.seen] == [True, True, True]


async def test_body_above_max_replay_bytes_is_sent_once_and_whole(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    payload = hashlib.sha256(b"seed").digest() * (2 * 1024 * 1024 // 32)  # 2 MiB
    upstream = await ScriptedUpstream(503).start(aiohttp_server)
    base = await start_on_own_port(
        start_proxy,
        upstream.url,
        retries={"on": [503, "reset"], "backoff": FAST_BACKOFF, "max_replay_bytes": "1MiB"},
    )

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 64 * 1024):
            yield payload[start : start + 64 * 1024]

    known_length = await call("PUT", f"{base}/v1/files/1", data=payload)
    chunked_reply = await call("PUT", f"{base}/v1/files/2", data=chunked())
    for reply in (known_length, chunked_reply):
        assert reply.status == 503
        assert reply.headers["x-outrigger-attempts"] == "1"
    assert upstream.count == 2
    for seen in upstream.seen:
        assert len(seen.body) == len(payload)
        assert hashlib.sha256(seen.body).digest() == hashlib.sha256(payload).digest()


async def test_budget_bounds_retries_under_a_failing_upstream(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(503).start(aiohttp_server)
    ratio, min_per_second, window = 0.2, 1, 10
    base = await start_on_own_port(
        start_proxy,
        upstream.url,
        retries={
            "on": [503],
            "max_attempts": 3,
            "backoff": {"base": "1ms", "max": "1ms"},
            "budget": {"ratio": ratio, "min_per_second": min_per_second, "window": f"{window}s"},
        },
    )
    requests_sent = 200
    attempts_seen_by_client = 0
    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=CALL_TIMEOUT) as client:
        for _ in range(requests_sent):
            async with client.get(f"{base}/v1/things") as resp:
                assert resp.status == 503
                await resp.read()
                attempts_seen_by_client += int(resp.headers["x-outrigger-attempts"])
    elapsed = time.monotonic() - started
    assert elapsed < window, "the whole run must fit in one budget window for this bound"
    retries = upstream.count - requests_sent
    measured = upstream.count / requests_sent
    print(f"budget e2e: {upstream.count} upstream attempts for {requests_sent} requests = {measured:.3f}")
    assert upstream.count == attempts_seen_by_client
    # attempts / requests <= 1 + ratio + min_per_second * window / requests (here 1.25)
    assert retries <= ratio * requests_sent + min_per_second * window + 1e-9
    assert retries > ratio * requests_sent / 2, "the budget should still allow retries, not refuse them all"


# --------------------------------------------------------------------------- an app that hangs up


async def test_app_that_hangs_up_stops_its_retries_and_frees_its_slot(
    counting_upstream: CountingUpstream, start_proxy: StartProxy
) -> None:
    counting_upstream.delay = 0.15  # each attempt is still in flight when the app hangs up at 0.1 s
    proxy = await start_proxy(
        [
            loopback_policy(
                counting_upstream.url,
                retries={"max_attempts": 5, "on": [503], "backoff": {"base": "200ms", "max": "200ms"}},
                concurrency={"max_in_flight": 1, "max_queued": 0},
            )
        ]
    )
    await hang_up_after(proxy.port, f"GET /slow HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode(), 0.1)
    await asyncio.sleep(0.2)

    status, headers, body = await app_get(proxy, "/probe")
    assert status == 200, f"the departed app's handler still holds the only slot: {status} {body!r}"
    assert headers.get("x-outrigger-error") is None

    await asyncio.sleep(1.0)  # long enough for an orphaned handler to reach attempt 3 or more
    assert counting_upstream.hits.get("/slow", 0) <= 2, counting_upstream.hits
