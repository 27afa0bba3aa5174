"""The response cache end to end: real aiohttp upstreams on 127.0.0.1 that count what reaches them.

Proves on real sockets that a GET is served from the cache for its max-age (and then fetched
again), that ``no-store`` responses and POSTs never are, that two ``Authorization`` values never
share an entry, that an open breaker is answered from the stale entry with
``x-outrigger-stale: true``, that an ETag revalidation turns a 304 into the stored body, that 100
concurrent misses make one upstream call, that 10 000 distinct URLs stay within ``max_bytes``, and
that 5 MiB responses stream through a cached policy of a real ``outrigger run`` process in bounded
memory.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
import yaml
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from tests.conftest import AccessLog, Launch, RunningProxy, StartProxy, loopback_policy, write_config
from tests.e2e.stream_upstream import build_app as stream_app
from tests.e2e.test_streaming import RssSampler
from tests.fakes import admin_state, app_request, call

HOST = "upstream.test"
MiB = 1024 * 1024


@dataclass
class CachingUpstream:
    """Answers by path and counts every request per path; `failing` switches it to 503s."""

    hits: Counter[str] = field(default_factory=Counter)
    conditionals: list[str | None] = field(default_factory=list)
    failing: bool = False
    delay: float = 0.0
    server: Any = None

    async def start(self, aiohttp_server: AiohttpServer) -> CachingUpstream:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.server = await aiohttp_server(app)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    async def handle(self, request: web.Request) -> web.Response:
        path = request.path
        self.hits[path] += 1
        count = self.hits[path]
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.failing:
            return web.Response(status=503, text="upstream down")
        if path.startswith("/max-age/"):
            age = path.rsplit("/", 1)[1]
            return web.Response(text=f"{path} #{count}", headers={"Cache-Control": f"max-age={age}"})
        if path == "/no-store":
            return web.Response(text=f"secret #{count}", headers={"Cache-Control": "no-store"})
        if path == "/whoami":
            who = request.headers.get("Authorization", "nobody")
            return web.Response(text=f"{who} #{count}", headers={"Cache-Control": "max-age=60"})
        if path == "/etag":
            self.conditionals.append(request.headers.get("If-None-Match"))
            headers = {"ETag": '"v1"', "Cache-Control": "max-age=1"}
            if request.headers.get("If-None-Match") == '"v1"':
                return web.Response(status=304, headers=headers)
            return web.Response(text=f"tagged #{count}", headers=headers)
        if path.startswith("/many/"):
            return web.Response(body=b"m" * 1024, headers={"Cache-Control": "max-age=600"})
        return web.Response(text=f"plain #{count}")


@pytest.fixture
async def upstream(aiohttp_server: AiohttpServer) -> CachingUpstream:
    return await CachingUpstream().start(aiohttp_server)


async def cached_proxy(start_proxy: StartProxy, upstream: CachingUpstream, **policy: Any) -> RunningProxy:
    policy.setdefault("cache", {})
    return await start_proxy([loopback_policy(upstream.url, **policy)])


async def metrics(proxy: RunningProxy) -> str:
    return (await call("GET", f"http://127.0.0.1:{proxy.admin_port}/metrics")).body.decode()


def cache_count(text: str, result: str) -> float:
    match = re.search(rf'^outrigger_cache_total{{host="{HOST}",result="{result}"}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


async def test_a_get_is_served_from_the_cache_for_its_max_age(
    start_proxy: StartProxy, upstream: CachingUpstream
) -> None:
    proxy = await cached_proxy(start_proxy, upstream)
    first = await app_request(proxy, path="/max-age/1")
    assert (first.status, first.body, first.headers["x-outrigger-cache"]) == (200, b"/max-age/1 #1", "miss")
    second = await app_request(proxy, path="/max-age/1")
    assert (second.body, second.headers["x-outrigger-cache"]) == (b"/max-age/1 #1", "hit")
    assert second.headers["Age"] == "0"
    assert second.headers["x-outrigger-attempts"] == "0"
    assert upstream.hits["/max-age/1"] == 1
    await asyncio.sleep(1.1)
    third = await app_request(proxy, path="/max-age/1")
    assert (third.body, third.headers["x-outrigger-cache"]) == (b"/max-age/1 #2", "miss")
    text = await metrics(proxy)
    assert (cache_count(text, "hit"), cache_count(text, "miss")) == (1, 2)


async def test_no_store_responses_are_never_cached(
    start_proxy: StartProxy, upstream: CachingUpstream
) -> None:
    proxy = await cached_proxy(start_proxy, upstream)
    bodies = [(await app_request(proxy, path="/no-store")).body for _ in range(3)]
    assert bodies == [b"secret #1", b"secret #2", b"secret #3"]
    assert upstream.hits["/no-store"] == 3


async def test_a_post_is_never_cached(start_proxy: StartProxy, upstream: CachingUpstream) -> None:
    proxy = await cached_proxy(start_proxy, upstream)
    for expected in (b"/max-age/60 #1", b"/max-age/60 #2"):
        reply = await app_request(proxy, "POST", path="/max-age/60", data=b"amount=1")
        assert (reply.body, reply.headers["x-outrigger-cache"]) == (expected, "bypass")
    reply = await app_request(proxy, path="/max-age/60")  # nor does a GET get the POST's answer
    assert (reply.body, reply.headers["x-outrigger-cache"]) == (b"/max-age/60 #3", "miss")


async def test_two_authorization_values_never_share_an_entry(
    start_proxy: StartProxy, upstream: CachingUpstream
) -> None:
    proxy = await cached_proxy(start_proxy, upstream)
    alice = await app_request(proxy, path="/whoami", headers={"Authorization": "Bearer alice"})
    bob = await app_request(proxy, path="/whoami", headers={"Authorization": "Bearer bob"})
    again = await app_request(proxy, path="/whoami", headers={"Authorization": "Bearer alice"})
    assert (alice.body, bob.body) == (b"Bearer alice #1", b"Bearer bob #2")
    assert (again.body, again.headers["x-outrigger-cache"]) == (b"Bearer alice #1", "hit")
    assert upstream.hits["/whoami"] == 2


async def test_an_open_breaker_is_answered_from_the_stale_entry(
    start_proxy: StartProxy, upstream: CachingUpstream, access_log: AccessLog
) -> None:
    proxy = await cached_proxy(
        start_proxy,
        upstream,
        cache={"stale_if_error": "10m"},
        circuit_breaker={"failure_threshold": 2, "reset_timeout": "30s"},
    )
    assert (await app_request(proxy, path="/max-age/1")).body == b"/max-age/1 #1"
    await asyncio.sleep(1.1)
    upstream.failing = True
    for _ in range(2):  # the upstream's 503s (breaker failures) are answered stale, and open the breaker
        reply = await app_request(proxy, path="/max-age/1")
        assert (reply.status, reply.body, reply.headers["x-outrigger-stale"]) == (
            200,
            b"/max-age/1 #1",
            "true",
        )
    assert (await admin_state(proxy))[HOST]["circuit_breaker"]["state"] == "open"
    seen = upstream.hits["/max-age/1"]
    reply = await app_request(proxy, path="/max-age/1")
    assert (reply.status, reply.body) == (200, b"/max-age/1 #1")
    assert reply.headers["x-outrigger-stale"] == "true"
    assert reply.headers["x-outrigger-cache"] == "stale"
    assert upstream.hits["/max-age/1"] == seen  # the breaker answered: no upstream call
    uncached = await app_request(proxy, path="/never-fetched")  # nothing stale to answer with
    assert (uncached.status, uncached.headers["x-outrigger-error"]) == (503, "circuit_open")
    assert uncached.headers["x-outrigger-cache"] == "miss"
    masked = [e.get("cache_masked_error") for e in access_log.entries if e["path"] == "/max-age/1"]
    assert masked == [None, "503", "503", "circuit_open"]
    assert cache_count(await metrics(proxy), "stale") == 3


async def test_a_stale_entry_is_revalidated_with_its_etag(
    start_proxy: StartProxy, upstream: CachingUpstream
) -> None:
    proxy = await cached_proxy(start_proxy, upstream)
    assert (await app_request(proxy, path="/etag")).body == b"tagged #1"
    await asyncio.sleep(1.1)
    reply = await app_request(proxy, path="/etag")
    assert (reply.status, reply.body, reply.headers["x-outrigger-cache"]) == (
        200,
        b"tagged #1",
        "revalidated",
    )
    assert upstream.conditionals == [None, '"v1"']
    reply = await app_request(proxy, path="/etag")  # the 304 made it fresh again
    assert reply.headers["x-outrigger-cache"] == "hit"
    assert upstream.hits["/etag"] == 2


async def test_100_concurrent_misses_make_one_upstream_call(
    start_proxy: StartProxy, upstream: CachingUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await cached_proxy(start_proxy, upstream)
    upstream.delay = 0.5

    async def get() -> tuple[int, bytes, str]:
        async with client.get(f"{proxy.url}/max-age/60", headers={"Host": HOST}) as response:
            return response.status, await response.read(), response.headers["x-outrigger-cache"]

    replies = await asyncio.gather(*(get() for _ in range(100)))
    assert upstream.hits["/max-age/60"] == 1
    assert {(status, body) for status, body, _ in replies} == {(200, b"/max-age/60 #1")}
    assert Counter(result for *_, result in replies)["miss"] == 1


@pytest.mark.parametrize(("cache", "kept"), [({}, True), ({"ttl": "2m"}, False)])
async def test_a_reload_keeps_the_entries_only_when_the_cache_section_is_unchanged(
    start_proxy: StartProxy, upstream: CachingUpstream, cache: dict[str, Any], kept: bool
) -> None:
    proxy = await cached_proxy(start_proxy, upstream)
    assert (await app_request(proxy, path="/max-age/60")).headers["x-outrigger-cache"] == "miss"
    policies = proxy.config.path.parent / "policies" / "test.yaml"
    edited = loopback_policy(upstream.url, cache=cache, timeouts={"total": "20s"})
    policies.write_text(yaml.safe_dump([edited]))
    reply = await call("POST", f"http://127.0.0.1:{proxy.admin_port}/reload")
    assert (reply.status, reply.json()["ok"]) == (200, True), reply
    after = await app_request(proxy, path="/max-age/60")
    assert after.headers["x-outrigger-cache"] == ("hit" if kept else "miss")
    assert upstream.hits["/max-age/60"] == (1 if kept else 2)


@pytest.mark.timeout(180)
async def test_10000_distinct_urls_stay_within_max_bytes(
    start_proxy: StartProxy, upstream: CachingUpstream, client: aiohttp.ClientSession
) -> None:
    limit = 1 * MiB
    proxy = await cached_proxy(
        start_proxy, upstream, cache={"max_bytes": limit, "max_entry_bytes": "64KiB", "max_entries": 100_000}
    )
    state_peak = 0

    async def get(i: int) -> None:
        async with client.get(f"{proxy.url}/many/{i}", headers={"Host": HOST}) as response:
            assert response.status == 200
            assert len(await response.read()) == 1024

    for start in range(0, 10_000, 100):
        await asyncio.gather(*(get(i) for i in range(start, start + 100)))
        if start % 2000 == 0:
            state_peak = max(state_peak, (await admin_state(proxy))[HOST]["cache"]["bytes"])
    cache = (await admin_state(proxy))[HOST]["cache"]
    assert 0 < max(state_peak, cache["bytes"]) <= limit, cache
    assert 100 < cache["entries"] < 1024, cache  # ~1 KiB bodies: at most a thousand fit
    assert upstream.hits["/many/0"] == 1
    recent = await app_request(proxy, path="/many/9999")
    assert recent.headers["x-outrigger-cache"] == "hit"
    evicted = await app_request(proxy, path="/many/0")
    assert evicted.headers["x-outrigger-cache"] == "miss"


@pytest.mark.timeout(120)
async def test_5_mib_responses_stream_through_a_cached_policy_in_bounded_memory(
    tmp_path: Path, launch: Launch, aiohttp_server: AiohttpServer
) -> None:
    """Eight 5 MiB responses at once, each read slowly: buffered whole they would add 40 MiB or more."""
    source = await aiohttp_server(stream_app())
    policy = loopback_policy(
        f"http://127.0.0.1:{source.port}",
        host="stream.test",
        cache={"max_bytes": "64MiB", "max_entry_bytes": "1MiB"},
        timeouts={"per_try": "30s", "total": "60s"},
    )
    config = write_config(tmp_path, [policy])
    process = launch(config)
    await process.wait_ready(within=20)
    proxy_url = f"http://127.0.0.1:{_listen_port(config)}"
    outrigger = psutil.Process(process.pid)
    size = 5 * MiB

    async def download(session: aiohttp.ClientSession, query: str, slow: bool) -> tuple[int, str]:
        url = f"{proxy_url}/download?size={size}&{query}"
        async with session.get(url, headers={"Host": "stream.test"}) as response:
            assert response.status == 200
            received = 0
            async for chunk in response.content.iter_chunked(64 * 1024):
                received += len(chunk)
                if slow:
                    await asyncio.sleep(0.01)  # a slow app: the proxy must not read ahead into memory
            return received, response.headers["x-outrigger-cache"]

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for _ in range(2):  # warm up: first-use allocations belong in the baseline
            await download(session, "warm", slow=False)
        await asyncio.sleep(0.2)
        baseline = outrigger.memory_info().rss
        with RssSampler(outrigger) as rss:
            results = await asyncio.gather(
                *(download(session, f"n={i}{'&chunked' if i % 2 else ''}", slow=True) for i in range(8))
            )
        again = await download(session, "n=0", slow=False)
    rise = rss.peak - baseline
    print(f"5 MiB x 8 through a cached policy: baseline {baseline / MiB:.1f} MiB, peak +{rise / MiB:.1f} MiB")
    assert results == [(size, "miss")] * 8
    assert again == (size, "miss")  # too large to store: fetched again
    assert rss.samples > 10
    assert rise < 32 * MiB, f"RSS rose {rise / MiB:.1f} MiB"


def _listen_port(config: Path) -> int:
    port: int = yaml.safe_load(config.read_text())["listen"]["port"]
    return port


@pytest.mark.parametrize("content_type", ["text/event-stream", "application/json"])
async def test_a_stream_without_a_length_flows_through_a_cached_policy_as_it_comes(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy, content_type: str
) -> None:
    """The cache reads ahead only bodies with a Content-Length that fits: an SSE stream (or any
    chunked answer) must reach the app as it is sent, not when it ends."""
    loop = asyncio.get_running_loop()

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "max-age=60"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        await asyncio.sleep(1.5)
        await response.write(b"data: last\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/stream", events)
    server = await aiohttp_server(app)
    proxy = await start_proxy([loopback_policy(f"http://127.0.0.1:{server.port}", cache={})])
    started = loop.time()
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client,
        client.get(f"{proxy.url}/stream", headers={"Host": "upstream.test"}) as response,
    ):
        first = await response.content.readuntil(b"\n\n")
        first_at = loop.time() - started
        rest = await response.read()
    assert (first, rest) == (b"data: first\n\n", b"data: last\n\n")
    assert first_at < 1.0, f"the first event waited {first_at:.2f}s for the stream's end"
