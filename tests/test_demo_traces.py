"""demo/traces.py: a real Outrigger exports over OTLP/HTTP to the demo's trace printer, in front
of the demo's own upstream; the printed trees show attempts, backoff waits and decisions."""

from __future__ import annotations

import asyncio
import time

import pytest

from demo import traces
from demo.upstream import make_app as make_upstream
from proxy.telemetry.otlp_decode import SPAN_KIND_CLIENT, SPAN_KIND_SERVER, ExportedEvent, ExportedSpan
from tests.conftest import StartProxy, loopback_policy
from tests.fakes import AiohttpServerFactory, app_get

FAST_BACKOFF = {"base": "10ms", "max": "10ms"}


@pytest.fixture(autouse=True)
def _fast_export(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_SAMPLER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")


async def printed(capsys: pytest.CaptureFixture[str], trees: int, within: float = 10.0) -> list[str]:
    """The trees printed so far, polled (bounded) until `trees` of them arrived."""
    out = ""
    deadline = time.monotonic() + within
    for _ in range(int(within / 0.05) + 2):
        out += capsys.readouterr().out
        found = [tree for tree in out.split("\n\n") if tree.startswith("trace ")]
        if len(found) >= trees or time.monotonic() >= deadline:
            return found
        await asyncio.sleep(0.05)
    return []


async def test_retries_and_an_open_breaker_print_as_trees(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy, capsys: pytest.CaptureFixture[str]
) -> None:
    printer = await aiohttp_server(traces.make_app())
    upstream = await aiohttp_server(make_upstream())
    origin = f"http://127.0.0.1:{upstream.port}"
    proxy = await start_proxy(
        [
            loopback_policy(
                origin,
                retries={"max_attempts": 3, "backoff": FAST_BACKOFF},
                circuit_breaker={"failure_threshold": 3, "reset_timeout": "30s"},
            )
        ],
        telemetry={"access_log": False, "traces": {"endpoint": f"http://127.0.0.1:{printer.port}/v1/traces"}},
    )
    assert (await app_get(proxy, "/flaky"))[0] == 200
    (flaky,) = await printed(capsys, 1)
    lines = flaky.splitlines()
    assert lines[0].startswith("trace ")
    assert "GET http://upstream.test/flaky  -> 200" in lines[0]
    assert lines[0].endswith("(policy upstream.test)")
    assert [line[3:].split("  ")[0:3] for line in lines if "attempt" in line and "retry" not in line] == [
        ["attempt 1", f"127.0.0.1:{upstream.port}", "-> 503"],
        ["attempt 2", f"127.0.0.1:{upstream.port}", "-> 503"],
        ["attempt 3", f"127.0.0.1:{upstream.port}", "-> 200"],
    ]
    waits = [line for line in lines if "(backoff), then retry because of 503" in line]
    assert len(waits) == 2
    assert lines[-1] == "└─ circuit breaker: closed"
    assert all(line.startswith("├─ ") for line in lines[1:-1])

    assert (await app_get(proxy, "/down"))[0] == 503  # three failed attempts: the breaker opens
    assert (await app_get(proxy, "/down"))[0] == 503
    down, refused = await printed(capsys, 2)
    assert "circuit breaker: open" in down
    assert refused.splitlines()[1:] == [
        "├─ no upstream attempt",
        "├─ circuit breaker: open",
        "└─ refused at once: the circuit breaker is open (no upstream call)",
    ]


async def test_a_stale_cache_answer_and_a_failover_say_so(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy, capsys: pytest.CaptureFixture[str]
) -> None:
    printer = await aiohttp_server(traces.make_app())
    primary = await aiohttp_server(make_upstream())
    standby = await aiohttp_server(make_upstream("standby"))
    cached = loopback_policy(
        f"http://127.0.0.1:{primary.port}",
        host="catalog.test",
        retries={"max_attempts": 2, "backoff": FAST_BACKOFF},
        cache={"ttl": "0s"},
    )
    failover = loopback_policy(
        f"http://127.0.0.1:{primary.port}",
        host="region.test",
        retries={"max_attempts": 2, "backoff": FAST_BACKOFF},
        failover={"upstreams": [{"url": f"http://127.0.0.1:{standby.port}"}]},
    )
    proxy = await start_proxy(
        [cached, failover],
        telemetry={"access_log": False, "traces": {"endpoint": f"http://127.0.0.1:{printer.port}/v1/traces"}},
    )
    assert (await app_get(proxy, "/catalog", Host="catalog.test"))[0] == 200
    await asyncio.sleep(1.1)  # the upstream said max-age=1
    status, headers, _ = await app_get(proxy, "/catalog", Host="catalog.test")
    assert (status, headers["x-outrigger-cache"]) == (200, "stale")
    assert (await app_get(proxy, "/region", Host="region.test"))[0] == 200
    miss, stale, moved = await printed(capsys, 3)
    assert miss.splitlines()[-1] == "└─ cache: miss"
    assert stale.splitlines()[-1] == "└─ cache: stale (a stored copy stood in for: 503)"
    assert f"attempt 1  127.0.0.1:{primary.port}  -> 503" in moved
    assert f"attempt 2  127.0.0.1:{standby.port}  -> 200" in moved
    assert moved.splitlines()[-1] == f"└─ answered by upstream http://127.0.0.1:{standby.port}"


def span(kind: int, trace_id: str, span_id: str, parent: str | None, **attributes: object) -> ExportedSpan:
    return ExportedSpan(
        name="GET",
        kind=kind,
        trace_id=trace_id,
        span_id=span_id,
        parent_span_id=parent,
        attributes=dict(attributes),
        events=(ExportedEvent("rate_limited", {}),) if kind == SPAN_KIND_SERVER else (),
        resource={},
        status_code=0,
        start_ns=0,
        end_ns=2_000_000,
    )


def test_attempts_wait_for_their_server_span_and_pending_traces_are_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(traces, "MAX_PENDING_TRACES", 2)
    book = traces.TraceBook()
    attempt = span(SPAN_KIND_CLIENT, "a" * 32, "1" * 16, "2" * 16, **{"http.response.status_code": 200})
    assert book.add([attempt]) == []
    book.add([span(SPAN_KIND_CLIENT, t * 32, "3" * 16, "4" * 16) for t in "bc"])  # pushes trace a out
    assert list(book.pending) == ["b" * 32, "c" * 32]
    (tree,) = book.add(
        [span(SPAN_KIND_SERVER, "c" * 32, "4" * 16, None, **{"http.response.status_code": 429})]
    )
    assert tree[1:] == [
        "├─ attempt 1  None:None  -> ?  2 ms",
        "└─ refused: the rate limiter had no token in time (429)",
    ]
    assert list(book.pending) == ["b" * 32]
