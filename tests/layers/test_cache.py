"""The response cache and stale-if-error (SPEC 9), on a fake clock and a fake upstream."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace

from proxy import errors
from proxy.clock import SYSTEM_CLOCK
from proxy.config.model import Policy, PolicySettings
from proxy.exchange import BytesBody, ProxyResponse
from proxy.layers.cache import CACHE_HEADER, STALE_HEADER, CacheLayer, ResponseCache, parse_cache_control
from proxy.pipeline import PolicyState, build_layers
from tests.fakes import (
    FakeClock,
    FakeUpstream,
    TrackedBody,
    fake_upstream,
    make_request,
    make_response,
    read_body,
    settings_from,
)

MAX_AGE_60 = {"Cache-Control": "max-age=60"}


class Harness:
    def __init__(self, cache: dict[str, Any] | None = None, **sections: Any) -> None:
        self.settings = settings_from(cache=cache or {}, **sections)
        assert self.settings.cache is not None
        self.clock = FakeClock()
        self.cache = ResponseCache(self.settings.cache, self.clock)
        self.layer = CacheLayer(self.cache, self.settings)

    async def send(
        self,
        upstream: FakeUpstream,
        method: str = "GET",
        path: str = "/v1/things",
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> tuple[ProxyResponse, bytes]:
        request = make_request(method, path, headers, body, settings=self.settings)
        response = await self.layer(request, upstream)
        data = await read_body(response)
        response.body.release()
        return response, data


def ok(body: bytes = b"fresh", /, **headers: str) -> tuple[int, dict[str, str], bytes]:
    """A 200 as upstreams send small answers: with its Content-Length (the cache reads ahead only
    bodies whose declared length fits)."""
    return (200, {"Content-Length": str(len(body)), **headers}, body)


# --- fresh hits ----------------------------------------------------------------------------------


async def test_fresh_hit_is_served_without_an_upstream_call_and_with_age() -> None:
    h = Harness({"ttl": "60s"})
    upstream = fake_upstream(ok(b"v1"), ok(b"v2"))
    first, body = await h.send(upstream)
    assert (first.headers[CACHE_HEADER], body) == ("miss", b"v1")
    h.clock.advance(5)
    second, body = await h.send(upstream)
    assert (second.headers[CACHE_HEADER], body, second.headers["Age"]) == ("hit", b"v1", "5")
    assert upstream.calls == 1


async def test_an_entry_expires_after_its_max_age_not_the_default_ttl() -> None:
    h = Harness({"ttl": "1h"})
    upstream = fake_upstream(ok(b"v1", **{"Cache-Control": "max-age=10"}), ok(b"v2"))
    await h.send(upstream)
    h.clock.advance(9)
    assert (await h.send(upstream))[1] == b"v1"
    h.clock.advance(2)
    response, body = await h.send(upstream)
    assert (response.headers[CACHE_HEADER], body, upstream.calls) == ("miss", b"v2", 2)


async def test_s_maxage_wins_over_max_age_and_upstream_age_counts() -> None:
    h = Harness()
    upstream = fake_upstream(ok(**{"Cache-Control": "max-age=1000, s-maxage=10", "Age": "8"}), ok(b"new"))
    await h.send(upstream)
    response, _ = await h.send(upstream)
    assert response.headers["Age"] == "8"
    h.clock.advance(3)  # 11 s old: past s-maxage
    assert (await h.send(upstream))[1] == b"new"


async def test_expires_gives_freshness_when_no_max_age() -> None:
    h = Harness({"ttl": "0s"})
    headers = {"Date": "Tue, 14 Nov 2023 22:13:20 GMT", "Expires": "Tue, 14 Nov 2023 22:13:50 GMT"}
    upstream = fake_upstream(ok(**headers), ok(b"new"))
    await h.send(upstream)
    h.clock.advance(29)
    assert (await h.send(upstream))[0].headers[CACHE_HEADER] == "hit"
    h.clock.advance(2)
    assert (await h.send(upstream))[1] == b"new"


# --- what is never stored ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Cache-Control": "no-store"},
        {"Cache-Control": "private, max-age=60"},
        {"Cache-Control": "max-age=60", "Set-Cookie": "session=abc"},
        {"Cache-Control": "max-age=60", "Vary": "*"},
    ],
)
async def test_responses_that_forbid_storing_are_never_stored(headers: dict[str, str]) -> None:
    h = Harness()
    upstream = fake_upstream(ok(**headers))
    for _ in range(3):
        response, _ = await h.send(upstream)
        assert response.headers[CACHE_HEADER] == "miss"
    assert upstream.calls == 3
    assert len(h.cache) == 0


async def test_no_store_is_not_stored_even_when_cache_control_is_not_honoured() -> None:
    h = Harness({"honour_cache_control": False})
    upstream = fake_upstream(ok(**{"Cache-Control": "no-store"}))
    await h.send(upstream)
    await h.send(upstream)
    assert upstream.calls == 2


async def test_without_honour_cache_control_max_age_is_ignored_and_ttl_applies() -> None:
    h = Harness({"honour_cache_control": False, "ttl": "100s"})
    upstream = fake_upstream(ok(**{"Cache-Control": "max-age=1"}))
    await h.send(upstream)
    h.clock.advance(50)
    assert (await h.send(upstream))[0].headers[CACHE_HEADER] == "hit"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_other_methods_bypass_and_are_never_stored(method: str) -> None:
    h = Harness()
    upstream = fake_upstream(ok(**MAX_AGE_60))
    for _ in range(2):
        response, _ = await h.send(upstream, method, body=b"x=1")
        assert response.headers[CACHE_HEADER] == "bypass"
    assert upstream.calls == 2
    assert len(h.cache) == 0
    response, _ = await h.send(upstream)  # a GET of the same path is not served the POST's answer
    assert response.headers[CACHE_HEADER] == "miss"


async def test_a_get_with_a_body_bypasses() -> None:
    h = Harness()
    upstream = fake_upstream(ok(**MAX_AGE_60))
    await h.send(upstream, body=b"query")
    response, _ = await h.send(upstream, body=b"query")
    assert response.headers[CACHE_HEADER] == "bypass"
    assert upstream.calls == 2


@pytest.mark.parametrize("value", ["no-cache", "no-store", "max-age=0, no-cache"])
async def test_the_apps_no_cache_skips_the_cache(value: str) -> None:
    h = Harness()
    upstream = fake_upstream(ok(b"v1", **MAX_AGE_60), ok(b"v2", **MAX_AGE_60))
    await h.send(upstream)
    response, body = await h.send(upstream, headers={"Cache-Control": value})
    assert (response.headers[CACHE_HEADER], body, upstream.calls) == ("bypass", b"v2", 2)
    assert (await h.send(upstream))[1] == b"v1"  # the stored entry is untouched


@pytest.mark.parametrize(
    ("status", "headers", "stored"),
    [
        (200, {}, True),
        (204, {}, True),
        (206, MAX_AGE_60, False),
        (301, {}, False),
        (301, MAX_AGE_60, True),
        (404, {}, False),
        (404, MAX_AGE_60, True),
        (410, MAX_AGE_60, True),
        (302, MAX_AGE_60, False),
        (400, MAX_AGE_60, False),
        (500, MAX_AGE_60, False),
        (503, MAX_AGE_60, False),
    ],
)
async def test_only_2xx_and_explicitly_fresh_301_404_410_are_stored(
    status: int, headers: dict[str, str], stored: bool
) -> None:
    h = Harness()
    upstream = fake_upstream((status, {"Content-Length": "0", **headers}, b""))
    await h.send(upstream)
    await h.send(upstream)
    assert upstream.calls == (1 if stored else 2)


async def test_ttl_zero_stores_only_what_cache_control_allows() -> None:
    h = Harness({"ttl": 0})
    plain = fake_upstream(ok())
    await h.send(plain, path="/plain")
    await h.send(plain, path="/plain")
    assert plain.calls == 2
    told = fake_upstream(ok(**MAX_AGE_60))
    await h.send(told, path="/told")
    await h.send(told, path="/told")
    assert told.calls == 1


# --- keys ----------------------------------------------------------------------------------------


async def test_two_credentials_never_share_an_entry_and_values_are_not_kept() -> None:
    h = Harness()  # key_headers: [Authorization]
    upstream = fake_upstream(ok(b"alice's", **MAX_AGE_60), ok(b"bob's", **MAX_AGE_60))
    _, alice = await h.send(upstream, headers={"Authorization": "Bearer sk_alice_secret"})
    _, bob = await h.send(upstream, headers={"Authorization": "Bearer sk_bob_secret"})
    assert (alice, bob, upstream.calls) == (b"alice's", b"bob's", 2)
    again, alice_again = await h.send(upstream, headers={"Authorization": "Bearer sk_alice_secret"})
    assert (again.headers[CACHE_HEADER], alice_again) == ("hit", b"alice's")
    kept = repr(list(h.cache._entries.items()))
    assert "sk_alice_secret" not in kept
    assert "sk_bob_secret" not in kept


async def test_any_key_header_separates_entries() -> None:
    h = Harness({"key_headers": ["X-Tenant"]})
    upstream = fake_upstream(ok(b"a", **MAX_AGE_60), ok(b"b", **MAX_AGE_60))
    assert (await h.send(upstream, headers={"X-Tenant": "a"}))[1] == b"a"
    assert (await h.send(upstream, headers={"X-Tenant": "b"}))[1] == b"b"
    assert (await h.send(upstream, headers={"X-Tenant": "a"}))[1] == b"a"


async def test_credentialed_request_without_authorization_in_the_key_is_stored_only_if_public() -> None:
    h = Harness({"key_headers": []})
    upstream = fake_upstream(ok(b"mine", **MAX_AGE_60))
    await h.send(upstream, headers={"Authorization": "Bearer a"})
    response, _ = await h.send(upstream, headers={"Authorization": "Bearer b"})
    assert response.headers[CACHE_HEADER] == "miss"
    assert upstream.calls == 2
    public = fake_upstream(ok(b"everyone's", **{"Cache-Control": "public, max-age=60"}))
    await h.send(public, path="/public", headers={"Authorization": "Bearer a"})
    response, _ = await h.send(public, path="/public", headers={"Authorization": "Bearer b"})
    assert (response.headers[CACHE_HEADER], public.calls) == ("hit", 1)


async def test_paths_and_queries_are_separate_entries() -> None:
    h = Harness()
    upstream = fake_upstream(ok(b"1"), ok(b"2"), ok(b"3"))
    assert (await h.send(upstream, path="/a?x=1"))[1] == b"1"
    assert (await h.send(upstream, path="/a?x=2"))[1] == b"2"
    assert (await h.send(upstream, path="/b?x=1"))[1] == b"3"
    assert (await h.send(upstream, path="/a?x=1"))[1] == b"1"


async def test_vary_is_respected() -> None:
    h = Harness()
    upstream = fake_upstream(ok(b"gzip", Vary="Accept-Encoding"), ok(b"br", Vary="Accept-Encoding"))
    await h.send(upstream, headers={"Accept-Encoding": "gzip"})
    hit, body = await h.send(upstream, headers={"Accept-Encoding": "gzip"})
    assert (hit.headers[CACHE_HEADER], body) == ("hit", b"gzip")
    other, body = await h.send(upstream, headers={"Accept-Encoding": "br"})
    assert (other.headers[CACHE_HEADER], body, upstream.calls) == ("miss", b"br", 2)


async def test_head_is_served_from_a_get_entry_but_a_head_miss_stores_nothing() -> None:
    h = Harness()
    upstream = fake_upstream(ok(b"body", **{"Content-Length": "4"}))
    head, _ = await h.send(upstream, "HEAD")
    assert head.headers[CACHE_HEADER] == "miss"
    assert len(h.cache) == 0
    await h.send(upstream)
    head, _ = await h.send(upstream, "HEAD")
    assert (head.headers[CACHE_HEADER], head.headers["Content-Length"], upstream.calls) == ("hit", "4", 2)


# --- revalidation --------------------------------------------------------------------------------


async def test_a_stale_entry_is_revalidated_with_its_etag_and_a_304_refreshes_it() -> None:
    h = Harness()
    tagged = ok(b"v1", ETag='"abc"', **{"Cache-Control": "max-age=10"})
    upstream = fake_upstream(tagged, (304, {"ETag": '"abc"', "Cache-Control": "max-age=20"}, b""))
    await h.send(upstream)
    h.clock.advance(11)
    response, body = await h.send(upstream)
    assert upstream.attempts[1].headers["If-None-Match"] == '"abc"'
    assert (response.headers[CACHE_HEADER], response.status, body) == ("revalidated", 200, b"v1")
    assert response.headers["Cache-Control"] == "max-age=20"  # the 304's headers replace the stored ones
    h.clock.advance(15)  # fresh again for the 304's 20 s
    assert (await h.send(upstream))[0].headers[CACHE_HEADER] == "hit"
    assert upstream.calls == 2


async def test_a_refreshed_entry_counts_its_age_from_the_304() -> None:
    h = Harness()
    stored = ok(b"v1", ETag='"abc"', Age="100", **{"Cache-Control": "max-age=110"})
    upstream = fake_upstream(stored, (304, {"ETag": '"abc"'}, b""))
    await h.send(upstream)
    h.clock.advance(20)
    revalidated, _ = await h.send(upstream)
    assert revalidated.headers["Age"] == "0"
    h.clock.advance(100)  # 100 s after the 304: still within max-age=110
    hit, _ = await h.send(upstream)
    assert (hit.headers[CACHE_HEADER], hit.headers["Age"]) == ("hit", "100")


async def test_last_modified_is_revalidated_with_if_modified_since() -> None:
    h = Harness()
    stamp = "Tue, 14 Nov 2023 22:00:00 GMT"
    upstream = fake_upstream(ok(b"v1", **{"Last-Modified": stamp, "Cache-Control": "no-cache"}), 304)
    await h.send(upstream)
    response, body = await h.send(upstream)  # no-cache: stored, but revalidated on every use
    assert upstream.attempts[1].headers["If-Modified-Since"] == stamp
    assert (response.headers[CACHE_HEADER], body) == ("revalidated", b"v1")


async def test_a_200_to_a_revalidation_replaces_the_entry() -> None:
    h = Harness()
    upstream = fake_upstream(
        ok(b"v1", ETag='"1"', **{"Cache-Control": "max-age=1"}),
        ok(b"v2", ETag='"2"', **{"Cache-Control": "max-age=60"}),
    )
    await h.send(upstream)
    h.clock.advance(2)
    response, body = await h.send(upstream)
    assert (response.headers[CACHE_HEADER], body) == ("miss", b"v2")
    assert (await h.send(upstream))[1] == b"v2"


async def test_the_apps_own_conditional_request_is_forwarded_as_is() -> None:
    h = Harness()
    upstream = fake_upstream(ok(b"v1", ETag='"1"', **{"Cache-Control": "max-age=1"}), 304)
    await h.send(upstream)
    h.clock.advance(2)
    response, _ = await h.send(upstream, headers={"If-None-Match": '"mine"'})
    assert response.status == 304
    assert upstream.attempts[1].headers["If-None-Match"] == '"mine"'


# --- stale-if-error ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "masked"),
    [
        (errors.ConnectFailure("refused"), "upstream_unreachable"),
        (errors.ConnectionReset("reset"), "upstream_unreachable"),
        (errors.Timeout("too slow"), "timeout"),
        (errors.AttemptTimeout("too slow"), "timeout"),
        (errors.CircuitOpen("open", retry_after=5), "circuit_open"),
    ],
)
async def test_a_failing_upstream_is_answered_from_the_stale_entry(
    failure: errors.OutriggerError, masked: str
) -> None:
    h = Harness({"stale_if_error": "10m"})
    upstream = fake_upstream(ok(b"old", **{"Cache-Control": "max-age=10"}), failure)
    await h.send(upstream)
    h.clock.advance(300)
    request = make_request(settings=h.settings)
    response = await h.layer(request, upstream)
    assert await read_body(response) == b"old"
    assert response.headers[STALE_HEADER] == "true"
    assert response.headers[CACHE_HEADER] == "stale"
    assert response.headers["Age"] == "300"
    assert (request.cache_result, request.cache_masked_error) == ("stale", masked)


async def test_past_stale_if_error_the_failure_goes_through() -> None:
    h = Harness({"stale_if_error": "1m"})
    upstream = fake_upstream(ok(**{"Cache-Control": "max-age=10"}), errors.ConnectFailure("down"))
    await h.send(upstream)
    h.clock.advance(71)
    request = make_request(settings=h.settings)
    with pytest.raises(errors.ConnectFailure):
        await h.layer(request, upstream)
    assert request.cache_result == "miss"


async def test_must_revalidate_forbids_stale_answers() -> None:
    h = Harness()
    upstream = fake_upstream(ok(**{"Cache-Control": "max-age=10, must-revalidate"}), errors.Timeout("x"))
    await h.send(upstream)
    h.clock.advance(11)
    with pytest.raises(errors.Timeout):
        await h.send(upstream)


async def test_a_5xx_in_the_retry_or_breaker_lists_is_answered_stale_others_pass_through() -> None:
    h = Harness({}, retries={"on": [503]}, circuit_breaker={"failure_on": ["502"]})
    body = TrackedBody(b"upstream error page")
    upstream = fake_upstream(
        ok(b"old", **{"Cache-Control": "max-age=1"}),
        ProxyResponse(503, make_response(503).headers, body),
        (502, {}, b"bad gateway"),
        (500, {}, b"internal"),
    )
    await h.send(upstream)
    h.clock.advance(5)
    for _ in range(2):
        response, data = await h.send(upstream)
        assert (response.status, data, response.headers[STALE_HEADER]) == (200, b"old", "true")
    assert body.released
    response, data = await h.send(upstream)
    assert (response.status, data, response.headers[CACHE_HEADER]) == (500, b"internal", "miss")


async def test_no_stale_answer_without_an_entry() -> None:
    h = Harness()
    with pytest.raises(errors.ConnectFailure):
        await h.send(fake_upstream(errors.ConnectFailure("down")))


# --- coalescing ----------------------------------------------------------------------------------


async def test_concurrent_misses_for_one_key_make_one_upstream_call() -> None:
    h = Harness()
    gate = asyncio.Event()
    upstream = fake_upstream(ok(b"shared"), gate=gate)
    tasks = [asyncio.create_task(h.send(upstream)) for _ in range(50)]
    for _ in range(5):
        await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*tasks)
    assert upstream.calls == 1
    assert {body for _, body in results} == {b"shared"}
    assert sorted(r.headers[CACHE_HEADER] for r, _ in results).count("miss") == 1


async def test_waiters_make_their_own_calls_when_the_response_is_not_storable() -> None:
    h = Harness()
    gate = asyncio.Event()
    upstream = fake_upstream(ok(b"personal", **{"Cache-Control": "no-store"}), gate=gate)
    tasks = [asyncio.create_task(h.send(upstream)) for _ in range(5)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert upstream.calls == 1  # the others wait for the first
    gate.set()
    results = await asyncio.gather(*tasks)
    assert upstream.calls == 5
    assert {body for _, body in results} == {b"personal"}
    assert not h.cache.inflight


async def test_once_a_key_proved_unstorable_its_misses_no_longer_wait_for_each_other() -> None:
    h = Harness()
    await h.send(fake_upstream(ok(b"personal", **{"Cache-Control": "no-store"})))
    gate = asyncio.Event()
    upstream = fake_upstream(ok(b"personal", **{"Cache-Control": "no-store"}), gate=gate)
    tasks = [asyncio.create_task(h.send(upstream)) for _ in range(5)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert upstream.calls == 5  # all in flight at once
    gate.set()
    await asyncio.gather(*tasks)


async def test_a_key_that_becomes_storable_is_coalesced_again() -> None:
    h = Harness()
    await h.send(fake_upstream(ok(**{"Cache-Control": "no-store"})))
    await h.send(fake_upstream(ok(b"now public", **MAX_AGE_60)))
    assert not h.cache.passes
    response, body = await h.send(fake_upstream(ok(b"other")))
    assert (response.headers[CACHE_HEADER], body) == ("hit", b"now public")


async def test_waiters_share_a_stale_answer() -> None:
    h = Harness()
    gate = asyncio.Event()
    upstream = fake_upstream(ok(b"old", **{"Cache-Control": "max-age=1"}))
    await h.send(upstream)
    h.clock.advance(5)
    failing = fake_upstream(errors.ConnectFailure("down"), gate=gate)
    tasks = [asyncio.create_task(h.send(failing)) for _ in range(5)]
    for _ in range(5):
        await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*tasks)
    assert failing.calls == 1
    assert {(r.headers[CACHE_HEADER], body) for r, body in results} == {("stale", b"old")}


async def test_a_waiter_gives_up_at_its_own_deadline() -> None:
    h = Harness({}, timeouts={"total": "50ms", "per_try": "50ms"})
    gate = asyncio.Event()
    upstream = fake_upstream(ok(), gate=gate)
    leader = asyncio.create_task(h.send(upstream))
    await asyncio.sleep(0)
    request = make_request(settings=h.settings)
    with pytest.raises(errors.Timeout):
        await h.layer(request, upstream)
    assert request.cache_result == "miss"
    gate.set()
    await leader


async def test_a_cancelled_leader_lets_waiters_call_themselves() -> None:
    h = Harness()
    gate = asyncio.Event()
    upstream = fake_upstream(ok(b"x"), gate=gate)
    leader = asyncio.create_task(h.send(upstream))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(h.send(upstream))
    await asyncio.sleep(0)
    leader.cancel()
    await asyncio.sleep(0)
    gate.set()
    _, body = await waiter
    assert body == b"x"
    assert upstream.calls == 2


# --- bounds and streaming ------------------------------------------------------------------------


async def test_a_response_above_max_entry_bytes_streams_through_unread_and_unstored() -> None:
    h = Harness({"max_entry_bytes": "1KiB"})
    big = b"x" * 5000
    body = TrackedBody(big, chunk_size=100)
    upstream = fake_upstream(ProxyResponse(200, make_response(200, {"Content-Length": "5000"}).headers, body))
    request = make_request(settings=h.settings)
    response = await h.layer(request, upstream)
    assert response.body is body  # handed on as it is: not a single byte read into memory
    assert not body.read
    assert await read_body(response) == big
    assert len(h.cache) == 0


async def test_a_body_growing_past_max_entry_bytes_streams_on_and_is_not_stored() -> None:
    h = Harness({"max_entry_bytes": "1KiB"})
    big = bytes(range(256)) * 20
    body = TrackedBody(big, chunk_size=300)
    upstream = fake_upstream(ProxyResponse(200, make_response(200).headers, body))
    response, data = await h.send(upstream)
    assert data == big
    assert not isinstance(response.body, BytesBody)
    assert len(h.cache) == 0


async def test_entries_are_bounded_by_max_entries() -> None:
    h = Harness({"max_entries": 10})
    upstream = fake_upstream(ok(b"small"))
    for i in range(100):
        await h.send(upstream, path=f"/{i}")
    assert len(h.cache) == 10
    assert (await h.send(upstream, path="/99"))[0].headers[CACHE_HEADER] == "hit"  # the recent stay
    assert (await h.send(upstream, path="/0"))[0].headers[CACHE_HEADER] == "miss"


async def test_entries_are_bounded_by_max_bytes() -> None:
    h = Harness({"max_bytes": "64KiB", "max_entry_bytes": "8KiB"})
    upstream = fake_upstream(ok(b"y" * 4000))
    for i in range(200):
        await h.send(upstream, path=f"/{i}")
    snapshot = h.cache.snapshot()
    assert 0 < snapshot["bytes"] <= 64 * 1024
    assert snapshot["entries"] < 17


async def test_entries_without_validators_are_dropped_once_too_stale_to_use() -> None:
    h = Harness({"stale_if_error": "10s"})
    await h.send(fake_upstream(ok(**{"Cache-Control": "max-age=5"})), path="/a")
    await h.send(fake_upstream(ok(ETag='"v"', **{"Cache-Control": "max-age=5"})), path="/b")
    h.clock.advance(16)
    assert h.cache.snapshot()["entries"] == 1  # only /b, which can still be revalidated


# --- config and pipeline -------------------------------------------------------------------------


def test_cache_control_parsing() -> None:
    assert parse_cache_control(['max-age="60", No-Cache', "private"]) == {
        "max-age": "60",
        "no-cache": None,
        "private": None,
    }


def test_max_entry_bytes_may_not_exceed_max_bytes() -> None:
    with pytest.raises(ValueError, match="max_entry_bytes"):
        settings_from(cache={"max_bytes": "1MiB", "max_entry_bytes": "2MiB"})


def test_defaults() -> None:
    cache = settings_from(cache={}).cache
    assert cache is not None
    assert (cache.ttl, cache.stale_if_error, cache.max_entries) == (60, 600, 10_000)
    assert (cache.max_bytes, cache.max_entry_bytes) == (64 * 1024 * 1024, 1024 * 1024)
    assert (cache.key_headers, cache.honour_cache_control) == (("Authorization",), True)


def _policy(settings: PolicySettings) -> Policy:
    return Policy(hosts=("api.test",), upstream=None, listen=None, settings=settings, routes=(), source="t:1")


def test_the_cache_sits_after_concurrency_and_before_the_deadline() -> None:
    settings = settings_from(cache={}, concurrency={}, retries={})
    state = PolicyState.build(_policy(settings), SYSTEM_CLOCK)
    names = [
        type(layer).__name__
        for layer in build_layers(settings, state, Path("."), SYSTEM_CLOCK, trace.get_tracer("t"))
    ]
    assert names.index("ConcurrencyLayer") + 1 == names.index("CacheLayer")
    assert names.index("CacheLayer") + 1 == names.index("DeadlineLayer")
    uncached = PolicyState.build(_policy(settings_from()), SYSTEM_CLOCK)
    assert uncached.cache is None


def test_the_store_carries_over_a_reload_only_when_the_section_is_unchanged() -> None:
    before = _policy(settings_from(cache={"ttl": "60s"}))
    state = PolicyState.build(before, SYSTEM_CLOCK)
    same = PolicyState.build(
        _policy(settings_from(cache={"ttl": "60s"}, retries={})), SYSTEM_CLOCK, (before, state)
    )
    changed = PolicyState.build(_policy(settings_from(cache={"ttl": "61s"})), SYSTEM_CLOCK, (before, state))
    assert same.cache is state.cache
    assert changed.cache is not None
    assert changed.cache is not state.cache
