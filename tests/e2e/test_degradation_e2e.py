"""Declared fallbacks and fault drills end to end: real aiohttp upstreams on 127.0.0.1, a real
Outrigger from YAML, the app's side through aiohttp; metrics scraped from /metrics, the breaker
read from /state, spans decoded from a real OTLP receiver.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from tests.conftest import AccessLog, RunningProxy, StartProxy, free_port, loopback_policy
from tests.e2e.otlp_receiver import OtlpReceiver
from tests.e2e.test_metrics import scrape
from tests.e2e.test_tracing import server_span_with, traced
from tests.fakes import AiohttpServerFactory, ScriptedUpstream, admin_state, app_request, call

HOST = "upstream.test"
DEGRADED = b'{"degraded": true}'
DRILL_REQUESTS = 2_000
DRILL_CONCURRENCY = 50


def _down() -> str:
    """An upstream URL on which nothing listens: connecting is refused."""
    return f"http://127.0.0.1:{free_port()}"


def _assert_fallback(reply_status: int, headers: object, body: bytes, reason: str) -> None:
    assert reply_status == 503
    assert body == DEGRADED
    assert headers["x-outrigger-fallback"] == "true"  # type: ignore[index]
    assert headers["x-outrigger-error"] == reason  # type: ignore[index]
    assert headers["Content-Type"] == "application/json"  # type: ignore[index]


# --------------------------------------------------------------------------- fallback


async def test_fallback_answers_when_the_upstream_is_down_and_the_real_failure_stays_visible(
    start_proxy: StartProxy, access_log: AccessLog
) -> None:
    proxy = await start_proxy([loopback_policy(_down(), fallback={})])

    reply = await app_request(proxy)

    _assert_fallback(reply.status, reply.headers, reply.body, "upstream_unreachable")
    assert reply.headers["x-outrigger-attempts"] == "1"
    entry = access_log.for_request(reply.headers["x-request-id"])
    assert entry["status"] == 503
    assert entry["error_type"] == "upstream_unreachable"
    assert entry["fallback"] == "upstream_unreachable"
    assert entry["fault"] is None
    metrics = await scrape(proxy)
    assert metrics.value("outrigger_fallbacks_total", host=HOST, reason="upstream_unreachable") == 1
    assert metrics.value("outrigger_requests_total", host=HOST, method="GET", code="503") == 1


async def test_a_stale_entry_beats_the_fallback_which_answers_only_when_nothing_is_cached(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    """Cache and fallback together: the declared answer is for when nothing better exists."""
    upstream = await ScriptedUpstream(
        (200, {"Cache-Control": "max-age=0"}, b"last good"), 503, 503, 503
    ).start(aiohttp_server)
    policy = loopback_policy(
        upstream.url, cache={"ttl": "0s", "stale_if_error": "1m"}, fallback={}, circuit_breaker={}
    )
    proxy = await start_proxy([policy])
    assert (await app_request(proxy, "GET", "/cached")).body == b"last good"
    stale = await app_request(proxy, "GET", "/cached")
    assert (stale.status, stale.body, stale.headers["x-outrigger-stale"]) == (200, b"last good", "true")
    assert "x-outrigger-fallback" not in stale.headers
    nothing_cached = await app_request(proxy, "GET", "/never-seen")
    _assert_fallback(nothing_cached.status, nothing_cached.headers, nothing_cached.body, "503")


async def test_fallback_answers_for_an_open_breaker_without_calling_the_upstream(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(500).start(aiohttp_server)
    proxy = await start_proxy(
        [
            loopback_policy(
                upstream.url,
                circuit_breaker={"failure_threshold": 2, "reset_timeout": "30s", "failure_on": ["5xx"]},
                fallback={"on": ["circuit_open"], "status": 200, "body": '{"items": []}'},
            )
        ]
    )

    # the failures that open the breaker are not in `on`: the upstream's own 500s pass through
    for _ in range(2):
        reply = await app_request(proxy)
        assert reply.status == 500
        assert reply.body == b"status 500"
        assert "x-outrigger-fallback" not in reply.headers
    assert (await admin_state(proxy))[HOST]["circuit_breaker"]["state"] == "open"

    reply = await app_request(proxy)

    assert reply.status == 200
    assert reply.json() == {"items": []}
    assert reply.headers["x-outrigger-fallback"] == "true"
    assert reply.headers["x-outrigger-error"] == "circuit_open"
    assert reply.headers["x-outrigger-attempts"] == "0"
    assert upstream.count == 2


async def test_a_failure_not_in_on_gets_the_ordinary_error(start_proxy: StartProxy) -> None:
    proxy = await start_proxy([loopback_policy(_down(), fallback={"on": ["circuit_open", "timeout"]})])

    reply = await app_request(proxy)

    assert reply.status == 502
    assert reply.json()["error"]["type"] == "upstream_unreachable"
    assert reply.headers["x-outrigger-error"] == "upstream_unreachable"
    assert "x-outrigger-fallback" not in reply.headers
    assert (await scrape(proxy)).value(
        "outrigger_fallbacks_total", host=HOST, reason="upstream_unreachable"
    ) == 0


async def test_a_matching_upstream_status_is_replaced_and_its_connection_reused(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream((503, {"X-Upstream": "1"}, b"x" * 200_000), 200).start(aiohttp_server)
    proxy = await start_proxy([loopback_policy(upstream.url, fallback={"on": ["5xx"]})])

    reply = await app_request(proxy)

    _assert_fallback(reply.status, reply.headers, reply.body, "503")
    assert "X-Upstream" not in reply.headers
    second = await app_request(proxy)
    assert second.status == 200
    assert second.body == b"status 200"
    assert (await scrape(proxy)).value("outrigger_fallbacks_total", host=HOST, reason="503") == 1


async def test_fallback_answers_the_total_timeout(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(200, delay=2.0).start(aiohttp_server)
    proxy = await start_proxy(
        [loopback_policy(upstream.url, timeouts={"per_try": "300ms", "total": "300ms"}, fallback={})]
    )
    started = time.monotonic()

    reply = await app_request(proxy)

    _assert_fallback(reply.status, reply.headers, reply.body, "timeout")
    assert time.monotonic() - started < 1.5


# --------------------------------------------------------------------------- fault drills


async def _drill(proxy: RunningProxy, count: int, headers: dict[str, str] | None = None) -> list[int]:
    """`count` GETs through the proxy, `DRILL_CONCURRENCY` at a time; the statuses that came back,
    with a fault_injected 503 recorded as -503 so injected and real 503s cannot be confused."""
    semaphore = asyncio.Semaphore(DRILL_CONCURRENCY)
    url = f"{proxy.url}/v1/things"
    connector = aiohttp.TCPConnector(limit=DRILL_CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=20)) as client:

        async def one() -> int:
            async with semaphore, client.get(url, headers={"Host": HOST, **(headers or {})}) as response:
                body = await response.read()
                if response.headers.get("x-outrigger-error") == "fault_injected":
                    assert json.loads(body)["error"]["type"] == "fault_injected"
                    return -response.status
                return response.status

        return await asyncio.gather(*(one() for _ in range(count)))


async def test_ten_percent_abort_drill_injects_ten_percent_503s_and_leaves_the_breaker_closed(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(200).start(aiohttp_server)
    proxy = await start_proxy(
        [
            loopback_policy(
                upstream.url,
                faults={"abort": {"status": 503, "percent": 10}, "header_only": False},
                circuit_breaker={"failure_threshold": 1, "failure_on": ["5xx"]},
                retries={"on": ["503"], "backoff": {"base": "10ms", "max": "10ms"}},
                fallback={},  # a drill's abort is what the app sees, never a fallback
            )
        ]
    )

    statuses = await _drill(proxy, DRILL_REQUESTS)

    injected = statuses.count(-503)
    assert 140 <= injected <= 260, f"{injected} injected aborts in {DRILL_REQUESTS} requests"
    assert statuses.count(200) == DRILL_REQUESTS - injected
    assert upstream.count == DRILL_REQUESTS - injected, "an injected abort never reaches the upstream"
    breaker = (await admin_state(proxy))[HOST]["circuit_breaker"]
    assert breaker["state"] == "closed"
    assert breaker["consecutive_failures"] == 0
    assert breaker["transitions"] == 0
    metrics = await scrape(proxy)
    assert metrics.value("outrigger_faults_injected_total", host=HOST, kind="abort") == injected
    assert metrics.value("outrigger_retries_total", host=HOST, reason="503") == 0
    assert metrics.value("outrigger_fallbacks_total", host=HOST, reason="503") == 0
    print(f"abort drill: {injected}/{DRILL_REQUESTS} = {injected / DRILL_REQUESTS:.1%} injected")


async def test_header_only_drill_touches_only_requests_that_ask(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(200).start(aiohttp_server)
    proxy = await start_proxy(
        [
            loopback_policy(
                upstream.url, faults={"abort": {"status": 500, "percent": 100}, "header_only": True}
            )
        ]
    )

    assert await _drill(proxy, 20) == [200] * 20
    assert await _drill(proxy, 20, {"x-outrigger-fault": "off"}) == [200] * 20
    assert await _drill(proxy, 20, {"x-outrigger-fault": "on"}) == [-500] * 20
    assert upstream.count == 40
    assert all("x-outrigger-fault" not in seen.headers for seen in upstream.seen)
    assert (await scrape(proxy)).value("outrigger_faults_injected_total", host=HOST, kind="abort") == 20
    (policy,) = (await call("GET", f"http://127.0.0.1:{proxy.admin_port}/config")).json()["policies"]
    assert policy["settings"]["faults"] == {"abort": {"status": 500, "percent": 100.0}, "header_only": True}


async def test_delay_drill_delays_before_the_upstream_call(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy, access_log: AccessLog
) -> None:
    upstream = await ScriptedUpstream(200).start(aiohttp_server)
    proxy = await start_proxy(
        [
            loopback_policy(
                upstream.url, faults={"delay": {"duration": "300ms", "percent": 100}, "header_only": False}
            )
        ]
    )
    started = time.monotonic()

    reply = await app_request(proxy)

    assert reply.status == 200
    assert time.monotonic() - started >= 0.29  # timers may fire up to ~1 ms early (uvloop)
    assert upstream.seen[0].at - started >= 0.29
    entry = access_log.for_request(reply.headers["x-request-id"])
    assert entry["fault"] == "delay"
    assert entry["error_type"] is None
    assert (await scrape(proxy)).value("outrigger_faults_injected_total", host=HOST, kind="delay") == 1


# --------------------------------------------------------------------------- spans


@pytest.fixture(autouse=True)
def _fast_export(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_SAMPLER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")


async def test_spans_mark_the_injected_fault_and_the_real_failure_behind_a_fallback(
    receiver: OtlpReceiver, aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(200).start(aiohttp_server)
    proxy = await start_proxy(
        [
            loopback_policy(upstream.url, faults={"abort": {"percent": 100}}),
            loopback_policy(_down(), host="down.test", fallback={}),
        ],
        **traced(receiver),
    )

    aborted = await app_request(proxy, headers={"x-outrigger-fault": "on"})
    degraded = await app_request(proxy, host="down.test")

    assert aborted.status == 503
    assert aborted.headers["x-outrigger-error"] == "fault_injected"
    span = await server_span_with(receiver, aborted.headers["x-request-id"])
    assert span.attributes["outrigger.fault"] == "abort"
    assert span.attributes["error.type"] == "fault_injected"
    assert span.attributes["outrigger.attempts"] == 0
    assert not [s for s in receiver.in_trace(span.trace_id) if s.is_client], "no upstream attempt"

    assert degraded.status == 503
    assert degraded.headers["x-outrigger-fallback"] == "true"
    span = await server_span_with(receiver, degraded.headers["x-request-id"])
    assert span.attributes["outrigger.fallback"] == "upstream_unreachable"
    assert span.attributes["error.type"] == "upstream_unreachable"
    assert span.attributes["http.response.status_code"] == 503
    assert "outrigger.fault" not in span.attributes
