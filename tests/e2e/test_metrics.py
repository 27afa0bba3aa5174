"""Prometheus metrics end to end: real traffic through Outrigger, then `GET /metrics` on the admin port.

The exposition is parsed with prometheus-client's own text parser. Each test
scrapes before and after the event it is about, so a counter that does not
move (or moves under the wrong labels) fails.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.conftest import RunningProxy, StartProxy, free_port, loopback_policy
from tests.fakes import AiohttpServerFactory, ScriptedUpstream, app_request, body_in_two_parts

HOST = "upstream.test"
FAST_BACKOFF = {"base": "10ms", "max": "10ms"}

SPEC_FAMILIES: dict[str, tuple[str, frozenset[str]]] = {
    # parsed family name -> (type, label names)
    "outrigger_requests": ("counter", frozenset({"host", "method", "code"})),
    "outrigger_request_duration_seconds": ("histogram", frozenset({"host"})),
    "outrigger_attempts": ("counter", frozenset({"host", "outcome"})),
    "outrigger_retries": ("counter", frozenset({"host", "reason"})),
    "outrigger_circuit_state": ("gauge", frozenset({"host"})),
    "outrigger_rejections": ("counter", frozenset({"host", "type"})),
    "outrigger_ratelimit_wait_seconds": ("histogram", frozenset({"host"})),
    "outrigger_idempotency_keys_injected": ("counter", frozenset({"host"})),
    "outrigger_config_reloads": ("counter", frozenset({"result"})),
}
TUNNEL_FAMILIES: dict[str, tuple[str, frozenset[str]]] = {
    # SPEC 2: CONNECT tunnels and upgraded connections (their traffic: test_tunnels, test_upgrades)
    "outrigger_tunnels": ("counter", frozenset({"host", "result"})),
    "outrigger_tunnel_bytes": ("counter", frozenset({"host", "direction"})),
}
PROVIDER_QUOTA_FAMILIES: dict[str, tuple[str, frozenset[str]]] = {
    # beyond SPEC 8, asked for by the issue: the provider's own quota as last reported
    "outrigger_upstream_ratelimit_remaining": ("gauge", frozenset({"host"})),
    "outrigger_upstream_ratelimit_limit": ("gauge", frozenset({"host"})),
}
RATELIMIT_QUEUE_FAMILIES: dict[str, tuple[str, frozenset[str]]] = {
    # SPEC 10: the rate limiter's priority queue (x-outrigger-priority)
    "outrigger_ratelimit_queued": ("gauge", frozenset({"host", "priority"})),
    "outrigger_ratelimit_queue_wait_seconds": ("histogram", frozenset({"host", "priority"})),
}
FALLBACK_FAULT_FAMILIES: dict[str, tuple[str, frozenset[str]]] = {
    # SPEC 9: declared fallbacks and fault drills (their traffic: test_degradation_e2e)
    "outrigger_fallbacks": ("counter", frozenset({"host", "reason"})),
    "outrigger_faults_injected": ("counter", frozenset({"host", "kind"})),
}
FAILOVER_FAMILIES: dict[str, tuple[str, frozenset[str]]] = {
    # SPEC 9 (traffic: tests/e2e/test_failover_e2e.py)
    "outrigger_failovers": ("counter", frozenset({"host", "upstream"})),
}
CACHE_FAMILIES: dict[str, tuple[str, frozenset[str]]] = {
    # SPEC 9: answers of policies with a cache (their traffic: test_cache_e2e)
    "outrigger_cache": ("counter", frozenset({"host", "result"})),
}
CREDENTIAL_FAMILIES: dict[str, tuple[str, frozenset[str]]] = {
    # SPEC 10: keys of a pool by state (traffic: tests/e2e/test_credentials_e2e.py)
    "outrigger_credential_keys": ("gauge", frozenset({"host", "state"})),
}
WEBHOOK_FAMILIES: dict[str, tuple[str, frozenset[str]]] = {
    # SPEC 11: inbound webhook requests (their traffic: tests/webhooks/test_listener.py)
    "outrigger_webhooks": ("counter", frozenset({"route", "result"})),
}
ACCESS_LOG_FAMILIES: dict[str, tuple[str, frozenset[str]]] = {
    # beyond SPEC 8, asked for by issue 9: access log lines dropped because stdout could not keep up
    "outrigger_access_log_dropped": ("counter", frozenset()),
}


@dataclass(frozen=True)
class Family:
    name: str
    type: str
    samples: tuple[Sample, ...]


@dataclass(frozen=True)
class Scrape:
    families: dict[str, Family]
    text: str

    def samples(self) -> Iterable[Sample]:
        for family in self.families.values():
            yield from family.samples

    def value(self, sample: str, **labels: str) -> float:
        """The sample with exactly these labels, 0.0 when absent (a counter that never moved)."""
        found = [s.value for s in self.samples() if s.name == sample and s.labels == labels]
        assert len(found) <= 1, f"duplicate series {sample}{labels}"
        return float(found[0]) if found else 0.0

    def label_values(self, label: str) -> set[str]:
        return {s.labels[label] for s in self.samples() if label in s.labels}


async def scrape(proxy: RunningProxy) -> Scrape:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as client,
        client.get(f"http://127.0.0.1:{proxy.admin_port}/metrics") as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    families = {
        f.name: Family(f.name, f.type, tuple(f.samples)) for f in text_string_to_metric_families(text)
    }
    return Scrape(families, text)


# --------------------------------------------------------------------------- names and labels


async def test_spec_families_exist_with_their_types_and_labels(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    """After traffic that touches every metric, each SPEC 8 family is there with exactly its labels."""
    upstream = await ScriptedUpstream(
        503, (200, {"X-RateLimit-Limit": "100", "X-RateLimit-Remaining": "99"}, b"ok")
    ).start(aiohttp_server)
    proxy = await start_proxy(
        [
            loopback_policy(
                upstream.url,
                retries={"on": [503], "backoff": FAST_BACKOFF},
                idempotency={},
                circuit_breaker={"failure_threshold": 5},
                rate_limit={"rate": 1000, "burst": 100},
            )
        ]
    )
    assert (await app_request(proxy, "POST", data=b"x")).status == 200
    assert (await app_request(proxy, host="unknown.test")).status == 403

    metrics = await scrape(proxy)

    families = {**SPEC_FAMILIES, **PROVIDER_QUOTA_FAMILIES, **RATELIMIT_QUEUE_FAMILIES, **ACCESS_LOG_FAMILIES}
    for name, (kind, labels) in families.items():
        assert name in metrics.families, f"{name} missing from /metrics"
        family = metrics.families[name]
        assert family.type == kind, (name, family.type)
        if name == "outrigger_config_reloads":
            continue  # no reload in this test: no series yet (the reload tests cover it)
        assert family.samples, f"{name} has no series after traffic that should have moved it"
        for sample in family.samples:
            names = set(sample.labels) - ({"le"} if sample.name.endswith("_bucket") else set())
            assert names == labels, (sample.name, sample.labels)
    assert all(name.startswith("outrigger_") for name in metrics.families), sorted(metrics.families)


async def test_no_families_beyond_spec(aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy) -> None:
    upstream = await ScriptedUpstream(200).start(aiohttp_server)
    proxy = await start_proxy([loopback_policy(upstream.url)])
    assert (await app_request(proxy)).status == 200

    metrics = await scrape(proxy)

    known = {
        *SPEC_FAMILIES,
        *PROVIDER_QUOTA_FAMILIES,
        *RATELIMIT_QUEUE_FAMILIES,
        *ACCESS_LOG_FAMILIES,
        *TUNNEL_FAMILIES,
        *FALLBACK_FAULT_FAMILIES,
        *FAILOVER_FAMILIES,
        *CACHE_FAMILIES,
        *CREDENTIAL_FAMILIES,
        *WEBHOOK_FAMILIES,
    }
    assert set(metrics.families) <= known, sorted(metrics.families)


# --------------------------------------------------------------------------- each counter moves


async def test_requests_total_and_duration(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(200, 201, 404).start(aiohttp_server)
    proxy = await start_proxy([loopback_policy(upstream.url)])
    before = await scrape(proxy)
    assert before.value("outrigger_requests_total", host=HOST, method="GET", code="200") == 0

    assert (await app_request(proxy)).status == 200
    assert (await app_request(proxy, "POST", data=b"x")).status == 201
    assert (await app_request(proxy)).status == 404

    after = await scrape(proxy)
    assert after.value("outrigger_requests_total", host=HOST, method="GET", code="200") == 1
    assert after.value("outrigger_requests_total", host=HOST, method="POST", code="201") == 1
    assert after.value("outrigger_requests_total", host=HOST, method="GET", code="404") == 1
    assert after.value("outrigger_request_duration_seconds_count", host=HOST) == 3
    total = after.value("outrigger_request_duration_seconds_sum", host=HOST)
    assert 0 < total < 10
    assert after.value("outrigger_request_duration_seconds_bucket", host=HOST, le="+Inf") == 3


async def test_duration_histogram_sees_a_slow_request(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(200, delay=0.3).start(aiohttp_server)
    proxy = await start_proxy([loopback_policy(upstream.url)])

    assert (await app_request(proxy)).status == 200

    after = await scrape(proxy)
    assert after.value("outrigger_request_duration_seconds_sum", host=HOST) >= 0.3
    assert after.value("outrigger_request_duration_seconds_bucket", host=HOST, le="0.25") == 0
    assert after.value("outrigger_request_duration_seconds_bucket", host=HOST, le="0.5") == 1


async def test_duration_includes_the_response_body(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    slow_body = body_in_two_parts(b"head arrives at once, ", b"the rest later", pause=0.3)
    upstream = await ScriptedUpstream(slow_body).start(aiohttp_server)
    proxy = await start_proxy([loopback_policy(upstream.url)])

    assert (await app_request(proxy)).body.endswith(b"the rest later")

    assert (await scrape(proxy)).value("outrigger_request_duration_seconds_sum", host=HOST) >= 0.3


async def test_attempts_and_retries_by_outcome_and_reason(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(503, 503, 200).start(aiohttp_server)
    dead = free_port()
    proxy = await start_proxy(
        [
            loopback_policy(upstream.url, retries={"on": [503], "backoff": FAST_BACKOFF}),
            loopback_policy(
                f"http://127.0.0.1:{dead}",
                host="dead.test",
                retries={"on": ["connect-failure"], "max_attempts": 2, "backoff": FAST_BACKOFF},
            ),
        ]
    )
    before = await scrape(proxy)
    assert before.value("outrigger_attempts_total", host=HOST, outcome="5xx") == 0

    assert (await app_request(proxy)).status == 200
    assert (await app_request(proxy, host="dead.test")).status == 502

    after = await scrape(proxy)
    assert after.value("outrigger_attempts_total", host=HOST, outcome="5xx") == 2
    assert after.value("outrigger_attempts_total", host=HOST, outcome="2xx") == 1
    assert after.value("outrigger_retries_total", host=HOST, reason="503") == 2
    assert after.value("outrigger_attempts_total", host="dead.test", outcome="connect-failure") == 2
    assert after.value("outrigger_retries_total", host="dead.test", reason="connect-failure") == 1
    assert after.value("outrigger_requests_total", host="dead.test", method="GET", code="502") == 1
    # an unreachable upstream is not a local rejection
    assert not [s for s in after.samples() if s.name == "outrigger_rejections_total"]


async def test_circuit_state_goes_from_closed_to_open(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(503).start(aiohttp_server)
    proxy = await start_proxy(
        [loopback_policy(upstream.url, circuit_breaker={"failure_threshold": 3, "reset_timeout": "30s"})]
    )
    assert (await scrape(proxy)).value("outrigger_circuit_state", host=HOST) == 0

    for _ in range(2):
        assert (await app_request(proxy)).status == 503
    assert (await scrape(proxy)).value("outrigger_circuit_state", host=HOST) == 0
    assert (await app_request(proxy)).status == 503

    after = await scrape(proxy)
    assert after.value("outrigger_circuit_state", host=HOST) == 2
    refused = await app_request(proxy)
    assert refused.headers["x-outrigger-error"] == "circuit_open"
    after = await scrape(proxy)
    assert after.value("outrigger_rejections_total", host=HOST, type="circuit_open") == 1
    assert after.value("outrigger_requests_total", host=HOST, method="GET", code="503") == 4
    assert after.value("outrigger_attempts_total", host=HOST, outcome="5xx") == 3


async def test_circuit_state_half_open_is_1(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    release = asyncio.Event()
    calls = 0

    async def fail_then_hold(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            return web.Response(status=503)
        await asyncio.wait_for(release.wait(), 10)
        return web.Response(text="recovered")

    upstream = await ScriptedUpstream(fail_then_hold).start(aiohttp_server)
    proxy = await start_proxy(
        [loopback_policy(upstream.url, circuit_breaker={"failure_threshold": 1, "reset_timeout": "200ms"})]
    )
    assert (await app_request(proxy)).status == 503
    assert (await scrape(proxy)).value("outrigger_circuit_state", host=HOST) == 2
    await asyncio.sleep(0.3)
    trial = asyncio.create_task(app_request(proxy))
    try:
        for _ in range(100):
            if calls >= 2:
                break
            await asyncio.sleep(0.02)
        assert calls == 2, "the half-open trial never reached the upstream"
        assert (await scrape(proxy)).value("outrigger_circuit_state", host=HOST) == 1
    finally:
        release.set()
    assert (await trial).status == 200
    assert (await scrape(proxy)).value("outrigger_circuit_state", host=HOST) == 0


async def test_rejections_by_type(aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy) -> None:
    release = asyncio.Event()
    arrived = asyncio.Event()

    async def respond(request: web.Request) -> web.Response:
        if request.path == "/hold":
            arrived.set()
            await asyncio.wait_for(release.wait(), 10)
            return web.Response(text="held")
        return web.Response(status=503 if request.path == "/fail" else 200)

    upstream = await ScriptedUpstream(respond).start(aiohttp_server)
    budget = {"ratio": 0.0, "min_per_second": 0.0}
    proxy = await start_proxy(
        [
            loopback_policy(
                upstream.url,
                host="limited.test",
                rate_limit={"rate": 1, "per": "1m", "burst": 1, "max_wait": "0s"},
            ),
            loopback_policy(
                upstream.url, host="bulkhead.test", concurrency={"max_in_flight": 1, "max_queued": 0}
            ),
            loopback_policy(
                upstream.url,
                host="budget.test",
                retries={"on": [503], "backoff": FAST_BACKOFF, "budget": budget},
            ),
        ]
    )
    before = await scrape(proxy)
    assert not [s for s in before.samples() if s.name == "outrigger_rejections_total"]

    assert (await app_request(proxy, host="limited.test")).status == 200
    assert (await app_request(proxy, host="limited.test")).status == 429
    held = asyncio.create_task(app_request(proxy, path="/hold", host="bulkhead.test"))
    try:
        await asyncio.wait_for(arrived.wait(), 5)
        assert (await app_request(proxy, path="/hold", host="bulkhead.test")).status == 503
    finally:
        release.set()
    assert (await held).status == 200
    assert (await app_request(proxy, path="/fail", host="budget.test")).status == 503
    assert (await app_request(proxy, host="nobody.test")).status == 403

    after = await scrape(proxy)
    assert after.value("outrigger_rejections_total", host="limited.test", type="rate_limited") == 1
    assert after.value("outrigger_rejections_total", host="bulkhead.test", type="overloaded") == 1
    assert after.value("outrigger_rejections_total", host="budget.test", type="retry_budget_exhausted") == 1
    assert after.value("outrigger_rejections_total", host="(none)", type="host_not_allowed") == 1
    assert after.value("outrigger_requests_total", host="(none)", method="GET", code="403") == 1
    rejections = [s for s in after.samples() if s.name == "outrigger_rejections_total"]
    assert len(rejections) == 4, rejections


async def test_ratelimit_wait_histogram(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(200).start(aiohttp_server)
    proxy = await start_proxy(
        [loopback_policy(upstream.url, rate_limit={"rate": 10, "per": "1s", "burst": 1, "max_wait": "2s"})]
    )
    before = await scrape(proxy)
    assert before.value("outrigger_ratelimit_wait_seconds_count", host=HOST) == 0

    for _ in range(3):  # back to back: the 2nd and 3rd wait ~100 ms each for a token
        assert (await app_request(proxy)).status == 200

    after = await scrape(proxy)
    assert after.value("outrigger_ratelimit_wait_seconds_count", host=HOST) == 3
    assert after.value("outrigger_ratelimit_wait_seconds_sum", host=HOST) >= 0.1
    assert after.value("outrigger_ratelimit_queue_wait_seconds_count", host=HOST, priority="normal") == 3
    assert after.value("outrigger_ratelimit_queued", host=HOST, priority="low") == 0
    assert after.value("outrigger_ratelimit_wait_seconds_bucket", host=HOST, le="0.005") >= 1
    assert after.value("outrigger_ratelimit_wait_seconds_bucket", host=HOST, le="0.025") <= 1


async def test_idempotency_keys_injected(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(201).start(aiohttp_server)
    proxy = await start_proxy([loopback_policy(upstream.url, idempotency={})])
    assert (await scrape(proxy)).value("outrigger_idempotency_keys_injected_total", host=HOST) == 0

    assert (await app_request(proxy, "POST", data=b"1")).status == 201
    assert (await app_request(proxy, "POST", data=b"2", headers={"Idempotency-Key": "mine"})).status == 201
    assert (await app_request(proxy)).status == 201  # GET: no key

    assert (await scrape(proxy)).value("outrigger_idempotency_keys_injected_total", host=HOST) == 1
    assert upstream.keys() == [upstream.seen[0].headers["Idempotency-Key"], "mine", None]


async def test_upstream_ratelimit_remaining_from_provider_headers(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(
        (200, {"X-RateLimit-Limit": "100", "X-RateLimit-Remaining": "42"}, b"ok"),
        (200, {"X-RateLimit-Limit": "100", "X-RateLimit-Remaining": "41"}, b"ok"),
    ).start(aiohttp_server)
    proxy = await start_proxy([loopback_policy(upstream.url, rate_limit={"rate": 1000, "burst": 100})])
    before = await scrape(proxy)
    assert not [s for s in before.samples() if s.name == "outrigger_upstream_ratelimit_remaining"]

    assert (await app_request(proxy)).status == 200
    assert (await scrape(proxy)).value("outrigger_upstream_ratelimit_remaining", host=HOST) == 42
    assert (await app_request(proxy)).status == 200
    after = await scrape(proxy)
    assert after.value("outrigger_upstream_ratelimit_remaining", host=HOST) == 41
    assert after.value("outrigger_upstream_ratelimit_limit", host=HOST) == 100


# --------------------------------------------------------------------------- bounded label values


async def test_label_values_are_policy_names_never_raw_hosts_or_urls(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(200).start(aiohttp_server)
    proxy = await start_proxy([loopback_policy(upstream.url, host="*.example.com")])

    for sub in ("a", "b", "c"):
        path = f"/v1/users/{sub}-123?email={sub}@mail.test"
        assert (await app_request(proxy, path=path, host=f"{sub}.example.com")).status == 200
    assert (await app_request(proxy, host="random-1.unknown.test")).status == 403
    assert (await app_request(proxy, host="random-2.unknown.test:8443")).status == 403
    assert (await app_request(proxy, "PURGE")).status == 403  # unknown method, unknown host

    metrics = await scrape(proxy)
    assert metrics.label_values("host") == {"*.example.com", "(none)"}
    assert metrics.value("outrigger_requests_total", host="*.example.com", method="GET", code="200") == 3
    assert metrics.value("outrigger_requests_total", host="(none)", method="GET", code="403") == 2
    assert metrics.value("outrigger_requests_total", host="(none)", method="OTHER", code="403") == 1
    assert metrics.label_values("method") == {"GET", "OTHER"}
    for needle in ("a.example.com", "unknown.test", "/v1/", "mail.test", "PURGE", "8443"):
        assert needle not in metrics.text


async def test_unknown_hosts_allowed_share_one_label(start_proxy: StartProxy) -> None:
    closed = free_port()
    proxy = await start_proxy(
        [loopback_policy("http://127.0.0.1:9", host="known.test")],
        unknown_hosts="allow",
        defaults={"allow_private_addresses": True},
    )
    # No policy claims these hosts: each goes (over https) to the host itself, here a closed port.
    for host in (f"127.0.0.1:{closed}", f"localhost:{closed}", f"127.0.0.2:{closed}"):
        reply = await app_request(proxy, host=host)
        assert reply.status == 502, reply

    metrics = await scrape(proxy)
    hosts = metrics.label_values("host")
    assert len(hosts) == 1, hosts
    (label,) = hosts
    for raw in (str(closed), "localhost", "127.0.0."):
        assert raw not in label
        assert raw not in metrics.text
    assert metrics.value("outrigger_requests_total", host=label, method="GET", code="502") == 3
